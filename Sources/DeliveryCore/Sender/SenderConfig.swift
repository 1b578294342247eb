import BundleFormat
import FleetCrypto
import WireFormat

/// How a sender behaves; every limit has a name and a default (Specs/protocol.md §6).
public struct SenderConfig: Sendable {
    public var session: SessionID
    /// Bytes per second on the wire (UDP payload plus 28 bytes of IPv4/UDP header).
    public var rateBytesPerSecond: Double
    /// The token bucket's depth in sending time (Specs/protocol.md P-9): how late a
    /// driver may wake and still catch up. Tokens beyond it are lost, so a depth shorter
    /// than the host's wake-up latency costs rate: at a gigabit in the lab, 0.19 ms (16
    /// datagrams) delivered 90% of the rate, 0.75 ms 95%, 3 ms all of it; with 16
    /// CPU-bound receivers on the same 2 cores, 3 ms delivered 86% and 10 ms 93%.
    public var burstDuration = Interval.milliseconds(10)
    /// The depth in datagrams is `burstDuration` of the rate within these bounds.
    public static let burstDatagramCountMin = 16
    public static let burstDatagramCountMax = 1024
    /// A second, shallow bucket (`peakBurstDatagramCount` deep) fills at this multiple of
    /// the rate: catching up after a late wake-up goes at most this much faster than the
    /// rate, in trains of at most 64 datagrams, instead of as one burst of the deep
    /// bucket that overflows the queues of a fast path (Specs/protocol.md P-9).
    public var peakRateFactor = 1.5
    public static let peakBurstDatagramCount = 64
    public var repairShareMax = 0.5
    public var proactiveRepairFraction = 0.05
    /// Specs/protocol.md P-11a: repair served in a round after the first pass adds this
    /// fraction of the need, rounded up (so at least one symbol), against its own loss.
    public var roundRepairMarginFraction = 0.05
    /// Proactive repair for the auth chain (1.5% of the data, and every payload
    /// symbol waits for it): up to the repair ceiling.
    public var authProactiveRepairFraction = 1.0
    public var interleaveWindow = 8
    public var grttInitial = Interval.milliseconds(10)
    public var grttMin = Interval(microseconds: 500)
    public var grttMax = Interval.seconds(1)
    /// Must match the receivers' backoff (they use `backoffGRTTs` x the announced GRTT).
    public var backoffGRTTs = 4.0
    public var nackWindowGRTTs = 2.0
    public var idleRoundsMax = 5
    /// Rounds after `idleRoundsMax` idle ones (the sender only waits, P-12) last at least
    /// this long: one POLL per interval instead of one every few GRTTs.
    public var waitingRoundInterval = Interval.milliseconds(100)
    /// A receiver not heard from for this long is gone; until then idle rounds do not end the session.
    public var receiverSilenceMax = Interval.seconds(3)
    /// A receiver that reported every block in (`received`: step 2 finishing) may be
    /// silent this long before it is gone (Specs/protocol.md P-12). Its last step-2
    /// work is a few calls it cannot interrupt to report: the fsync of a large slot or
    /// staging file and the read-back of every slot (1 GiB: 3 s in the lab, longer on
    /// flash), so `receiverSilenceMax` would take a busy device for a lost one.
    public var stepTwoSilenceMax = Interval.seconds(30)
    public var announceInterval = Interval.seconds(1)
    public var announceStartCopies = 3
    /// The announce is also repeated after this many data datagrams.
    public var announceEveryDataDatagrams = 256
    /// Least time between announces sent early for receivers that missed one.
    public var announceHoldoff = Interval.milliseconds(20)
    /// Least time between two early announces (Specs/protocol.md P-3a): however many
    /// receivers ask, or claim to (forged REGISTERs), the group hears at most four a second
    /// beyond the regular ones.
    public var earlyAnnounceIntervalMin = Interval.milliseconds(250)
    public var receiverTableSizeMax = 4096
    public var nackPerReceiverPerRoundMax = 16
    /// Specs/protocol.md P-19a: in the first pass, NACK budgets and served needs
    /// start afresh every `nackEpochBlocks(for:)` payload blocks, so that a long
    /// pass is repaired as it goes instead of at its end. Set, this count replaces it
    /// (sender and receivers must agree).
    public var nackEpochBlocks: Int?
    /// The payload bytes of an epoch: 256 blocks of the compact 64 x 1400 profile
    /// (about 0.18 s of a gigabit stream), 81 of the default profile's.
    public static let nackEpochByteCount = 256 * 64 * 1400
    /// Blocks per NACK epoch for a profile (P-19a): sender and receivers compute the same.
    public static func nackEpochBlocks(for profile: TransportProfile) -> Int {
        max(1, nackEpochByteCount / profile.blockByteCount)
    }
    /// What the session waits for from every receiver before it closes "all done"
    /// (Specs/agent.md §6): step 2's verdict (`verified`, plain receivers), or a
    /// device agent's `installed` or `confirmed` (after its reboot and health check).
    public enum Await: String, Sendable, CaseIterable { case verified, installed, confirmed }
    public var await: Await = .verified
    /// Awaiting beyond verified, a verified device may be silent this long (rebooting)
    /// before idle rounds may end the session; the deadline still bounds it.
    public var awaitSilenceMax = Interval.seconds(120)
    public var closeRepeatCount = 3
    public var carousel = false
    /// Ends the session this long after the first transmission. Nil: the default
    /// limit, `defaultDeadline(...)` (Specs/protocol.md P-12b).
    public var deadline: Interval?
    /// P-12b: a session without a deadline of its own ends after this much time plus
    /// `defaultDeadlineTransferFactor` times its nominal transfer time at the rate, so that
    /// no feedback (forged or not) keeps a sender sending for ever.
    public static let defaultDeadlineBase = Interval.seconds(600)
    public static let defaultDeadlineTransferFactor = 20.0
    /// The default session limit for objects of `objectBytes` in symbols of `symbolBytes`
    /// at `rateBytesPerSecond` (wire bytes: DATA header and IPv4/UDP header added).
    public static func defaultDeadline(objectBytes: UInt64, symbolBytes: Int, rateBytesPerSecond: Double) -> Interval {
        let wire = Double(objectBytes) * Double(symbolBytes + DataSymbol.headerByteCount + 28) / Double(symbolBytes)
        let seconds = defaultDeadlineBase.seconds + defaultDeadlineTransferFactor * wire / rateBytesPerSecond
        return Interval.seconds(min(seconds, 100 * 365 * 86_400))
    }
    /// P-13b: how many of its latest POLLs' sent-at values the sender remembers; a NACK's
    /// echo counts as a round-trip sample only if it is one of them.
    public static let pollEchoesRememberedMax = 8
    /// P-13b: within a round the GRTT estimate rises at most to this multiple of its
    /// value when the round began, whatever a sample says.
    public static let grttGrowthPerRoundMax = 2.0
    /// If set, "all done" also needs this many registered receivers, and idle rounds
    /// wait up to `expectedReceiverWaitMax` after the last new one for the rest.
    public var expectedReceivers: Int?
    /// How long idle rounds wait, after the last new receiver, for expected receivers
    /// still unheard (Specs/protocol.md P-12). Longer than `receiverSilenceMax`: a
    /// receiver can hear the whole transfer while its feedback waits for the address
    /// resolution of the sender (an ARP reply lost on a lossy link costs a second,
    /// three lost ones three seconds and a new attempt).
    public var expectedReceiverWaitMax = Interval.seconds(10)
    /// Bytes of blocks kept read (k x T) and, once repair is asked of them, encoded
    /// (R x T more), for blocks in the window and under repair: 64 blocks of the old
    /// 64 + 32 symbols of 1400 bytes.
    public var blockCacheBytesMax = 64 * 96 * 1400

    /// Specs/protocol.md P-30: the key of this session's feedback cookies, random per
    /// session and never sent (the driver draws it; the simulator seeds it).
    public var cookieSecret: [UInt8]
    public static let cookieSecretByteCountMin = 16
    /// A cookie in a REGISTER is accepted for its epoch of this length and the one after.
    public var cookieLifetime = Interval.seconds(60)
    /// COOKIE replies a second, at most: one per REGISTER (or unbound feedback), so a
    /// spoofed flood makes the sender a reflector of bounded rate and no amplification.
    public var cookieRepliesPerSecondMax = 1000
    /// Receivers registered from one address (one host; many on loopback in tests).
    public var receiversPerAddressMax = 64

    /// Specs/protocol.md §3.10, P-31: the sender key a vendor delegated and its
    /// delegation, and the POLL chain's last value (random); nil: an unauthenticated
    /// session (a lab's keyless sender).
    public var authentication: SenderAuthentication?
    /// Where receivers send feedback, named in ANNOUNCE and SESSION; nil: "the source
    /// of the announce" (unauthenticated sessions only: a signed record must name it,
    /// or a replay from a spoofed source could aim feedback elsewhere).
    public var feedbackAddress: PeerAddress?
    /// The POLL chain's length: no session has more rounds (P-31).
    public static let pollChainLength = 65_536

    public init(session: SessionID, rateBytesPerSecond: Double, cookieSecret: [UInt8]) {
        precondition(cookieSecret.count >= Self.cookieSecretByteCountMin, "a cookie secret of at least 16 random bytes")
        self.session = session
        self.rateBytesPerSecond = rateBytesPerSecond
        self.cookieSecret = cookieSecret
    }
}


/// What an authenticated sender holds (Specs/protocol.md P-31): its delegated key and
/// the vendor's delegation of it, and the random last value of its POLL chain.
public struct SenderAuthentication: Sendable {
    public let key: PrivateKey
    public let delegation: [UInt8]
    public let chainLast: [UInt8]
    public init(key: PrivateKey, delegation: [UInt8], chainLast: [UInt8]) {
        precondition(chainLast.count == SessionRecord.chainValueByteCount, "a chain value is 32 bytes")
        self.key = key; self.delegation = delegation; self.chainLast = chainLast
    }
}
