import UpdateBundle
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
    public var description: String { "\(microseconds / 1_000_000).\(String(microseconds % 1_000_000 + 1_000_000).dropFirst())s" }
}

/// A span of time in microseconds (named apart from Swift.Duration, which carries attoseconds).
public struct Interval: Comparable, Hashable, Sendable {
    public var microseconds: UInt64
    public init(microseconds: UInt64) { self.microseconds = microseconds }
    public static func milliseconds(_ ms: UInt64) -> Interval { Interval(microseconds: ms * 1000) }
    public static func seconds(_ s: Double) -> Interval { Interval(microseconds: UInt64(s * 1e6)) }
    public static func < (a: Self, b: Self) -> Bool { a.microseconds < b.microseconds }
    public static func * (d: Interval, f: Double) -> Interval { Interval(microseconds: UInt64(Double(d.microseconds) * f)) }
    public static func + (a: Interval, b: Interval) -> Interval { Interval(microseconds: a.microseconds &+ b.microseconds) }
    public var seconds: Double { Double(microseconds) / 1e6 }
}

/// Where a datagram goes. The driver maps `.sender` to the feedback address
/// from the announce, `.receiver` to the address that receiver's feedback came from.
public enum Destination: Hashable, Sendable {
    case group
    case sender
    case receiver(ReceiverID)
}

public struct Transmit: Sendable {
    public var destination: Destination
    public var bytes: [UInt8]
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

/// A named counter set: every drop and every rejection has a name (Specs/protocol.md P-1).
public struct Counters: Sendable, CustomStringConvertible {
    private(set) var values: [String: UInt64] = [:]
    public init() {}
    public mutating func add(_ name: String, _ n: UInt64 = 1) { values[name, default: 0] += n }
    public subscript(name: String) -> UInt64 { values[name] ?? 0 }
    public var all: [(String, UInt64)] { values.sorted { $0.key < $1.key }.map { ($0.key, $0.value) } }
    public var description: String { all.map { "\($0.0)=\($0.1)" }.joined(separator: " ") }
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
