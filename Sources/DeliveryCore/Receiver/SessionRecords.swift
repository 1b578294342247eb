import BundleFormat
import FleetCrypto
import WireFormat

/// Whether a receiver takes sessions whose sender did not sign a SESSION record
/// (Specs/protocol.md §3.10, P-31).
public enum SessionAuthentication: String, Sendable, CaseIterable {
    /// Signed sessions are authenticated; unsigned ones are taken too, and said to be
    /// unauthenticated (a lab's keyless sender).
    case optional
    /// Only sessions whose SESSION record a delegated sender key signed.
    case required
}

/// The POLL chain (Specs/protocol.md P-31): value(r - 1) = SHA-256("fleetcast poll
/// chain" ‖ value(r)). The sender draws the last value at random and signs value(0)
/// in its SESSION record; POLL of round r discloses value(r) and CLOSE the next one,
/// so a receiver checks either with a few hashes, and nobody but the sender can
/// make one for a round not yet disclosed (TESLA's idea, RFC 4082, without its delay:
/// what a disclosed value cannot vouch for, the POLL's timing fields, is clamped).
public enum PollChain {
    public static let context = Array("fleetcast poll chain".utf8)

    public static func step(_ value: [UInt8]) -> [UInt8] {
        context.withUnsafeBytes { c in value.withUnsafeBytes { SHA256.hash(c, $0) } }
    }

    /// Whether `value` hashes to `known` in exactly `steps` steps.
    public static func leads(_ value: [UInt8], steps: UInt32, to known: [UInt8]) -> Bool {
        var v = value
        for _ in 0..<steps { v = step(v) }
        return v == known
    }

    /// Every value from round 0 (the anchor) to `length`, from a random last value.
    public static func values(length: Int, last: [UInt8]) -> Values { Values(length: length, last: last) }

    /// The values in one flat buffer of 32-byte slots: 65,537 of them are 2 MiB, and
    /// making them takes one hash each and no allocation per value.
    public struct Values: Sendable {
        private let storage: [UInt8]
        public let length: Int
        static let width = SessionRecord.chainValueByteCount

        init(length: Int, last: [UInt8]) {
            precondition(length >= 1 && last.count == Self.width)
            self.length = length
            var s = [UInt8](repeating: 0, count: (length + 1) * Self.width)
            s.replaceSubrange((length * Self.width)..<((length + 1) * Self.width), with: last)
            PollChain.context.withUnsafeBytes { c in
                s.withUnsafeMutableBytes { buffer in
                    for r in stride(from: length, to: 0, by: -1) {
                        let next = UnsafeRawBufferPointer(rebasing: buffer[(r * Self.width)..<((r + 1) * Self.width)])
                        let value = SHA256.hash(c, next)
                        UnsafeMutableRawBufferPointer(rebasing: buffer[((r - 1) * Self.width)..<(r * Self.width)]).copyBytes(from: value)
                    }
                }
            }
            storage = s
        }

        public subscript(round: Int) -> [UInt8] { Array(storage[(round * Self.width)..<((round + 1) * Self.width)]) }
    }
}

/// What a receiver knows of the signed SESSION records it heard (P-31): per session,
/// the newest record, the sender key its delegation names, and how far the POLL
/// chain has been verified. Bounded in sessions, delegations, failures and checks.
struct SessionRecords {
    struct Known {
        var record: SessionRecord
        let senderKey: PublicKey
        let delegation: SenderDelegation
        /// The latest chain round verified, and its value.
        var chainRound: UInt32
        var chainValue: [UInt8]
        var lastUsedAt: Instant
    }

    private(set) var known: [SessionID: Known] = [:]
    /// Delegations already verified, by their encoding.
    private var delegations: [[UInt8]: (SenderDelegation, PublicKey)] = [:]
    /// Hashes of records whose signature or delegation failed (not checked again).
    private var failed: [[UInt8]] = []
    /// When the last signature checks were made (at most `checksPerSecondMax` in a second).
    private var checkTimes: [Instant] = []

    /// Named limits: sessions and delegations remembered, failed records remembered,
    /// signature checks a second (a flood of forged records costs that much at most),
    /// and the most chain steps one POLL or CLOSE may take (a receiver that missed more
    /// POLLs catches up from the next record).
    static let sessionsMax = 8
    static let delegationsMax = 4
    static let failedMax = 64
    static let checksPerSecondMax = 20
    static let chainGapMax: UInt32 = 64

    func record(for session: SessionID) -> Known? { known[session] }

    enum Outcome { case taken, stale, failed, overBudget }

    /// A SESSION record heard at `now`: its delegation (by a trusted key) and its signature
    /// (by the delegated key) verified, it becomes what the receiver knows of its session,
    /// unless it knows a newer one.
    mutating func take(_ r: SessionRecord, trust: TrustPolicy, at now: Instant, stats: inout ReceiverStats) -> Outcome {
        if var k = known[r.session] {
            guard r.number > k.record.number else { return .stale }
            // P-31a: once a session's record is verified, a later one says nothing new but its
            // number and chain: any other field changed is a forgery, and a newer chain value
            // that hashes to the known one proves itself. No signature check, so forged
            // records cannot spend the budget of a session already known.
            guard r.hasSameBinding(as: k.record) else { return .failed }
            if r.chainRound < k.chainRound { return .stale }
            let gap = r.chainRound - k.chainRound
            if gap <= Self.chainGapMax {
                guard PollChain.leads(r.chainValue, steps: gap, to: k.chainValue) else { return .failed }
                k.record = r
                k.chainRound = r.chainRound
                k.chainValue = r.chainValue
                k.lastUsedAt = now
                known[r.session] = k
                return .taken
            }
            // Too far ahead to hash: the signature decides, as for a first record.
        }
        let datagramHash = SHA256.hash(r.signedBytes + r.signature)
        if failed.contains(datagramHash) { return .failed }
        while let first = checkTimes.first, now >= first + .seconds(1) { checkTimes.removeFirst() }
        guard checkTimes.count < Self.checksPerSecondMax else { return .overBudget }
        let delegation: SenderDelegation, senderKey: PublicKey
        if let d = delegations[r.delegation] {
            (delegation, senderKey) = (d.0, d.0.senderKey)
        } else {
            checkTimes.append(now)
            stats.signatureChecks += 1
            guard let d = try? SenderDelegation(untrusted: r.delegation), (try? d.verified(by: trust)) != nil else {
                noteFailed(datagramHash)
                return .failed
            }
            if delegations.count >= Self.delegationsMax { delegations.removeAll() }
            delegations[r.delegation] = (d, d.senderKey)
            (delegation, senderKey) = (d, d.senderKey)
        }
        checkTimes.append(now)
        stats.signatureChecks += 1
        guard senderKey.verify(signature: r.signature, for: r.signedBytes) else {
            noteFailed(datagramHash)
            return .failed
        }
        var k = known[r.session] ?? Known(record: r, senderKey: senderKey, delegation: delegation, chainRound: r.chainRound,
                                           chainValue: r.chainValue, lastUsedAt: now)
        k.record = r
        k.lastUsedAt = now
        // The record discloses the latest POLL's value: a receiver that missed POLLs resumes there.
        if r.chainRound > k.chainRound || known[r.session] == nil { k.chainRound = r.chainRound; k.chainValue = r.chainValue }
        if known[r.session] == nil, known.count >= Self.sessionsMax,
           let oldest = known.min(by: { $0.value.lastUsedAt < $1.value.lastUsedAt })?.key {
            known[oldest] = nil
        }
        known[r.session] = k
        return .taken
    }

    /// Whether `value` is the chain's value of `round` for `session`: a round after the
    /// latest verified (or that round itself, repeated), at most `chainGapMax` beyond it.
    /// A verified later round becomes the latest.
    mutating func verifyChain(_ session: SessionID, round: UInt32, value: [UInt8], at now: Instant) -> Bool {
        guard var k = known[session], round <= k.record.chainLastRound else { return false }
        if round == k.chainRound { return value == k.chainValue }
        guard round > k.chainRound, round - k.chainRound <= Self.chainGapMax else { return false }
        guard PollChain.leads(value, steps: round - k.chainRound, to: k.chainValue) else { return false }
        k.chainRound = round
        k.chainValue = value
        k.lastUsedAt = now
        known[session] = k
        return true
    }

    private mutating func noteFailed(_ hash: [UInt8]) {
        if failed.count >= Self.failedMax { failed.removeFirst() }
        failed.append(hash)
    }
}

extension SessionRecord {
    /// The same session, feedback address, window, envelope, chain length and delegation:
    /// what a sender never changes within a session.
    func hasSameBinding(as k: SessionRecord) -> Bool {
        session == k.session && carousel == k.carousel && feedbackFamily == k.feedbackFamily && feedbackPort == k.feedbackPort
            && feedbackAddress == k.feedbackAddress && interleaveWindow == k.interleaveWindow && envelopeLength == k.envelopeLength
            && envelopeRoot == k.envelopeRoot && chainLastRound == k.chainLastRound && delegation == k.delegation
    }

    /// Where feedback of this session goes (the record's word, not an announce's).
    func feedbackDestination(source: PeerAddress) -> PeerAddress {
        Announce.feedbackDestination(feedbackFamily, feedbackAddress, feedbackPort, source: source)
    }
}
