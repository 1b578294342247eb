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
    /// The counters a receiver bumps once per datagram, kept in fields instead
    /// of the dictionary so that the hot path hashes no string; they read
    /// back under their names like any other.
    public enum Hot: Int, CaseIterable, Sendable {
        case acceptedPayload, acceptedAuth, dataDuplicate, dataBlockDone
        public var name: String {
            switch self {
            case .acceptedPayload: "accepted.payload"
            case .acceptedAuth: "accepted.auth"
            case .dataDuplicate: "dropped.data.duplicate"
            case .dataBlockDone: "dropped.data.blockDone"
            }
        }
    }
    private(set) var values: [String: UInt64] = [:]
    private var hot: (UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0)
    public init() {}
    public mutating func add(_ name: String, _ n: UInt64 = 1) {
        if let h = Hot.allCases.first(where: { $0.name == name }) { add(h, n) } else { values[name, default: 0] += n }
    }
    public mutating func add(_ counter: Hot, _ n: UInt64 = 1) {
        switch counter {
        case .acceptedPayload: hot.0 += n
        case .acceptedAuth: hot.1 += n
        case .dataDuplicate: hot.2 += n
        case .dataBlockDone: hot.3 += n
        }
    }
    public subscript(counter: Hot) -> UInt64 {
        switch counter {
        case .acceptedPayload: hot.0
        case .acceptedAuth: hot.1
        case .dataDuplicate: hot.2
        case .dataBlockDone: hot.3
        }
    }
    public subscript(name: String) -> UInt64 {
        if let h = Hot.allCases.first(where: { $0.name == name }) { return self[h] }
        return values[name] ?? 0
    }
    public var all: [(String, UInt64)] {
        let hotValues = Hot.allCases.filter { self[$0] > 0 }.map { ($0.name, self[$0]) }
        return (values.map { ($0.key, $0.value) } + hotValues).sorted { $0.0 < $1.0 }
    }
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
