import CBOR
import DeliveryCore
import FleetCrypto
import WireFormat

/// Where an update's outcome is reported (Specs/agent.md §6): the sender of the
/// session it came in, that session, and this device's receiver ID in it.
public struct ReportTarget: Equatable, Sendable {
    public var sender: PeerAddress
    public var session: SessionID
    public var receiver: ReceiverID
    public init(sender: PeerAddress, session: SessionID, receiver: ReceiverID) { self.sender = sender; self.session = session; self.receiver = receiver }
}

/// A software release as the agent tracks it.
public struct Release: Equatable, Sendable {
    /// The bundle's ID (Specs/bundle.md field 13), empty for the release the device shipped with.
    public var bundleID: [UInt8]
    public var version: String
    public var sequence: UInt64
    public init(bundleID: [UInt8], version: String, sequence: UInt64) { self.bundleID = bundleID; self.version = version; self.sequence = sequence }
}

/// What happened to an update, kept in the record until it has been reported.
public struct Outcome: Equatable, Sendable {
    public enum Kind: Int, Sendable, CaseIterable { case confirmed = 1, rolledBack, failed }
    public var kind: Kind
    public var release: Release
    public var reason: String
    /// What the sender hears (Specs/protocol.md §3.7): none for confirmed.
    public var code: Status.Reason
    public init(_ kind: Kind, _ release: Release, reason: String = "", code: Status.Reason = .none) {
        self.kind = kind; self.release = release; self.reason = reason; self.code = code
    }
}

/// The agent's durable state (Specs/agent.md §4): what runs, what is on its way,
/// and what is still to be reported. Written atomically after every decision.
public struct AgentRecord: Equatable, Sendable {
    public struct Pending: Equatable, Sendable {
        /// `rollingBack` is written before the boot state's rollback, so that a crash
        /// between them cannot look like an activation not yet written (Specs/agent.md A-6).
        public enum Phase: Int, Sendable, CaseIterable { case installing = 1, installed, trial, rollingBack }
        public var release: Release
        /// The side it is written to: always the spare.
        public var side: Side
        public var phase: Phase
        /// Where to report its outcome (the sender of the session it came in).
        public var reportTo: ReportTarget?
        /// Why it is rolling back, and the code the sender hears.
        public var reason: String
        public var code: Status.Reason
        public init(release: Release, side: Side, phase: Phase, reportTo: ReportTarget? = nil, reason: String = "", code: Status.Reason = .none) {
            self.release = release; self.side = side; self.phase = phase; self.reportTo = reportTo; self.reason = reason; self.code = code
        }
    }

    public var deviceID: String
    /// The confirmed release and the side it runs on.
    public var installed: Release
    public var installedSide: Side
    /// The stored anti-rollback sequence (Specs/agent.md I3): only raised at confirm.
    public var sequence: UInt64
    public var pending: Pending?
    /// The last outcome, until reported.
    public var outcome: Outcome?
    public var outcomeReportTo: ReportTarget?
    /// Bundles that rolled back, refused when offered again (I5), newest last.
    public var rolledBack: [[UInt8]]
    public static let rolledBackCountMax = 16

    public init(deviceID: String, installed: Release, installedSide: Side) {
        self.deviceID = deviceID
        self.installed = installed
        self.installedSide = installedSide
        sequence = installed.sequence
        pending = nil
        outcome = nil
        outcomeReportTo = nil
        rolledBack = []
    }

    mutating func rememberRolledBack(_ bundleID: [UInt8]) {
        guard !bundleID.isEmpty, !rolledBack.contains(bundleID) else { return }
        if rolledBack.count >= Self.rolledBackCountMax { rolledBack.removeFirst() }
        rolledBack.append(bundleID)
    }

    // MARK: Encoding: deterministic CBOR and its SHA-256 (Specs/agent.md §4)

    public func encoded() -> [UInt8] {
        var entries: [(Int, CBOR)] = [(1, .text(deviceID)), (2, Self.cbor(installed)), (3, .int(installedSide.rawValue)), (4, .unsigned(sequence)),
                                      (7, .array(rolledBack.map { .bytes($0) }))]
        if let p = pending {
            var fields: [(Int, CBOR)] = [(1, Self.cbor(p.release)), (2, .int(p.side.rawValue)), (3, .int(p.phase.rawValue)), (5, .text(p.reason)),
                                         (6, .int(Int(p.code.rawValue)))]
            if let to = p.reportTo { fields.append((4, Self.cbor(to))) }
            entries.append((5, .intMap(fields)))
        }
        if let o = outcome {
            var fields: [(Int, CBOR)] = [(1, .int(o.kind.rawValue)), (2, Self.cbor(o.release)), (3, .text(o.reason)), (5, .int(Int(o.code.rawValue)))]
            if let to = outcomeReportTo { fields.append((4, Self.cbor(to))) }
            entries.append((6, .intMap(fields)))
        }
        let body = CBOR.intMap(entries).encoded()
        return body + SHA256.hash(body)
    }

    /// A record from its file, or nil when it is torn, corrupt or not one.
    public init?(decoding bytes: [UInt8]) {
        guard bytes.count > 32, bytes.count <= Self.encodedByteCountMax else { return nil }
        let body = Array(bytes.dropLast(32))
        guard SHA256.hash(body) == Array(bytes.suffix(32)), let item = try? CBOR(decoding: body),
              let deviceID = item[1]?.textValue, let installed = item[2].flatMap(Self.release),
              let side = item[3]?.intValue.flatMap(Side.init(rawValue:)), let sequence = item[4]?.uint64Value,
              let rolled = item[7]?.arrayValue else { return nil }
        self.init(deviceID: deviceID, installed: installed, installedSide: side)
        self.sequence = sequence
        rolledBack = rolled.compactMap(\.bytesValue)
        if let p = item[5] {
            guard let release = p[1].flatMap(Self.release), let side = p[2]?.intValue.flatMap(Side.init(rawValue:)),
                  let phase = p[3]?.intValue.flatMap(Pending.Phase.init(rawValue:)), let reason = p[5]?.textValue,
                  let code = p[6].flatMap(Self.reason) else { return nil }
            pending = Pending(release: release, side: side, phase: phase, reportTo: p[4].flatMap(Self.target), reason: reason, code: code)
        }
        if let o = item[6] {
            guard let kind = o[1]?.intValue.flatMap(Outcome.Kind.init(rawValue:)), let release = o[2].flatMap(Self.release),
                  let reason = o[3]?.textValue, let code = o[5].flatMap(Self.reason) else { return nil }
            outcome = Outcome(kind, release, reason: reason, code: code)
            outcomeReportTo = o[4].flatMap(Self.target)
        }
    }

    /// Named limit: a record is small; anything larger is not one.
    public static let encodedByteCountMax = 64 * 1024

    static func cbor(_ r: Release) -> CBOR { .intMap([(1, .bytes(r.bundleID)), (2, .text(r.version)), (3, .unsigned(r.sequence))]) }
    static func release(_ item: CBOR) -> Release? {
        guard let id = item[1]?.bytesValue, let version = item[2]?.textValue, let sequence = item[3]?.uint64Value else { return nil }
        return Release(bundleID: id, version: version, sequence: sequence)
    }
    static func reason(_ item: CBOR) -> Status.Reason? {
        item.intValue.flatMap { (0...255).contains($0) ? Status.Reason(rawValue: UInt8($0)) : nil }
    }
    static func cbor(_ t: ReportTarget) -> CBOR {
        .intMap([(1, cbor(t.sender)), (2, .unsigned(UInt64(t.session.rawValue))), (3, .unsigned(t.receiver.rawValue))])
    }
    static func target(_ item: CBOR) -> ReportTarget? {
        guard let sender = item[1].flatMap(peer), let session = item[2]?.uint64Value, session <= UInt64(UInt32.max),
              let receiver = item[3]?.uint64Value else { return nil }
        return ReportTarget(sender: sender, session: SessionID(UInt32(session)), receiver: ReceiverID(receiver))
    }
    static func cbor(_ p: PeerAddress) -> CBOR {
        .intMap([(1, .int(p.family == .ipv6 ? 6 : 4)), (2, .unsigned(p.high)), (3, .unsigned(p.low)), (4, .int(Int(p.port))), (5, .unsigned(UInt64(p.scopeID)))])
    }
    static func peer(_ item: CBOR) -> PeerAddress? {
        guard let family = item[1]?.intValue, family == 4 || family == 6, let high = item[2]?.uint64Value, let low = item[3]?.uint64Value,
              let port = item[4]?.intValue, (0...65535).contains(port), let scope = item[5]?.uint64Value, scope <= UInt64(UInt32.max),
              family == 6 || (high == 0 && low <= UInt64(UInt32.max)) else { return nil }
        return PeerAddress(family: family == 6 ? .ipv6 : .ipv4, high: high, low: low, port: UInt16(port), scopeID: UInt32(scope))
    }
}
