import CSocket
import DeliveryCore
#if canImport(Glibc)
import Glibc
#endif

/// A failure of the operating system's network or file interfaces, with the
/// call that failed and why (compared by code, as every error in Fleetcast).
public struct TransportError: Error, CustomStringConvertible, Equatable {
    public enum Code: String, Sendable {
        case invalidAddress, noSuchInterface, socket, storage
    }
    public let code: Code
    public let reason: String
    public init(_ code: Code, _ reason: String) { self.code = code; self.reason = reason }
    public var description: String { reason }
    public static func == (a: Self, b: Self) -> Bool { a.code == b.code }

    static func system(_ code: Code, _ what: String, _ negativeErrno: Int32) -> TransportError {
        TransportError(code, "\(what): \(String(cString: strerror(-negativeErrno)))")
    }
}

/// An IPv4 or IPv6 socket address (numeric; Fleetcast resolves no names).
public struct SocketAddress: Hashable, Sendable, CustomStringConvertible {
    public enum Family: Sendable { case ipv4, ipv6 }
    var raw: fc_addr

    init(raw: fc_addr) { self.raw = raw }

    public init(host: String, port: UInt16) throws(TransportError) {
        var a = fc_addr()
        guard fc_addr_parse(host, port, &a) == 0 else {
            throw TransportError(.invalidAddress, "'\(host)' is not a numeric IPv4 or IPv6 address")
        }
        raw = a
    }

    /// The unspecified address of a family (bind to every local address).
    public static func any(_ family: Family, port: UInt16) -> SocketAddress {
        var a = fc_addr()
        fc_addr_any(family == .ipv6 ? AF_INET6 : AF_INET, port, &a)
        return SocketAddress(raw: a)
    }

    // The pointer must not escape the closure: a pointer returned from
    // `withUnsafePointer` dangles (and read the family of an IPv6 group as IPv4).
    public var family: Family { withUnsafePointer(to: raw) { fc_addr_family($0) } == AF_INET6 ? .ipv6 : .ipv4 }
    var systemFamily: Int32 { family == .ipv6 ? AF_INET6 : AF_INET }
    public var port: UInt16 { withUnsafePointer(to: raw) { fc_addr_port($0) } }
    public var isMulticast: Bool { withUnsafePointer(to: raw) { fc_addr_is_multicast($0) != 0 } }

    public var description: String {
        var text = [CChar](repeating: 0, count: 80)
        withUnsafePointer(to: raw) { fc_addr_format($0, &text, Int32(text.count)) }
        return String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// The address as the cores see it.
    public var peer: PeerAddress {
        var bytes = (UInt64(0), UInt64(0))
        var port: UInt16 = 0, scope: UInt32 = 0
        let family = withUnsafeMutableBytes(of: &bytes) { b in
            withUnsafePointer(to: raw) { fc_addr_parts($0, b.baseAddress!.assumingMemoryBound(to: UInt8.self), &port, &scope) }
        }
        // `bytes` holds the address in network order; read it back as big-endian words.
        let high = UInt64(bigEndian: bytes.0), low = UInt64(bigEndian: bytes.1)
        return family == AF_INET6 ? PeerAddress(family: .ipv6, high: high, low: low, port: port, scopeID: scope)
            : PeerAddress(family: .ipv4, low: high >> 32, port: port)
    }

    /// The socket address of a core's peer.
    public init(_ peer: PeerAddress) {
        var bytes = peer.family == .ipv6 ? (peer.high.bigEndian, peer.low.bigEndian) : ((peer.low << 32).bigEndian, UInt64(0))
        var a = fc_addr()
        withUnsafeBytes(of: &bytes) { b in
            fc_addr_from_parts(peer.family == .ipv6 ? AF_INET6 : AF_INET, b.baseAddress!.assumingMemoryBound(to: UInt8.self), peer.port, peer.scopeID, &a)
        }
        raw = a
    }

    /// The meaningful bytes (the length prefix of the sockaddr), for equality and hashing.
    private var significantBytes: [UInt8] {
        withUnsafeBytes(of: raw.storage) { Array($0.prefix(Int(raw.length))) }
    }
    public static func == (a: Self, b: Self) -> Bool { a.raw.length == b.raw.length && a.significantBytes == b.significantBytes }
    public func hash(into h: inout Hasher) { h.combine(significantBytes) }
}

/// A network interface by name, resolved to the index the kernel uses.
public struct NetworkInterface: Sendable, CustomStringConvertible {
    public let name: String
    public let index: UInt32
    public init(name: String) throws(TransportError) {
        let i = if_nametoindex(name)
        guard i != 0 else { throw TransportError(.noSuchInterface, "no network interface named '\(name)'") }
        self.name = name
        index = i
    }
    public var description: String { name }

    /// The interface's first address of `family` (getifaddrs), as the cores see it with
    /// `port`; an IPv6 one carries the interface's index as its scope.
    public func address(_ family: SocketAddress.Family, port: UInt16) -> PeerAddress? {
        var list: UnsafeMutablePointer<ifaddrs>?
        guard getifaddrs(&list) == 0, let first = list else { return nil }
        defer { freeifaddrs(list) }
        var cursor: UnsafeMutablePointer<ifaddrs>? = first
        while let entry = cursor {
            defer { cursor = entry.pointee.ifa_next }
            guard let sa = entry.pointee.ifa_addr, String(cString: entry.pointee.ifa_name) == name else { continue }
            if family == .ipv4, sa.pointee.sa_family == sa_family_t(AF_INET) {
                let a = sa.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { UInt32(bigEndian: $0.pointee.sin_addr.s_addr) }
                return PeerAddress(family: .ipv4, low: UInt64(a), port: port)
            }
            if family == .ipv6, sa.pointee.sa_family == sa_family_t(AF_INET6) {
                let bytes = sa.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { p in withUnsafeBytes(of: p.pointee.sin6_addr) { Array($0) } }
                return PeerAddress(family: .ipv6, address: bytes, port: port, scopeID: index)
            }
        }
        return nil
    }
}

/// Limits of the socket layer, each named (Specs/protocol.md §6).
public enum TransportLimits {
    /// The largest datagram a receive slot holds: a data datagram at the
    /// largest symbol size (8,960 bytes) plus headers; anything longer is
    /// truncated and counted as such.
    public static let datagramByteCountMax = 9216
    /// Datagrams per sendmmsg/recvmmsg call.
    public static let batchCountMax = 64
    /// A coalesced (UDP GRO) message: the kernel's GRO limit, 64 KiB.
    public static let coalescedMessageByteCountMax = 65536
    /// Socket buffer asked for by default: a few hundred milliseconds at 1 Gbit/s.
    public static let socketBufferByteCountDefault = 16 << 20
}

/// A non-blocking UDP socket with batched send and receive. The only place
/// where Fleetcast touches the network (../shared/DESIGN.md, decision 9).
public final class UDPSocket {
    public let fd: Int32
    public let family: SocketAddress.Family

    public init(family: SocketAddress.Family) throws(TransportError) {
        let fd = fc_udp_open(family == .ipv6 ? AF_INET6 : AF_INET)
        guard fd >= 0 else { throw .system(.socket, "socket()", fd) }
        self.fd = fd
        self.family = family
    }

    deinit { close(fd) }

    public func allowAddressReuse() throws(TransportError) {
        let rc = fc_set_reuse(fd)
        guard rc == 0 else { throw .system(.socket, "SO_REUSEADDR", rc) }
    }

    public func bind(_ address: SocketAddress) throws(TransportError) {
        let rc = withUnsafePointer(to: address.raw) { fc_bind(fd, $0) }
        guard rc == 0 else { throw .system(.socket, "bind \(address)", rc) }
    }

    public func localAddress() throws(TransportError) -> SocketAddress {
        var a = fc_addr()
        let rc = fc_local_address(fd, &a)
        guard rc == 0 else { throw .system(.socket, "getsockname", rc) }
        return SocketAddress(raw: a)
    }

    public func join(group: SocketAddress, on interface: NetworkInterface?) throws(TransportError) {
        let rc = withUnsafePointer(to: group.raw) { fc_join_group(fd, $0, interface?.index ?? 0) }
        guard rc == 0 else { throw .system(.socket, "join \(group) on \(interface?.name ?? "default interface")", rc) }
    }

    /// Outgoing multicast: the interface, the TTL (hop limit) and whether this host's own sockets get a copy.
    public func setMulticastOutput(interface: NetworkInterface?, ttl: Int, loopback: Bool) throws(TransportError) {
        let rc = fc_multicast_out(fd, family == .ipv6 ? AF_INET6 : AF_INET, interface?.index ?? 0, Int32(ttl), loopback ? 1 : 0)
        guard rc == 0 else { throw .system(.socket, "multicast output options", rc) }
    }

    /// Asks for large buffers and returns what the kernel granted.
    public func setBuffers(receive: Int, send: Int) throws(TransportError) -> (receive: Int, send: Int) {
        var r: Int32 = 0, s: Int32 = 0
        let rc = fc_set_buffers(fd, Int32(receive), Int32(send), &r, &s)
        guard rc == 0 else { throw .system(.socket, "socket buffers", rc) }
        return (Int(r), Int(s))
    }

    /// Sends the batch's datagrams; returns how many the kernel took
    /// (fewer means its buffer is full: wait for writability or time).
    public func send(_ batch: SendBatch, from start: Int = 0) throws(TransportError) -> Int {
        guard start < batch.count else { return 0 }
        func attempt(_ segment: Bool) -> Int32 {
            batch.pointers.withUnsafeBufferPointer { p in
                batch.lengths.withUnsafeBufferPointer { l in
                    batch.destinations.withUnsafeBufferPointer { d in
                        fc_send_batch(fd, p.baseAddress! + start, l.baseAddress! + start, d.baseAddress! + start,
                                      Int32(batch.count - start), segment ? 1 : 0)
                    }
                }
            }
        }
        var rc = attempt(segmentation)
        if segmentation && (rc == -EIO || rc == -EINVAL || rc == -ENOPROTOOPT) {
            // Specs/protocol.md P-24a: a path that cannot segment gets single datagrams from now on.
            segmentation = false
            rc = attempt(false)
        }
        guard rc >= 0 else { throw .system(.socket, "sendmmsg", rc) }
        return Int(rc)
    }

    /// Whether sends hand runs of equal datagrams to the kernel as one message
    /// to be segmented (UDP GSO, Specs/protocol.md P-24a). Turned off for good
    /// the first time the kernel refuses it.
    public var segmentation = false

    /// Receives what is waiting, up to the batch's capacity, without blocking.
    public func receive(into batch: ReceiveBatch) throws(TransportError) -> Int {
        let capacity = batch.capacity
        let slot = batch.slotByteCount
        let buffer = batch.buffer.assumingMemoryBound(to: UInt8.self)
        let rc = batch.sources.withUnsafeMutableBufferPointer { s in
            batch.lengths.withUnsafeMutableBufferPointer { l in
                batch.segmentSizes.withUnsafeMutableBufferPointer { g in
                    batch.ages.withUnsafeMutableBufferPointer { a in
                        fc_recv_batch(fd, buffer, Int32(slot), Int32(capacity), s.baseAddress!, l.baseAddress!, g.baseAddress!, a.baseAddress!)
                    }
                }
            }
        }
        guard rc >= 0 else { throw .system(.socket, "recvmmsg", rc) }
        batch.messageCount = Int(rc)
        batch.generation &+= 1
        batch.index()
        return batch.count
    }

    /// Asks the kernel to hand over consecutive datagrams of one flow as one
    /// message (UDP GRO, Specs/protocol.md P-24a); read them with a
    /// `ReceiveBatch(coalesced: true)`. False when the kernel cannot.
    public func enableCoalescing() -> Bool { fc_enable_gro(fd) == 0 }

    /// Asks the kernel to stamp each datagram with its arrival (SO_TIMESTAMPNS),
    /// so that a batch tells how long each waited in the socket's queue
    /// (`ReceiveBatch.age(_:)`, Specs/protocol.md P-25a). False when it cannot.
    public func enableArrivalTimestamps() -> Bool { fc_enable_timestamps(fd) == 0 }
}

/// Datagrams waiting to be sent in one system call, copied into slots that are reused.
public final class SendBatch {
    public let capacity: Int
    private let storage: UnsafeMutableRawPointer
    fileprivate var pointers: [UnsafeMutablePointer<UInt8>?]
    fileprivate var lengths: [Int32]
    fileprivate var destinations: [fc_addr]
    public private(set) var count = 0

    public init(capacity: Int = TransportLimits.batchCountMax) {
        self.capacity = capacity
        let storage = UnsafeMutableRawPointer.allocate(byteCount: capacity * TransportLimits.datagramByteCountMax, alignment: 64)
        self.storage = storage
        pointers = (0..<capacity).map { storage.advanced(by: $0 * TransportLimits.datagramByteCountMax).assumingMemoryBound(to: UInt8.self) }
        lengths = [Int32](repeating: 0, count: capacity)
        destinations = [fc_addr](repeating: fc_addr(), count: capacity)
    }
    deinit { storage.deallocate() }

    public var isFull: Bool { count == capacity }

    public func append(_ bytes: [UInt8], to destination: SocketAddress) {
        precondition(count < capacity && bytes.count <= TransportLimits.datagramByteCountMax)
        bytes.withUnsafeBytes { pointers[count]!.update(from: $0.baseAddress!.assumingMemoryBound(to: UInt8.self), count: bytes.count) }
        lengths[count] = Int32(bytes.count)
        destinations[count] = destination.raw
        count += 1
    }

    /// Drops the first `n` datagrams (they were sent), keeping the rest in order.
    public func removeFirst(_ n: Int) {
        guard n > 0 else { return }
        for i in n..<count {
            pointers[i - n]!.update(from: pointers[i]!, count: Int(lengths[i]))
            lengths[i - n] = lengths[i]
            destinations[i - n] = destinations[i]
        }
        count -= n
    }
}

/// Reusable slots for one recvmmsg call.
public final class ReceiveBatch {
    /// Messages per system call.
    public let capacity: Int
    /// Bytes per message slot: one datagram, or with coalescing (UDP GRO) up
    /// to `TransportLimits.coalescedMessageByteCountMax` of same-sized datagrams.
    public let slotByteCount: Int
    /// Left uninitialised: a slot's pages are touched only as far as the kernel
    /// writes into them, so large coalescing slots cost memory only when used.
    fileprivate let buffer: UnsafeMutableRawPointer
    fileprivate var sources: [fc_addr]
    fileprivate var lengths: [Int32]
    fileprivate var segmentSizes: [Int32]
    /// Per message: microseconds since the kernel received it, -1 if not stamped.
    fileprivate var ages: [Int64]
    /// The datagrams the last receive returned: where each starts in `buffer`,
    /// its length (-1: truncated) and the message (hence source) it came in.
    fileprivate var datagrams: [(start: Int, length: Int, message: Int)] = []
    /// Messages the last receive returned (each one datagram unless coalesced).
    public fileprivate(set) var messageCount = 0
    /// Datagrams the last receive returned.
    public var count: Int { datagrams.count }

    public init(capacity: Int = TransportLimits.batchCountMax, coalesced: Bool = false) {
        self.capacity = capacity
        slotByteCount = coalesced ? TransportLimits.coalescedMessageByteCountMax : TransportLimits.datagramByteCountMax
        buffer = UnsafeMutableRawPointer.allocate(byteCount: capacity * slotByteCount, alignment: 64)
        sources = [fc_addr](repeating: fc_addr(), count: capacity)
        lengths = [Int32](repeating: 0, count: capacity)
        segmentSizes = [Int32](repeating: 0, count: capacity)
        ages = [Int64](repeating: -1, count: capacity)
        datagrams.reserveCapacity(capacity)
    }

    deinit { buffer.deallocate() }

    /// Splits the messages received into datagrams (a coalesced message holds
    /// datagrams of its segment size, the last possibly shorter).
    fileprivate func index() {
        datagrams.removeAll(keepingCapacity: true)
        for m in 0..<messageCount {
            let start = m * slotByteCount, length = Int(lengths[m]), segment = Int(segmentSizes[m])
            guard length >= 0, segment > 0, segment < length else {
                datagrams.append((start, length, m))
                continue
            }
            var offset = 0
            while offset < length {
                datagrams.append((start + offset, min(segment, length - offset), m))
                offset += segment
            }
        }
    }

    /// The i-th datagram, or nil if it was longer than a slot (truncated).
    public func datagram(_ i: Int) -> [UInt8]? {
        precondition(i < count)
        let d = datagrams[i]
        guard d.length >= 0 else { return nil }
        return Array(UnsafeRawBufferPointer(start: buffer + d.start, count: d.length))
    }

    /// How long before the receive call the kernel got the i-th datagram (the
    /// time it waited in the socket's queue), or nil when the socket does not
    /// stamp arrivals (`UDPSocket.enableArrivalTimestamps`).
    public func age(_ i: Int) -> Interval? {
        let a = ages[datagrams[i].message]
        return a >= 0 ? Interval(microseconds: UInt64(a)) : nil
    }

    public func source(_ i: Int) -> SocketAddress { SocketAddress(raw: sources[datagrams[i].message]) }

    /// The i-th datagram's source as the cores see it; computed once per message
    /// (a coalesced message's datagrams share their source).
    public func peer(_ i: Int) -> PeerAddress {
        let m = datagrams[i].message
        if let cached = peerCache, cached.message == m, cached.generation == generation { return cached.peer }
        let p = SocketAddress(raw: sources[m]).peer
        peerCache = (m, generation, p)
        return p
    }
    private var peerCache: (message: Int, generation: UInt64, peer: PeerAddress)?
    fileprivate var generation: UInt64 = 0
}

/// The driver's clock: CLOCK_MONOTONIC as an `Instant`.
public enum MonotonicClock {
    public static func now() -> Instant { Instant(microseconds: fc_monotonic_microseconds()) }
    /// User plus system CPU time this process has used.
    public static func processCPUSeconds() -> Double { Double(fc_process_cpu_microseconds()) / 1e6 }
}

/// Waits until a socket is readable or the deadline passes.
/// Returns the indices of the readable sockets.
public func waitReadable(_ sockets: [UDPSocket], until deadline: Instant?) -> [Int] {
    let fds = sockets.map(\.fd)
    var timeout: Int64 = -1
    if let deadline {
        let now = MonotonicClock.now()
        timeout = deadline > now ? Int64((deadline - now).microseconds) * 1000 : 0
    }
    // With no sockets this is a plain sleep (ppoll on an empty set).
    let mask = fds.withUnsafeBufferPointer { fc_wait_readable($0.baseAddress, Int32(fds.count), timeout) }
    guard mask > 0 else { return [] }
    return sockets.indices.filter { mask & (1 << $0) != 0 }
}
