// The raw multicast ceiling of the lab (no protocol, no repair, no checks):
//   blast send GROUP PORT IFACE SECONDS [BITRATE [gso]] -> datagrams of 1428 bytes
//                                                     (a Fleetcast data datagram's size)
//   blast recv GROUP PORT IFACE IDLE_MS [gro]      -> prints "bytes seconds" once the
//                                                     stream has been silent IDLE_MS
// With gso, the sender hands the kernel runs of 45 datagrams as one message
// (UDP_SEGMENT); with gro, the receiver takes them coalesced (UDP_GRO): the
// best plain multicast can do where the kernel offers it, as Fleetcast does.
// Used by bench/compare to measure, in the same run, what plain multicast carries
// to N receivers on this machine. Bounded: the sender stops after SECONDS.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define SIZE 1428
#define BATCH 32
#define RUN 45  /* datagrams per GSO message: 45 x 1428 = 64,260 bytes */

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
    static char buf[BATCH][RUN * SIZE];
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    memset(msgs, 0, sizeof(msgs));
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = buf[i]; iov[i].iov_len = SIZE;  /* one datagram per message unless gso/gro */
        msgs[i].msg_hdr.msg_iov = &iov[i]; msgs[i].msg_hdr.msg_iovlen = 1;
    }
    if (strcmp(argv[1], "send") == 0) {
        double seconds = atof(argv[5]), rate = argc > 6 ? atof(argv[6]) / 8 : 0;
        setsockopt(fd, IPPROTO_IP, IP_MULTICAST_IF, &m, sizeof(m));
        int sndbuf = 1 << 20;
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
        int gso = argc > 7 && strcmp(argv[7], "gso") == 0, per = gso ? RUN : 1;
        static union { char bytes[CMSG_SPACE(sizeof(uint16_t))]; struct cmsghdr align; } control[BATCH];
        for (int i = 0; i < BATCH; i++) {
            msgs[i].msg_hdr.msg_name = &group; msgs[i].msg_hdr.msg_namelen = sizeof(group);
            if (!gso) continue;
            iov[i].iov_len = RUN * SIZE;
            msgs[i].msg_hdr.msg_control = control[i].bytes;
            msgs[i].msg_hdr.msg_controllen = sizeof(control[i].bytes);
            struct cmsghdr *c = CMSG_FIRSTHDR(&msgs[i].msg_hdr);
            c->cmsg_level = SOL_UDP; c->cmsg_type = UDP_SEGMENT; c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
            uint16_t size = SIZE;
            memcpy(CMSG_DATA(c), &size, sizeof(size));
        }
        double start = now(), sent = 0;
        int batch = gso ? 2 : BATCH;  /* gso: 90 datagrams per call, about as many as without */
        while (now() - start < seconds) {
            if (rate > 0 && sent > rate * (now() - start)) { usleep(100); continue; }
            int n = sendmmsg(fd, msgs, (unsigned)batch, 0);
            if (n > 0) sent += (double)n * per * (SIZE + 28);
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
    if (argc > 6 && strcmp(argv[6], "gro") == 0) {
        setsockopt(fd, SOL_UDP, UDP_GRO, &one, sizeof(one));
        for (int i = 0; i < BATCH; i++) iov[i].iov_len = RUN * SIZE;
    }
    double bytes = 0, first = 0, last = 0;
    struct pollfd p = { .fd = fd, .events = POLLIN };
    // Waits up to 30 s for the first datagram, then until IDLE_MS of silence.
    for (;;) {
        int r = poll(&p, 1, first == 0 ? 30000 : idle_ms);
        if (r <= 0) break;
        int n = recvmmsg(fd, msgs, BATCH, MSG_DONTWAIT, NULL);
        if (n <= 0) continue;
        if (first == 0) first = now();
        /* A coalesced message holds msg_len / SIZE datagrams (rounded up), each with 28 header bytes. */
        for (int i = 0; i < n; i++) bytes += msgs[i].msg_len + 28.0 * ((msgs[i].msg_len + SIZE - 1) / SIZE);
        last = now();
    }
    printf("%.0f %.3f\n", bytes, last - first);
    return 0;
}
