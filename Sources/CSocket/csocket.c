// Specs/protocol.md §2: datagrams travel over UDP; see csocket.h for the contract.
#define _GNU_SOURCE
#include "csocket.h"

#include <arpa/inet.h>
#include <errno.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define FC_BATCH_MAX 64

int fc_addr_parse(const char *host, uint16_t port, fc_addr *out) {
    memset(out, 0, sizeof(*out));
    struct sockaddr_in *v4 = (struct sockaddr_in *)&out->storage;
    if (inet_pton(AF_INET, host, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons(port);
        out->length = sizeof(struct sockaddr_in);
        return 0;
    }
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&out->storage;
    if (inet_pton(AF_INET6, host, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons(port);
        out->length = sizeof(struct sockaddr_in6);
        return 0;
    }
    return -EINVAL;
}

void fc_addr_format(const fc_addr *addr, char *text, int capacity) {
    char host[INET6_ADDRSTRLEN] = "?";
    if (addr->storage.ss_family == AF_INET) {
        const struct sockaddr_in *v4 = (const struct sockaddr_in *)&addr->storage;
        inet_ntop(AF_INET, &v4->sin_addr, host, sizeof(host));
        snprintf(text, capacity, "%s:%u", host, ntohs(v4->sin_port));
    } else if (addr->storage.ss_family == AF_INET6) {
        const struct sockaddr_in6 *v6 = (const struct sockaddr_in6 *)&addr->storage;
        inet_ntop(AF_INET6, &v6->sin6_addr, host, sizeof(host));
        snprintf(text, capacity, "[%s]:%u", host, ntohs(v6->sin6_port));
    } else {
        snprintf(text, capacity, "(family %d)", addr->storage.ss_family);
    }
}

int fc_addr_family(const fc_addr *addr) { return addr->storage.ss_family; }

uint16_t fc_addr_port(const fc_addr *addr) {
    if (addr->storage.ss_family == AF_INET) return ntohs(((const struct sockaddr_in *)&addr->storage)->sin_port);
    if (addr->storage.ss_family == AF_INET6) return ntohs(((const struct sockaddr_in6 *)&addr->storage)->sin6_port);
    return 0;
}

int fc_addr_is_multicast(const fc_addr *addr) {
    if (addr->storage.ss_family == AF_INET)
        return IN_MULTICAST(ntohl(((const struct sockaddr_in *)&addr->storage)->sin_addr.s_addr));
    if (addr->storage.ss_family == AF_INET6)
        return IN6_IS_ADDR_MULTICAST(&((const struct sockaddr_in6 *)&addr->storage)->sin6_addr);
    return 0;
}

void fc_addr_any(int family, uint16_t port, fc_addr *out) {
    memset(out, 0, sizeof(*out));
    if (family == AF_INET6) {
        struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&out->storage;
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons(port);
        v6->sin6_addr = in6addr_any;
        out->length = sizeof(*v6);
    } else {
        struct sockaddr_in *v4 = (struct sockaddr_in *)&out->storage;
        v4->sin_family = AF_INET;
        v4->sin_port = htons(port);
        v4->sin_addr.s_addr = htonl(INADDR_ANY);
        out->length = sizeof(*v4);
    }
}

int fc_addr_parts(const fc_addr *addr, uint8_t bytes[16], uint16_t *port, uint32_t *scope_id) {
    if (addr->storage.ss_family == AF_INET) {
        const struct sockaddr_in *v4 = (const struct sockaddr_in *)&addr->storage;
        memcpy(bytes, &v4->sin_addr, 4);
        *port = ntohs(v4->sin_port);
        *scope_id = 0;
        return AF_INET;
    }
    if (addr->storage.ss_family == AF_INET6) {
        const struct sockaddr_in6 *v6 = (const struct sockaddr_in6 *)&addr->storage;
        memcpy(bytes, &v6->sin6_addr, 16);
        *port = ntohs(v6->sin6_port);
        *scope_id = v6->sin6_scope_id;
        return AF_INET6;
    }
    return 0;
}

void fc_addr_from_parts(int family, const uint8_t bytes[16], uint16_t port, uint32_t scope_id, fc_addr *out) {
    memset(out, 0, sizeof(*out));
    if (family == AF_INET6) {
        struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&out->storage;
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons(port);
        memcpy(&v6->sin6_addr, bytes, 16);
        v6->sin6_scope_id = scope_id;
        out->length = sizeof(*v6);
    } else {
        struct sockaddr_in *v4 = (struct sockaddr_in *)&out->storage;
        v4->sin_family = AF_INET;
        v4->sin_port = htons(port);
        memcpy(&v4->sin_addr, bytes, 4);
        out->length = sizeof(*v4);
    }
}

int fc_udp_open(int family) {
    int fd = socket(family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    return fd < 0 ? -errno : fd;
}

int fc_set_reuse(int fd) {
    int one = 1;
    return setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ? -errno : 0;
}

int fc_set_buffers(int fd, int receive, int send, int *receive_actual, int *send_actual) {
    // SO_*BUFFORCE passes rmem_max/wmem_max when privileged; fall back to the capped request.
    if (receive > 0 && setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &receive, sizeof(receive)) < 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &receive, sizeof(receive));
    if (send > 0 && setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &send, sizeof(send)) < 0)
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &send, sizeof(send));
    socklen_t n = sizeof(int);
    if (getsockopt(fd, SOL_SOCKET, SO_RCVBUF, receive_actual, &n) < 0) return -errno;
    n = sizeof(int);
    if (getsockopt(fd, SOL_SOCKET, SO_SNDBUF, send_actual, &n) < 0) return -errno;
    // The kernel reports twice the usable size (it counts its bookkeeping).
    *receive_actual /= 2;
    *send_actual /= 2;
    return 0;
}

int fc_bind(int fd, const fc_addr *addr) {
    return bind(fd, (const struct sockaddr *)&addr->storage, addr->length) < 0 ? -errno : 0;
}

int fc_local_address(int fd, fc_addr *out) {
    memset(out, 0, sizeof(*out));
    out->length = sizeof(out->storage);
    return getsockname(fd, (struct sockaddr *)&out->storage, &out->length) < 0 ? -errno : 0;
}

int fc_join_group(int fd, const fc_addr *group, unsigned ifindex) {
    if (group->storage.ss_family == AF_INET) {
        struct ip_mreqn m;
        memset(&m, 0, sizeof(m));
        m.imr_multiaddr = ((const struct sockaddr_in *)&group->storage)->sin_addr;
        m.imr_ifindex = (int)ifindex;
        if (setsockopt(fd, IPPROTO_IP, IP_ADD_MEMBERSHIP, &m, sizeof(m)) < 0) return -errno;
        // Only the groups this socket joined, not every group joined on the host.
        int zero = 0;
        setsockopt(fd, IPPROTO_IP, IP_MULTICAST_ALL, &zero, sizeof(zero));
        return 0;
    }
    struct ipv6_mreq m;
    memset(&m, 0, sizeof(m));
    m.ipv6mr_multiaddr = ((const struct sockaddr_in6 *)&group->storage)->sin6_addr;
    m.ipv6mr_interface = ifindex;
    if (setsockopt(fd, IPPROTO_IPV6, IPV6_ADD_MEMBERSHIP, &m, sizeof(m)) < 0) return -errno;
    int zero = 0;
    setsockopt(fd, IPPROTO_IPV6, IPV6_MULTICAST_ALL, &zero, sizeof(zero));
    return 0;
}

int fc_multicast_out(int fd, int family, unsigned ifindex, int ttl, int loop) {
    if (family == AF_INET) {
        if (ifindex != 0) {
            struct ip_mreqn m;
            memset(&m, 0, sizeof(m));
            m.imr_ifindex = (int)ifindex;
            if (setsockopt(fd, IPPROTO_IP, IP_MULTICAST_IF, &m, sizeof(m)) < 0) return -errno;
        }
        unsigned char t = (unsigned char)ttl, l = (unsigned char)(loop != 0);
        if (setsockopt(fd, IPPROTO_IP, IP_MULTICAST_TTL, &t, sizeof(t)) < 0) return -errno;
        if (setsockopt(fd, IPPROTO_IP, IP_MULTICAST_LOOP, &l, sizeof(l)) < 0) return -errno;
        return 0;
    }
    if (ifindex != 0 && setsockopt(fd, IPPROTO_IPV6, IPV6_MULTICAST_IF, &ifindex, sizeof(ifindex)) < 0) return -errno;
    int hops = ttl, l = loop != 0;
    if (setsockopt(fd, IPPROTO_IPV6, IPV6_MULTICAST_HOPS, &hops, sizeof(hops)) < 0) return -errno;
    if (setsockopt(fd, IPPROTO_IPV6, IPV6_MULTICAST_LOOP, &l, sizeof(l)) < 0) return -errno;
    return 0;
}

int fc_enable_gro(int fd) {
#ifdef UDP_GRO
    int on = 1;
    if (setsockopt(fd, SOL_UDP, UDP_GRO, &on, sizeof(on)) < 0) return -errno;
    return 0;
#else
    (void)fd;
    return -ENOPROTOOPT;
#endif
}

int fc_enable_timestamps(int fd) {
    int on = 1;
    if (setsockopt(fd, SOL_SOCKET, SO_TIMESTAMPNS, &on, sizeof(on)) < 0) return -errno;
    return 0;
}

int fc_recv_batch(int fd, uint8_t *buffer, int slot_bytes, int count, fc_addr *sources, int *lengths, int *segment_sizes,
                  int64_t *ages_us) {
    if (count > FC_BATCH_MAX) count = FC_BATCH_MAX;
    struct mmsghdr msgs[FC_BATCH_MAX];
    struct iovec iov[FC_BATCH_MAX];
    // Room per slot for one UDP_GRO control message (an int) and one kernel
    // receive timestamp (SCM_TIMESTAMPNS, a timespec).
    union { char bytes[CMSG_SPACE(sizeof(int)) + CMSG_SPACE(sizeof(struct timespec))]; struct cmsghdr align; } control[FC_BATCH_MAX];
    memset(msgs, 0, sizeof(struct mmsghdr) * (size_t)count);
    for (int i = 0; i < count; i++) {
        iov[i].iov_base = buffer + (size_t)i * (size_t)slot_bytes;
        iov[i].iov_len = (size_t)slot_bytes;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_name = &sources[i].storage;
        msgs[i].msg_hdr.msg_namelen = sizeof(sources[i].storage);
        msgs[i].msg_hdr.msg_control = control[i].bytes;
        msgs[i].msg_hdr.msg_controllen = sizeof(control[i].bytes);
    }
    int n = recvmmsg(fd, msgs, (unsigned)count, MSG_DONTWAIT, NULL);
    if (n < 0) return (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) ? 0 : -errno;
    // The kernel stamps with CLOCK_REALTIME; an age (now - stamp) carries over to
    // the monotonic clock the cores use. Read once, after the call: every age
    // then includes the time the datagram waited in the socket's queue.
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    for (int i = 0; i < n; i++) {
        sources[i].length = msgs[i].msg_hdr.msg_namelen;
        lengths[i] = (msgs[i].msg_hdr.msg_flags & MSG_TRUNC) ? -1 : (int)msgs[i].msg_len;
        segment_sizes[i] = 0;
        ages_us[i] = -1;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msgs[i].msg_hdr); c != NULL; c = CMSG_NXTHDR(&msgs[i].msg_hdr, c)) {
#ifdef UDP_GRO
            if (c->cmsg_level == SOL_UDP && c->cmsg_type == UDP_GRO && c->cmsg_len >= CMSG_LEN(sizeof(int))) {
                int size;
                memcpy(&size, CMSG_DATA(c), sizeof(size));
                segment_sizes[i] = size;
            }
#endif
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_TIMESTAMPNS && c->cmsg_len >= CMSG_LEN(sizeof(struct timespec))) {
                struct timespec stamp;
                memcpy(&stamp, CMSG_DATA(c), sizeof(stamp));
                int64_t age = ((int64_t)now.tv_sec - (int64_t)stamp.tv_sec) * 1000000 + ((int64_t)now.tv_nsec - (int64_t)stamp.tv_nsec) / 1000;
                // A wall clock stepped between the stamp and the read (back, or forward
                // by an NTP step) shows as a negative or absurd age: unknown.
                ages_us[i] = age >= 0 && age <= FC_ARRIVAL_AGE_MAX_US ? age : -1;
            }
        }
    }
    return n;
}

int fc_send_batch(int fd, uint8_t *const *datagrams, const int *lengths, const fc_addr *destinations, int count, int segment) {
    int sent = 0;
    while (sent < count) {
        // Messages of this call: with `segment`, a run of datagrams of one length to one
        // destination becomes one message (UDP_SEGMENT), its datagrams gathered in place.
        struct mmsghdr msgs[FC_BATCH_MAX];
        struct iovec iov[FC_BATCH_MAX];
        int runs[FC_BATCH_MAX];
        union { char bytes[CMSG_SPACE(sizeof(uint16_t))]; struct cmsghdr align; } control[FC_BATCH_MAX];
        int m = 0, d = sent;
        while (d < count && d - sent < FC_BATCH_MAX) {
            int run = 1;
            if (segment) {
                int limit = FC_GSO_BYTES_MAX / lengths[d];
                if (limit > FC_GSO_SEGMENTS_MAX) limit = FC_GSO_SEGMENTS_MAX;
                while (d + run < count && d + run - sent < FC_BATCH_MAX && run < limit && lengths[d + run] == lengths[d]
                       && destinations[d + run].length == destinations[d].length
                       && memcmp(&destinations[d + run].storage, &destinations[d].storage, destinations[d].length) == 0) run++;
            }
            memset(&msgs[m], 0, sizeof(msgs[m]));
            for (int j = 0; j < run; j++) {
                iov[d - sent + j].iov_base = datagrams[d + j];
                iov[d - sent + j].iov_len = (size_t)lengths[d + j];
            }
            msgs[m].msg_hdr.msg_iov = &iov[d - sent];
            msgs[m].msg_hdr.msg_iovlen = (size_t)run;
            msgs[m].msg_hdr.msg_name = (void *)&destinations[d].storage;
            msgs[m].msg_hdr.msg_namelen = destinations[d].length;
#ifdef UDP_SEGMENT
            if (run > 1) {
                msgs[m].msg_hdr.msg_control = control[m].bytes;
                msgs[m].msg_hdr.msg_controllen = sizeof(control[m].bytes);
                struct cmsghdr *c = CMSG_FIRSTHDR(&msgs[m].msg_hdr);
                c->cmsg_level = SOL_UDP;
                c->cmsg_type = UDP_SEGMENT;
                c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
                uint16_t size = (uint16_t)lengths[d];
                memcpy(CMSG_DATA(c), &size, sizeof(size));
            }
#endif
            runs[m++] = run;
            d += run;
        }
        int n = sendmmsg(fd, msgs, (unsigned)m, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS) return sent;
            // A datagram the network refuses (e.g. no route) is dropped, not retried forever.
            if (sent == 0) return -errno;
            return sent;
        }
        for (int j = 0; j < n; j++) sent += runs[j];
        if (n < m) return sent;
    }
    return sent;
}

int fc_wait_readable(const int *fds, int count, int64_t timeout_ns) {
    struct pollfd p[8];
    if (count > 8) count = 8;
    for (int i = 0; i < count; i++) { p[i].fd = fds[i]; p[i].events = POLLIN; p[i].revents = 0; }
    struct timespec ts, *tsp = NULL;
    if (timeout_ns >= 0) {
        ts.tv_sec = timeout_ns / 1000000000;
        ts.tv_nsec = timeout_ns % 1000000000;
        tsp = &ts;
    }
    int n = ppoll(p, (nfds_t)count, tsp, NULL);
    if (n < 0) return errno == EINTR ? 0 : -errno;
    int mask = 0;
    for (int i = 0; i < count; i++) if (p[i].revents & (POLLIN | POLLERR)) mask |= 1 << i;
    return mask;
}

uint64_t fc_monotonic_microseconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

uint64_t fc_process_cpu_microseconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

int fc_accept_local(int fd, uint32_t *peer_uid) {
    int client = accept4(fd, NULL, NULL, SOCK_CLOEXEC);
    if (client < 0) return -errno;
    struct ucred cred;
    socklen_t length = sizeof(cred);
    if (getsockopt(client, SOL_SOCKET, SO_PEERCRED, &cred, &length) != 0) {
        int e = errno;
        close(client);
        return -e;
    }
    *peer_uid = cred.uid;
    return client;
}
