import BundleFormat
import WireFormat

/// An enumeration whose cases are counted by a `Tally`.
public protocol TallyKey: CaseIterable, Equatable, Sendable {
    /// The case's slot, 0 ..< allCases.count.
    var tallyIndex: Int { get }
    /// How the case reads in progress lines and `--counters` output.
    var tallyName: String { get }
}

extension TallyKey {
    /// For the rare counters (parse errors, refusals): found by search, since the case
    /// lists are short and the path is cold.
    public var tallyIndex: Int { Array(Self.allCases).firstIndex(of: self)! }
}

extension TallyKey where Self: RawRepresentable, RawValue == Int {
    /// Cases numbered from 0: a slot without a search, for counters on hot paths.
    public var tallyIndex: Int { rawValue }
}

extension TallyKey where Self: RawRepresentable, RawValue == String {
    public var tallyName: String { rawValue }
}

/// A count per case of `Key`, in a fixed array: adding hashes nothing.
public struct Tally<Key: TallyKey>: Sendable, Equatable {
    private var counts = [UInt64](repeating: 0, count: Key.allCases.count)
    public init() {}
    public subscript(key: Key) -> UInt64 { counts[key.tallyIndex] }
    public mutating func add(_ key: Key, _ n: UInt64 = 1) { counts[key.tallyIndex] += n }
    public var total: UInt64 { counts.reduce(0, +) }
    /// The cases counted at least once, in declaration order.
    public var nonZero: [(key: Key, count: UInt64)] {
        zip(Key.allCases, counts).filter { $0.1 > 0 }.map { ($0.0, $0.1) }
    }
    public static func + (a: Self, b: Self) -> Self {
        var sum = a
        for i in sum.counts.indices { sum.counts[i] += b.counts[i] }
        return sum
    }
}

extension WireFormatError.Code: TallyKey {}
extension BundleError.Code: TallyKey {}
extension Datagram.Kind: TallyKey {
    public var tallyName: String { "\(self)" }
}
extension Status.Reason: TallyKey {
    public var tallyName: String { "\(self)" }
}

extension Status.Reason {
    /// The reason a device gives the sender for refusing a bundle that failed `error`
    /// (Specs/protocol.md §3.7): policy failures by name, key failures as not a
    /// recipient, file trouble as storage, any other check of step 2 as a failed
    /// verification.
    public init(refusing error: BundleError) {
        self = switch error.code {
        case .expired: .expired
        case .incompatibleHardware: .incompatibleHardware
        case .rollback: .rollback
        case .notARecipient: .notARecipient
        case .io: .storage
        case .decryptionFailed: .decryptionFailed
        case .malformed, .unknownCriticalField, .signatureInvalid, .sizeMismatch, .hashMismatch, .invalidInput: .verificationFailed
        }
    }
}
extension Close.Reason: TallyKey {
    public var tallyName: String { "\(self)" }
}

/// Why a receiver dropped a datagram it parsed (Specs/protocol.md P-1, P-5, P-6).
/// Parse failures and refused announces are counted apart, by their codes.
public enum ReceiverDrop: Int, TallyKey {
    case otherSession, feedbackFromPeer, notReceiving, preJoinBufferFull
    case symbolSize, blockRange, symbolRange, blocksInFlight
    case unauthenticatedBufferFull, badTag, announceRefusedBefore
    /// P-29c: a payload symbol of a block beyond the staging window.
    case beyondWindow
    /// P-30: a COOKIE for a session this receiver did not ask; an ACK without its cookie.
    case unsolicitedCookie, forgedAck
    /// Specs/bundle.md B-8a: an envelope whose signatures failed before, not checked again.
    case announceFailedBefore
    /// P-31: SESSION records older than the newest, that failed, or beyond the checks a
    /// second; an announce of a session no record vouches for (required); a POLL or CLOSE
    /// of an authenticated session without its chain value.
    case sessionRecordStale, sessionRecordInvalid, sessionRecordOverBudget, unauthenticatedSession, unauthenticatedControl
    /// P-3d: an ANNOUNCE fragment that does not hash to its root; one of another root than
    /// a signed record names.
    case announceBadFragment, announceForeignRoot

    public var tallyName: String {
        switch self {
        case .otherSession: "otherSession"
        case .feedbackFromPeer: "feedbackFromPeer"
        case .notReceiving: "dataNotReceiving"
        case .preJoinBufferFull: "data.preJoinBufferFull"
        case .symbolSize: "data.symbolSize"
        case .blockRange: "data.blockRange"
        case .symbolRange: "data.symbolRange"
        case .blocksInFlight: "data.blocksInFlight"
        case .unauthenticatedBufferFull: "data.unauthenticatedBufferFull"
        case .badTag: "data.badTag"
        case .announceRefusedBefore: "announce.refusedBefore"
        case .beyondWindow: "data.beyondWindow"
        case .unsolicitedCookie: "cookie.unsolicited"
        case .forgedAck: "ack.forged"
        case .announceFailedBefore: "announce.failedBefore"
        case .sessionRecordStale: "session.stale"
        case .sessionRecordInvalid: "session.invalid"
        case .sessionRecordOverBudget: "session.overBudget"
        case .unauthenticatedSession: "announce.unauthenticatedSession"
        case .unauthenticatedControl: "control.unauthenticated"
        case .announceBadFragment: "announce.badFragment"
        case .announceForeignRoot: "announce.foreignRoot"
        }
    }
}

/// What a receiver counted: every drop by its reason, and the work it did.
/// Tests name the fields, so a rename breaks the build, not a string match.
public struct ReceiverStats: Sendable, Equatable {
    public var drops = Tally<ReceiverDrop>()
    /// Datagrams that did not parse, by the parser's code.
    public var malformed = Tally<WireFormatError.Code>()
    /// Announced envelopes whose signatures or manifest were refused, by code.
    public var announcesRejected = Tally<BundleError.Code>()
    /// Offers the device declined, by the reason it sent the sender (P-4).
    public var offersDeclined = Tally<Status.Reason>()
    public var sent = Tally<Datagram.Kind>()

    // Per datagram: fields, not tallies (the hot path).
    public var acceptedPayloadSymbols: UInt64 = 0
    public var acceptedAuthSymbols: UInt64 = 0
    public var duplicateSymbols: UInt64 = 0
    /// Symbols of blocks already verified (repair others asked for).
    public var symbolsOfDoneBlocks: UInt64 = 0

    public var payloadBlocks: UInt64 = 0
    public var authBlocks: UInt64 = 0
    public var repairedPayloadBlocks: UInt64 = 0
    public var repairedAuthBlocks: UInt64 = 0
    /// Rebuilt blocks whose rebuilt symbols failed their tags (B-14): cleared, asked again.
    public var rebuiltTagFailures: UInt64 = 0
    /// Incomplete blocks moved to the spill when the memory budget was full (P-5a).
    public var blocksSpilled: UInt64 = 0

    public var segmentsVerified: UInt64 = 0
    public var segmentFailures: UInt64 = 0
    public var segmentsEvicted: UInt64 = 0
    public var segmentsReloaded: UInt64 = 0
    public var segmentReloadFailures: UInt64 = 0

    public var offers: UInt64 = 0
    public var joins: UInt64 = 0
    public var sessionSwitches: UInt64 = 0
    public var resumedPayloadBlocks: UInt64 = 0
    public var preJoinReplayed: UInt64 = 0
    /// REGISTERs sent for a session whose announce was missed (P-3a).
    public var hellos: UInt64 = 0
    /// COOKIEs taken (P-30).
    public var cookiesReceived: UInt64 = 0
    /// Signature checks made on announced envelopes (Specs/bundle.md B-8a).
    public var signatureChecks: UInt64 = 0
    /// NACK firings put off because the second's NACKs were spent (P-19b).
    public var nacksDeferredPerSecond: UInt64 = 0
    /// Signed SESSION records taken (P-31).
    public var sessionRecords: UInt64 = 0

    public var nackEntries: UInt64 = 0
    public var nacksCancelled: UInt64 = 0
    public var nackEntriesCoveredByPromise: UInt64 = 0
    public var nackEntriesDeferredUntilSegment: UInt64 = 0
    public var closesHeard: UInt64 = 0
    /// Final STATUS repeats ended by a CLOSE and quiet instead of an ACK (P-21).
    public var finalStatusEndedByClose: UInt64 = 0

    public init() {}

    /// Every datagram dropped on arrival, by name, without the duplicates, the
    /// symbols of done blocks and those after the transfer (which repair for other
    /// receivers produces): what a progress line shows as "rejected".
    public var rejections: [(name: String, count: UInt64)] {
        drops.nonZero.filter { $0.key != .notReceiving }.map { ($0.key.tallyName, $0.count) }
            + malformed.nonZero.map { ("parse.\($0.key.tallyName)", $0.count) }
            + announcesRejected.nonZero.map { ("announce.\($0.key.tallyName)", $0.count) }
    }

    /// Every non-zero counter by name, for `--counters` and failure messages.
    public var named: [(name: String, count: UInt64)] {
        var all = rejections.map { ("dropped." + $0.name, $0.count) }
        if drops[.notReceiving] > 0 { all.append(("dropped.\(ReceiverDrop.notReceiving.tallyName)", drops[.notReceiving])) }
        all += offersDeclined.nonZero.map { ("declined.\($0.key.tallyName)", $0.count) }
        all += sent.nonZero.map { ("sent.\($0.key.tallyName)", $0.count) }
        let fields: [(String, UInt64)] = [
            ("accepted.payload", acceptedPayloadSymbols), ("accepted.auth", acceptedAuthSymbols),
            ("dropped.data.duplicate", duplicateSymbols), ("dropped.data.blockDone", symbolsOfDoneBlocks),
            ("blocks.payload", payloadBlocks), ("blocks.auth", authBlocks), ("blocks.repaired", repairedPayloadBlocks),
            ("blocks.authRepaired", repairedAuthBlocks), ("blocks.rebuiltTagFailures", rebuiltTagFailures), ("blocks.spilled", blocksSpilled),
            ("segments.verified", segmentsVerified), ("segments.failed", segmentFailures), ("segments.evicted", segmentsEvicted),
            ("segments.reloaded", segmentsReloaded), ("segments.reloadFailed", segmentReloadFailures),
            ("offers", offers), ("joined", joins), ("session.switched", sessionSwitches),
            ("resumed.payloadBlocks", resumedPayloadBlocks), ("preJoin.replayed", preJoinReplayed), ("hello", hellos), ("cookies", cookiesReceived), ("signatureChecks", signatureChecks), ("nacks.deferredPerSecond", nacksDeferredPerSecond), ("sessionRecords", sessionRecords),
            ("nack.entries", nackEntries), ("nack.cancelled", nacksCancelled), ("nack.coveredByPromise", nackEntriesCoveredByPromise),
            ("nack.deferredUntilSegment", nackEntriesDeferredUntilSegment), ("close.heard", closesHeard),
            ("status.closedBeforeAck", finalStatusEndedByClose),
        ]
        all += fields.filter { $0.1 > 0 }
        return all.sorted { $0.0 < $1.0 }
    }

    /// Sums two receivers' counts (the simulator reports a fleet's).
    public static func + (a: Self, b: Self) -> Self {
        var s = a
        s.drops = a.drops + b.drops; s.malformed = a.malformed + b.malformed
        s.announcesRejected = a.announcesRejected + b.announcesRejected; s.offersDeclined = a.offersDeclined + b.offersDeclined
        s.sent = a.sent + b.sent
        s.acceptedPayloadSymbols += b.acceptedPayloadSymbols; s.acceptedAuthSymbols += b.acceptedAuthSymbols
        s.duplicateSymbols += b.duplicateSymbols; s.symbolsOfDoneBlocks += b.symbolsOfDoneBlocks
        s.payloadBlocks += b.payloadBlocks; s.authBlocks += b.authBlocks
        s.repairedPayloadBlocks += b.repairedPayloadBlocks; s.repairedAuthBlocks += b.repairedAuthBlocks
        s.rebuiltTagFailures += b.rebuiltTagFailures; s.blocksSpilled += b.blocksSpilled
        s.segmentsVerified += b.segmentsVerified; s.segmentFailures += b.segmentFailures; s.segmentsEvicted += b.segmentsEvicted
        s.segmentsReloaded += b.segmentsReloaded; s.segmentReloadFailures += b.segmentReloadFailures
        s.offers += b.offers; s.joins += b.joins; s.sessionSwitches += b.sessionSwitches
        s.resumedPayloadBlocks += b.resumedPayloadBlocks; s.preJoinReplayed += b.preJoinReplayed; s.hellos += b.hellos; s.cookiesReceived += b.cookiesReceived; s.signatureChecks += b.signatureChecks; s.nacksDeferredPerSecond += b.nacksDeferredPerSecond; s.sessionRecords += b.sessionRecords
        s.nackEntries += b.nackEntries; s.nacksCancelled += b.nacksCancelled
        s.nackEntriesCoveredByPromise += b.nackEntriesCoveredByPromise; s.nackEntriesDeferredUntilSegment += b.nackEntriesDeferredUntilSegment
        s.closesHeard += b.closesHeard; s.finalStatusEndedByClose += b.finalStatusEndedByClose
        return s
    }
}

extension ReceiverStats: CustomStringConvertible {
    public var description: String { named.map { "\($0.name)=\($0.count)" }.joined(separator: " ") }
}

/// Why a sender dropped a feedback datagram it parsed (Specs/protocol.md P-13).
public enum SenderDrop: Int, TallyKey {
    case otherSession, fromSender, receiverTableFull, nackRateLimited, nackEntryRange, nackEntryNotSent
    /// P-30: feedback without the cookie and address its receiver registered with; a
    /// REGISTER for an ID live at another address; over the per-address cap; COOKIE
    /// replies beyond their rate.
    case unbound, receiverIDCollision, receiversPerAddress, cookieRateLimited

    public var tallyName: String {
        switch self {
        case .unbound: "unbound"
        case .receiverIDCollision: "receiverIDCollision"
        case .receiversPerAddress: "receiversPerAddress"
        case .cookieRateLimited: "cookieRateLimited"
        case .nackEntryNotSent: "nackEntryNotSent"
        case .otherSession: "otherSession"
        case .fromSender: "fromSender"
        case .receiverTableFull: "receiverTableFull"
        case .nackRateLimited: "nackRateLimited"
        case .nackEntryRange: "nackEntryRange"
        }
    }
}

/// What a sender counted and sent. Bytes count the UDP payload plus 28 bytes
/// of IPv4 and UDP header per datagram.
public struct SenderStats: Sendable, Equatable {
    public var drops = Tally<SenderDrop>()
    public var malformed = Tally<WireFormatError.Code>()
    public var closes = Tally<Close.Reason>()

    public var sourceDatagrams: UInt64 = 0
    public var repairDatagrams: UInt64 = 0
    public var controlDatagrams: UInt64 = 0
    public var sourceBytes: UInt64 = 0
    public var repairBytes: UInt64 = 0
    public var controlBytes: UInt64 = 0
    public var feedbackBytes: UInt64 = 0

    public var announces: UInt64 = 0
    public var nacks: UInt64 = 0
    /// NACK entries for needs this round's repair already covered.
    public var nackEntriesAlreadyServed: UInt64 = 0
    public var nackEpochs: UInt64 = 0
    /// Repair symbols queued for NACKs during the first pass (round 0), and in later rounds.
    public var repairQueuedFirstPass: UInt64 = 0
    public var repairQueuedInRounds: UInt64 = 0
    /// Of those, the P-11a margin.
    public var repairMargin: UInt64 = 0
    public var roundsBusy: UInt64 = 0
    public var roundsIdle: UInt64 = 0
    public var receiversRegistered: UInt64 = 0
    /// P-30a: receivers that registered again from a new address after the old went silent.
    public var receiversRebound: UInt64 = 0
    public var cookiesSent: UInt64 = 0
    /// SESSION records signed and sent (P-31).
    public var sessionRecords: UInt64 = 0
    public var receiversReceived: UInt64 = 0
    public var receiversVerified: UInt64 = 0
    public var receiversFailed: UInt64 = 0

    public init() {}

    public var dataDatagrams: UInt64 { sourceDatagrams + repairDatagrams }
    public var dataBytes: UInt64 { sourceBytes + repairBytes }
    public var rounds: UInt64 { roundsBusy + roundsIdle }

    /// Every non-zero counter by name, for `--counters`.
    public var named: [(name: String, count: UInt64)] {
        var all = drops.nonZero.map { ("dropped.\($0.key.tallyName)", $0.count) }
        all += malformed.nonZero.map { ("dropped.parse.\($0.key.tallyName)", $0.count) }
        all += closes.nonZero.map { ("close.\($0.key.tallyName)", $0.count) }
        let fields: [(String, UInt64)] = [
            ("sent.source", sourceDatagrams), ("sent.repair", repairDatagrams), ("sent.control", controlDatagrams),
            ("announces", announces), ("nacks", nacks), ("nackEntriesAlreadyServed", nackEntriesAlreadyServed), ("nackEpochs", nackEpochs),
            ("repair.queued.firstPass", repairQueuedFirstPass), ("repair.queued.rounds", repairQueuedInRounds), ("repair.margin", repairMargin),
            ("rounds.busy", roundsBusy), ("rounds.idle", roundsIdle), ("receivers.registered", receiversRegistered),
            ("receivers.rebound", receiversRebound), ("cookies", cookiesSent), ("sessionRecords", sessionRecords),
            ("receivers.received", receiversReceived), ("receivers.verified", receiversVerified), ("receivers.failed", receiversFailed),
        ]
        all += fields.filter { $0.1 > 0 }
        return all.sorted { $0.0 < $1.0 }
    }
}

extension SenderStats: CustomStringConvertible {
    public var description: String { named.map { "\($0.name)=\($0.count)" }.joined(separator: " ") }
}
