// The raw multicast ceiling of the lab (no protocol, no repair, no checks):
//   blast send GROUP PORT IFACE SECONDS [BITRATE]  -> datagrams of 1428 bytes
//                                                     (a Fleetcast data datagram's size)
//   blast recv GROUP PORT IFACE IDLE_MS            -> prints "bytes seconds" once the
//                                                     stream has been silent IDLE_MS
// Used by bench/compare to measure, in the same run, what plain multicast carries
// to N receivers on this machine. Bounded: the sender stops after SECONDS.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define SIZE 1428
#define BATCH 32

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc < 6) { fprintf(stderr, "usage: blast send|recv GROUP PORT IFACE SECONDS|IDLE_MS [BITRATE]\n"); return 2; }
    struct sockaddr_in group = { .sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[3])) };
    if (inet_pton(AF_INET, argv[2], &group.sin_addr) != 1) { fprintf(stderr, "bad group\n"); return 2; }
    struct ip_mreqn m = { .imr_multiaddr = group.sin_addr, .imr_ifindex = (int)if_nametoindex(argv[4]) };
    if (m.imr_ifindex == 0) { fprintf(stderr, "no interface %s\n", argv[4]); return 2; }
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    static char buf[BATCH][SIZE];
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    memset(msgs, 0, sizeof(msgs));
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = buf[i]; iov[i].iov_len = SIZE;
        msgs[i].msg_hdr.msg_iov = &iov[i]; msgs[i].msg_hdr.msg_iovlen = 1;
    }
    if (strcmp(argv[1], "send") == 0) {
        double seconds = atof(argv[5]), rate = argc > 6 ? atof(argv[6]) / 8 : 0;
        setsockopt(fd, IPPROTO_IP, IP_MULTICAST_IF, &m, sizeof(m));
        int sndbuf = 1 << 20;
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
        for (int i = 0; i < BATCH; i++) { msgs[i].msg_hdr.msg_name = &group; msgs[i].msg_hdr.msg_namelen = sizeof(group); }
        double start = now(), sent = 0;
        while (now() - start < seconds) {
            if (rate > 0 && sent > rate * (now() - start)) { usleep(100); continue; }
            int n = sendmmsg(fd, msgs, BATCH, 0);
            if (n > 0) sent += (double)n * (SIZE + 28);
        }
        printf("%.0f %.3f\n", sent, now() - start);
        return 0;
    }
    int one = 1, rcvbuf = 16 << 20;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof(rcvbuf));
    if (bind(fd, (struct sockaddr *)&group, sizeof(group)) != 0) { perror("bind"); return 1; }
    if (setsockopt(fd, IPPROTO_IP, IP_ADD_MEMBERSHIP, &m, sizeof(m)) != 0) { perror("join"); return 1; }
    int idle_ms = atoi(argv[5]);
    double bytes = 0, first = 0, last = 0;
    struct pollfd p = { .fd = fd, .events = POLLIN };
    // Waits up to 30 s for the first datagram, then until IDLE_MS of silence.
    for (;;) {
        int r = poll(&p, 1, first == 0 ? 30000 : idle_ms);
        if (r <= 0) break;
        int n = recvmmsg(fd, msgs, BATCH, MSG_DONTWAIT, NULL);
        if (n <= 0) continue;
        if (first == 0) first = now();
        for (int i = 0; i < n; i++) bytes += msgs[i].msg_len + 28;
        last = now();
    }
    printf("%.0f %.3f\n", bytes, last - first);
    return 0;
}
