import BundleFormat
import WireFormat

/// A point on the driver's monotonic clock, in microseconds. The core never
/// reads a clock: every entry point takes `at now: Instant`.
public struct Instant: Comparable, Hashable, Sendable, CustomStringConvertible {
    public var microseconds: UInt64
    public init(microseconds: UInt64) { self.microseconds = microseconds }
    public static let zero = Instant(microseconds: 0)
    public static func < (a: Self, b: Self) -> Bool { a.microseconds < b.microseconds }
    public static func + (a: Self, d: Interval) -> Self { Instant(microseconds: a.microseconds &+ d.microseconds) }
    public static func - (a: Self, b: Self) -> Interval { Interval(microseconds: a.microseconds >= b.microseconds ? a.microseconds - b.microseconds : 0) }
    /// An earlier instant, no earlier than zero.
    public static func - (a: Self, d: Interval) -> Self { Instant(microseconds: a.microseconds >= d.microseconds ? a.microseconds - d.microseconds : 0) }
    public var description: String { "\(microseconds / 1_000_000).\(String(microseconds % 1_000_000 + 1_000_000).dropFirst())s" }
}

/// A span of time in microseconds (named apart from Swift.Duration, which carries attoseconds).
public struct Interval: Comparable, Hashable, Sendable {
    public var microseconds: UInt64
    public init(microseconds: UInt64) { self.microseconds = microseconds }
    public static func milliseconds(_ ms: UInt64) -> Interval { Interval(microseconds: ms * 1000) }
    public static func seconds(_ s: Double) -> Interval { Interval(microseconds: UInt64(s * 1e6)) }
    public static let zero = Interval(microseconds: 0)
    public static func < (a: Self, b: Self) -> Bool { a.microseconds < b.microseconds }
    public static func * (d: Interval, f: Double) -> Interval { Interval(microseconds: UInt64(Double(d.microseconds) * f)) }
    public static func + (a: Interval, b: Interval) -> Interval { Interval(microseconds: a.microseconds &+ b.microseconds) }
    public var seconds: Double { Double(microseconds) / 1e6 }
}

/// A UDP peer as a plain value: what a datagram came from and where one goes.
/// The cores pick destinations themselves (the feedback address an announce
/// names, the address a receiver's feedback came from), so no driver parses a
/// datagram to route it; drivers convert to and from their sockets' addresses.
/// The address is held in two integers, not an array: one is made per datagram.
public struct PeerAddress: Hashable, Sendable, CustomStringConvertible {
    public enum Family: Sendable, Hashable { case ipv4, ipv6 }
    public let family: Family
    /// The address in network order: IPv6 bytes 0-7 and 8-15; IPv4 in the low 32 bits of `low`.
    public let high: UInt64
    public let low: UInt64
    public let port: UInt16
    /// The IPv6 interface scope of a link-local address (0 elsewhere).
    public let scopeID: UInt32

    public init(family: Family, high: UInt64 = 0, low: UInt64, port: UInt16, scopeID: UInt32 = 0) {
        precondition(family == .ipv6 || (high == 0 && low <= UInt64(UInt32.max)), "an IPv4 address has 32 bits")
        self.family = family; self.high = high; self.low = low; self.port = port; self.scopeID = family == .ipv6 ? scopeID : 0
    }

    /// From address bytes in network order: 4 for IPv4, 16 for IPv6.
    public init(family: Family, address: some Collection<UInt8>, port: UInt16, scopeID: UInt32 = 0) {
        let bytes = Array(address)
        precondition(bytes.count == (family == .ipv4 ? 4 : 16), "an IPv4 address has 4 bytes, an IPv6 one 16")
        let word = { (r: Range<Int>) in bytes[r].reduce(UInt64(0)) { $0 << 8 | UInt64($1) } }
        self.init(family: family, high: family == .ipv6 ? word(0..<8) : 0, low: family == .ipv6 ? word(8..<16) : word(0..<4),
                  port: port, scopeID: scopeID)
    }

    /// The host alone (port 0): what per-host limits count by.
    public var hostOnly: PeerAddress { PeerAddress(family: family, high: high, low: low, port: 0, scopeID: scopeID) }

    /// The address bytes in network order.
    public var addressBytes: [UInt8] {
        let words = family == .ipv6 ? [high, low] : [low << 32]
        return words.flatMap { w in (0..<8).map { UInt8(truncatingIfNeeded: w >> (56 - 8 * $0)) } }.prefix(family == .ipv6 ? 16 : 4).map { $0 }
    }

    /// 198.18.0.0/15 (RFC 2544's benchmarking range), for tests and the simulator.
    public static func benchmark(_ host: UInt16, port: UInt16 = 4711) -> PeerAddress {
        PeerAddress(family: .ipv4, low: 0xC612_0000 | UInt64(host), port: port)
    }

    public var description: String {
        let bytes = addressBytes
        switch family {
        case .ipv4: return bytes.map(String.init).joined(separator: ".") + ":\(port)"
        case .ipv6:
            let groups = stride(from: 0, to: 16, by: 2).map { String(UInt16(bytes[$0]) << 8 | UInt16(bytes[$0 + 1]), radix: 16) }
            return "[" + groups.joined(separator: ":") + (scopeID != 0 ? "%\(scopeID)" : "") + "]:\(port)"
        }
    }
}

/// Where a datagram goes: the session's multicast group, or one peer by unicast
/// (a receiver's feedback to its sender, a sender's ACK to a receiver).
public enum Destination: Hashable, Sendable {
    case group
    case peer(PeerAddress)
}

/// A datagram for the driver to send.
public struct Transmit: Sendable {
    public var destination: Destination
    public var bytes: [UInt8]
    public init(destination: Destination, bytes: [UInt8]) { self.destination = destination; self.bytes = bytes }
}

/// A core's timers as data (quinn's `TimerTable`): one optional deadline per
/// timer, so that the next wake-up is one minimum and no timer hides in a field.
struct TimerTable<Timer: CaseIterable & RawRepresentable> where Timer.RawValue == Int {
    private var deadlines = [Instant?](repeating: nil, count: Timer.allCases.count)
    subscript(timer: Timer) -> Instant? {
        get { deadlines[timer.rawValue] }
        set { deadlines[timer.rawValue] = newValue }
    }
    /// Whether `timer` is set and due at `now`.
    func isDue(_ timer: Timer, at now: Instant) -> Bool { deadlines[timer.rawValue].map { $0 <= now } ?? false }
    /// The earliest deadline set (no array is made: it is asked on every state change).
    var next: Instant? {
        var earliest: Instant?
        for case let d? in deadlines where earliest == nil || d < earliest! { earliest = d }
        return earliest
    }
}

/// The blocks of one object under the bundle's transport profile (Specs/bundle.md §7.1).
public struct ObjectLayout: Sendable {
    public let object: ObjectID
    public let geometry: BlockGeometry
    public var profile: TransportProfile { geometry.profile }
    public var blockCount: Int { geometry.blockCount }

    public init(object: ObjectID, size: UInt64, profile: TransportProfile) {
        self.object = object
        geometry = BlockGeometry(payloadSize: size, profile: profile)
    }

    public func sourceSymbols(_ block: Int) -> Int { geometry.sourceSymbols(inBlock: block) }
    public func symbolCount(_ block: Int) -> Int { geometry.symbolCount(inBlock: block) }
}

/// The share of the full NACK backoff a group of this size uses (Specs/protocol.md
/// P-17b): NACKs are unicast, so backoff suppresses nothing and only spreads the
/// feedback of large groups; a small group answers at once. 1 receiver: 0,
/// 10: 1/3, 100: 2/3, 1000 and more: all of it.
public func backoffShare(groupSize: Int) -> Double {
    min(1, log10(Double(max(groupSize, 1))) / 3)
}

/// RFC 5740 §5.5's truncated exponential: density rising as e^(λt/T) on
/// [0, T) with λ = ln(group size) + 1, so in a large group few timers fire early.
func truncatedExponential(max: Interval, groupSize: Int, unit u: Double) -> Interval {
    let lambda = log(Double(Swift.max(groupSize, 1))) + 1
    let t = (Double(max.microseconds) / lambda) * log(1 + u * (exp(lambda) - 1))
    return Interval(microseconds: UInt64(Swift.min(Swift.max(t, 0), Double(max.microseconds))))
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// What a receiving socket loop drives (Transport's `ReceiverPump`, or a device
/// maker's own loop): datagrams and time in, datagrams out, and work that is
/// not network, done between reads. The loop owns the sockets and the clock;
/// the endpoint owns every decision.
public protocol DatagramEndpoint: AnyObject {
    /// A datagram from `peer` (its source address), handled at `now`; the kernel
    /// received it at `arrivedAt` (<= `now`; earlier when it waited in the
    /// socket's queue, Specs/protocol.md P-25a).
    func handleDatagram(_ bytes: [UInt8], from peer: PeerAddress, at now: Instant, arrivedAt: Instant)
    /// Called when `nextDeadline` has passed.
    func handleTimeout(at now: Instant)
    /// The next datagram to send, or nil.
    func pollTransmit() -> Transmit?
    /// When `handleTimeout` next has something to do.
    var nextDeadline: Instant? { get }
    /// Whether `performPendingWork` has something to do now (the loop then reads the
    /// sockets without waiting, and calls it).
    var hasPendingWork: Bool { get }
    /// A bounded slice of that work (a few milliseconds), so that the sockets wait little.
    func performPendingWork(at now: Instant)
    /// Nothing more to receive or send: the loop may end.
    var isDone: Bool { get }
}

extension DatagramEndpoint {
    /// A datagram that arrived at `now` (a loop without arrival timestamps).
    public func handleDatagram(_ bytes: [UInt8], from peer: PeerAddress, at now: Instant) {
        handleDatagram(bytes, from: peer, at: now, arrivedAt: now)
    }
}
