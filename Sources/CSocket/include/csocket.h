// The UDP system calls Fleetcast's Transport needs, in one small C layer:
// batched send and receive (sendmmsg/recvmmsg are GNU extensions the Swift
// Glibc module does not export), multicast membership by interface index,
// and the monotonic clock. Every function returns -errno on failure.
#ifndef FLEETCAST_CSOCKET_H
#define FLEETCAST_CSOCKET_H

#include <stdint.h>
#include <sys/socket.h>

typedef struct fc_addr {
    struct sockaddr_storage storage;
    socklen_t length;
} fc_addr;

/// Parses a numeric IPv4 or IPv6 address ("239.192.0.42", "ff15::42").
int fc_addr_parse(const char *host, uint16_t port, fc_addr *out);
/// Writes "a.b.c.d:port" or "[v6]:port" into `text` (at least 64 bytes).
void fc_addr_format(const fc_addr *addr, char *text, int capacity);
int fc_addr_family(const fc_addr *addr);
uint16_t fc_addr_port(const fc_addr *addr);
int fc_addr_is_multicast(const fc_addr *addr);
/// The unspecified address of a family, with a port.
void fc_addr_any(int family, uint16_t port, fc_addr *out);
/// The parts of an address: `bytes` gets 4 (IPv4) or 16 (IPv6) bytes in network
/// order; returns the family (AF_INET, AF_INET6) or 0 for another.
int fc_addr_parts(const fc_addr *addr, uint8_t bytes[16], uint16_t *port, uint32_t *scope_id);
/// An address from its parts (`bytes` as above).
void fc_addr_from_parts(int family, const uint8_t bytes[16], uint16_t port, uint32_t scope_id, fc_addr *out);

/// A non-blocking, close-on-exec UDP socket.
int fc_udp_open(int family);
int fc_set_reuse(int fd);
/// Asks for `receive`/`send` bytes of buffer; reports what the kernel granted.
int fc_set_buffers(int fd, int receive, int send, int *receive_actual, int *send_actual);
int fc_bind(int fd, const fc_addr *addr);
int fc_local_address(int fd, fc_addr *out);
/// Joins `group` on the interface with index `ifindex` (0: the kernel's choice).
int fc_join_group(int fd, const fc_addr *group, unsigned ifindex);
/// Outgoing multicast: interface, TTL / hop limit, and whether copies loop back to this host.
int fc_multicast_out(int fd, int family, unsigned ifindex, int ttl, int loop);

/// Asks the kernel to coalesce consecutive datagrams of one flow (UDP_GRO):
/// a message then holds several datagrams of `segment_sizes[i]` bytes each
/// (the last may be shorter). 0, or -errno when the kernel cannot.
int fc_enable_gro(int fd);
/// Receives up to `count` messages without blocking into `count` slots of
/// `slot_bytes` each; `lengths[i]` is the message's size, or -1 if it was
/// truncated; `segment_sizes[i]` is the GRO segment size, or 0 when the
/// message is one datagram; `ages_us[i]` is how long ago (in microseconds) the
/// kernel received the message, or -1 when it did not stamp it (see
/// `fc_enable_timestamps`). Returns the number received (0 when none is waiting).
int fc_recv_batch(int fd, uint8_t *buffer, int slot_bytes, int count, fc_addr *sources, int *lengths, int *segment_sizes,
                  int64_t *ages_us);
/// Asks the kernel to stamp each datagram with the time it arrived
/// (SO_TIMESTAMPNS), so that `fc_recv_batch` can tell how long it waited in
/// the socket's queue. 0, or -errno.
int fc_enable_timestamps(int fd);
/// Named limit: an age above this (10 s, far beyond any socket queue) means the
/// wall clock stepped; the age is then unknown.
#define FC_ARRIVAL_AGE_MAX_US 10000000
/// Segmentation offload (UDP_SEGMENT): at most this many datagrams, and this
/// many bytes of them, per message (the kernel's UDP_MAX_SEGMENTS and the
/// largest UDP payload).
#define FC_GSO_SEGMENTS_MAX 64
#define FC_GSO_BYTES_MAX 65000
/// Sends `count` datagrams (one system call per up to 64). With `segment`,
/// each run of consecutive datagrams of one length to one destination goes
/// as one message that the kernel (or the NIC) cuts back into datagrams
/// (UDP GSO). Returns how many datagrams the kernel took; fewer than `count`
/// means its buffer is full (EAGAIN). -EIO or -EINVAL on the first message
/// with `segment` means the path cannot segment: send without it.
int fc_send_batch(int fd, uint8_t *const *datagrams, const int *lengths, const fc_addr *destinations, int count, int segment);
/// Waits until one of `fds` is readable or `timeout_ns` passes (< 0: no limit).
/// Returns a bit mask of the readable descriptors' positions.
int fc_wait_readable(const int *fds, int count, int64_t timeout_ns);
/// CLOCK_MONOTONIC in microseconds.
uint64_t fc_monotonic_microseconds(void);
/// Process CPU time (user + system) in microseconds.
uint64_t fc_process_cpu_microseconds(void);

#endif

/// Accepts one connection on a listening Unix stream socket (close-on-exec) and
/// tells the connecting process's user ID (SO_PEERCRED): the agent's control
/// socket answers its owner only. The client's descriptor, or -errno.
int fc_accept_local(int fd, uint32_t *peer_uid);
