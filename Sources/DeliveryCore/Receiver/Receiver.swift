import BundleFormat
import ErasureCoding
import FleetCrypto
import SeededRandom
import WireFormat

/// How a receiver behaves; every limit has a name and a default (Specs/protocol.md §6).
public struct ReceiverConfig: Sendable {
    public var receiverID: ReceiverID
    public var deviceID: String
    public var installedVersion: String
    /// Reported in REGISTER (Specs/protocol.md §3.5); the offer's judge checks it.
    public var installedSequence: UInt64
    /// Whose signatures an announce must carry before it becomes an offer, and whose
    /// delegation a sender key must carry to sign SESSION records (P-31).
    public var trust: TrustPolicy
    /// Whether sessions without a signed SESSION record are taken (Specs/protocol.md P-31a).
    public var sessionAuthentication = SessionAuthentication.optional
    /// Seeds the NACK backoff.
    public var seed: UInt64
    /// Incomplete blocks tracked (bitmaps: about 200 bytes each); beyond it, symbols of new blocks are dropped.
    public var blocksInFlightMax = 65_536
    /// Bytes of incomplete blocks kept in memory (k x T each); older blocks go to the
    /// spill (Specs/protocol.md P-5a). 96 blocks of 64 x 1400 bytes: about 70 ms of a
    /// gigabit stream, whatever the profile's block size.
    public var blockBytesInMemoryMax = 96 * 64 * 1400
    /// A count that replaces the byte budget (tests force spilling with it).
    public var blocksInMemoryMax: Int?
    /// Whatever the budget, this many blocks may be hot (the interleave window fits).
    public static let blocksInMemoryMin = 8
    /// Specs/protocol.md P-17c: in an unauthenticated session, blocks beyond the genuine
    /// data seen are asked for after a POLL only once no genuine DATA has come for twice
    /// the GRTT, for `beyondDataQuietGaps` mean gaps between genuine symbols (a sender in
    /// its pass sends on; eight losses in a row at 30% loss happen once in 15,000 gaps),
    /// and for at least `beyondDataQuietMin`.
    public static let beyondDataQuietGaps = 8.0
    public static let beyondDataQuietMin = Interval.milliseconds(2)
    /// Bytes of verified auth-chain segments kept in memory (Specs/protocol.md P-5c).
    /// Beyond it, with an `AuthChainReader`, the least recently used segment whose
    /// bytes are staged leaves memory and is read back (and hashed again) when a
    /// symbol of its blocks arrives. 15 segments of the default profile (one 280 KB
    /// block each, Specs/bundle.md §7.4; 4.2 MB), where a 1 GiB payload's whole chain
    /// is 16.3 MB and a 4 GiB one's 65 MB.
    public var segmentBytesInMemoryMax = 15 * 280_000
    public var unauthenticatedSymbolCountMax = 1024
    public var backoffGRTTs = 4.0
    public var nackDatagramsPerRoundMax = 8
    /// Specs/protocol.md P-19b: NACK datagrams in any one second, however many rounds
    /// begin in it (577 forged POLLs had drawn 2,791 NACKs from one receiver).
    public var nackDatagramsPerSecondMax = 100
    /// Specs/protocol.md P-18a: a repair promise lapses after this many GRTTs without
    /// DATA of its block.
    public var repairPromiseLifetimeGRTTs = 2.0
    /// Specs/protocol.md P-19a: before the POLL, the NACK allowance starts again every
    /// `SenderConfig.nackEpochBlocks(for:)` payload blocks the sender moves on, as the
    /// sender's does. Set, this count replaces it (tests; the sender must agree).
    public var nackEpochBlocks: Int?
    public var statusRepeatMax = 10
    public var statusInterval = Interval.seconds(1)
    public var inactivityTimeout = Interval.seconds(5)
    /// A receiver moves to another session of the same bundle only after its own has been silent this long.
    public var sessionSwitchQuiet = Interval.seconds(1)
    /// CLOSE is not authenticated: it ends a session still receiving only after this long
    /// (or 8 GRTT, if longer) without genuine data or POLL from the session (Specs/protocol.md P-13a).
    public var closeConfirmQuiet = Interval.seconds(1)
    /// Payload bytes verified between progress commits (and at completion): 64 blocks
    /// of the compact 64 x 1400 profile, 20 of the default's; at least one block.
    public var commitByteCount = 64 * 64 * 1400
    /// A block count that replaces the byte interval (the simulator commits often).
    public var commitBlockCount: Int?

    public init(receiverID: ReceiverID, deviceID: String, installedVersion: String, installedSequence: UInt64,
                trust: TrustPolicy, seed: UInt64) {
        self.receiverID = receiverID; self.deviceID = deviceID; self.installedVersion = installedVersion
        self.installedSequence = installedSequence; self.trust = trust; self.seed = seed
    }
}

/// What a receiver has made durable (Specs/protocol.md P-20).
public struct ProgressJournal: Sendable, Equatable {
    /// The signed manifest the blocks belong to.
    public var envelope: [UInt8]
    public var authBlocks: [Int]
    public var payloadBlocks: [Int]
    public init(envelope: [UInt8], authBlocks: [Int], payloadBlocks: [Int]) {
        self.envelope = envelope; self.authBlocks = authBlocks; self.payloadBlocks = payloadBlocks
    }
}

/// What a restarted receiver is given: its last journal, and the bytes of the
/// auth-chain blocks it lists (read back from staging by the driver).
public struct ResumeState: Sendable {
    public var progress: ProgressJournal
    public var authBlockBytes: [Int: [UInt8]]
    public init(progress: ProgressJournal, authBlockBytes: [Int: [UInt8]]) { self.progress = progress; self.authBlockBytes = authBlockBytes }
}

/// A validly signed announce, waiting for the device's answer (Specs/protocol.md
/// P-3c). Nothing of the session is staged until the device accepts it.
public struct Offer: Sendable {
    public let session: SessionID
    /// Signatures verified against the trust policy; the device's policy not yet judged.
    public let manifest: SignedManifest
    public let envelope: [UInt8]
    public let carousel: Bool
    /// Where feedback for this session goes: the address the announce names, or its source.
    public let sender: PeerAddress
    /// Whether the receiver was given a journal of this very envelope (accepting resumes it).
    public let resumes: Bool
    /// The announce that completed the envelope: the session's timing and window.
    let announce: Announce
    /// The delegation of the key that signed the session's SESSION record (P-31): the
    /// session is authenticated. Nil: an unauthenticated session (a keyless sender).
    public let senderDelegation: SenderDelegation?
}

/// Step 2's outcome, which the device reports once the transfer is complete
/// (Specs/protocol.md P-21): the sender hears "complete" only for a verified update.
public enum Verdict: Sendable, Equatable {
    case verified
    case failed(Status.Reason, String)
}

/// What the receiver asks of its driver, in order. Each is carried out before
/// the next call into the receiver; storage reports back with `handleStored`
/// or `handleStorageFailure`.
public enum ReceiverAction: Sendable {
    /// Judge this offer, then `accept` or `decline` it.
    case offer(Offer)
    /// Write these bytes (exact, unpadded) at `offset` of the object's staging file,
    /// then call `handleStored(object, block:)`.
    case store(object: ObjectID, block: Int, offset: UInt64, bytes: [UInt8])
    /// Make every stored byte durable, then record this journal atomically.
    case commit(ProgressJournal)
    /// Every block is verified and committed: finish step 2, then `handleVerdict`.
    case verify
    /// The session failed before its transfer completed; the sender is told why.
    case failed(Status.Reason, String)
}

/// Step 1 as a sans-I/O state machine (Specs/protocol.md §5): datagrams, timeouts,
/// the device's answers and storage reports in; datagrams and actions out. No
/// clock, no socket, no disk.
///
/// ```
///              announce signed        accept             all blocks           verdict
/// listening ─────────────────► offered ──────► receiving ──────────► verifying ───────► complete | failed
///     ▲                          │                │                                     (STATUS until ACK)
///     └──────── decline ─────────┘                └── CLOSE + quiet / silence / storage ──► failed
/// ```
///
/// The parts live beside this file: `Listening.swift` (announces, offers, the
/// join), `Session.swift` (one joined session's data path), `SegmentStore.swift`
/// (the authentication chain), `BlockAssembly.swift` (symbols into blocks),
/// `Feedback.swift` (NACK and STATUS scheduling), `Finishing.swift` (the final
/// report).
public struct Receiver {
    public let config: ReceiverConfig
    public internal(set) var stats = ReceiverStats()
    var rng: SeededRandom
    var state: State
    /// Announce fragments and refused envelopes, kept across states (P-2, P-4).
    var intake = AnnounceIntake()
    var resume: ResumeState?
    var outgoing: [Transmit] = []
    var actions: [ReceiverAction] = []
    /// Feedback cookies per session, and feedback waiting for one (P-30).
    var cookies: CookieJar
    /// Signed SESSION records heard, and how far each POLL chain is verified (P-31).
    var records = SessionRecords()
    /// Where the symbols of incomplete blocks go once the session's `blocksInMemoryMax` blocks are held.
    let spill: SymbolSpill
    /// Reads staged auth-chain bytes back, so that segments may leave memory (P-5c); nil keeps them all.
    let authReader: AuthChainReader?

    /// The receiver's states; each case carries exactly what it needs.
    enum State {
        case listening(Listening)
        /// A signed announce awaits the device's answer.
        case offered(Listening, Offer)
        case receiving(Session)
        /// The transfer is over: the verdict, then the final STATUS until ACKed.
        case finishing(Finishing)
        /// Not a state: holds the place while a case's payload is mutated in place.
        case modifying
    }

    public init(config: ReceiverConfig, resume: ResumeState? = nil, spill: SymbolSpill = MemorySpill(), authReader: AuthChainReader? = nil) {
        self.config = config
        self.spill = spill
        self.authReader = authReader
        rng = SeededRandom(seed: config.seed)
        cookies = CookieJar(receiver: config.receiverID)
        state = .listening(Listening())
        self.resume = resume
    }

    // MARK: Queries

    /// Step 2 passed and the sender was told so (or will be, until ACKed).
    public var isComplete: Bool { if case .finishing(let f) = state, f.verdict == .verified { true } else { false } }
    public var isFailed: Bool { failure != nil }
    /// Complete or failed, and the final STATUS acknowledged (or given up on). Kept as a
    /// field, like `nextDeadline`, so that asking does not copy the state.
    public private(set) var isFinished = false
    /// Every block is in; step 2's verdict is awaited.
    public var isVerifying: Bool { if case .finishing(let f) = state, f.verdict == nil { true } else { false } }
    public var failure: (reason: Status.Reason, text: String)? {
        if case .finishing(let f) = state, case .failed(let reason, let text) = f.verdict { (reason, text) } else { nil }
    }
    /// The offer awaiting an answer, if any.
    public var pendingOffer: Offer? { if case .offered(_, let o) = state { o } else { nil } }
    /// The session joined (receiving or finishing).
    public var session: SessionID? {
        switch state {
        case .receiving(let s): s.id
        case .finishing(let f): f.id
        case .listening, .offered, .modifying: nil
        }
    }
    public var blocksDone: Int {
        switch state {
        case .receiving(let s): s.payload.doneCount
        case .finishing(let f): Int(f.report.blocksDone)
        case .listening, .offered, .modifying: 0
        }
    }
    public var nacksSent: Int {
        switch state {
        case .receiving(let s): s.feedback.nacksSent
        case .finishing(let f): Int(f.report.nacksSent)
        case .listening, .offered, .modifying: 0
        }
    }
    /// Authenticated segments whose tags are held; once finished, as many as were held
    /// when the transfer ended (Specs/protocol.md P-5b: none for a complete one).
    public var authSegmentsHeld: Int {
        switch state {
        case .receiving(let s): s.chain.segmentsHeld
        case .finishing(let f): f.segmentsHeldAtEnd
        case .listening, .offered, .modifying: 0
        }
    }
    /// The last offer this device declined, and why (a driver may give up after it).
    public private(set) var lastDecline: (reason: Status.Reason, text: String)?

    /// The earliest instant at which `handleTimeout` has something to do: the state's
    /// timer table, read when the state is put back (`put`), so that asking, once per
    /// turn of a driver's loop, copies nothing.
    public private(set) var nextDeadline: Instant?

    // MARK: Polling

    public mutating func pollTransmit() -> Transmit? { outgoing.isEmpty ? nil : outgoing.removeFirst() }
    public mutating func pollAction() -> ReceiverAction? { actions.isEmpty ? nil : actions.removeFirst() }

    // MARK: Events in

    /// A datagram from `peer` (its source address), handled at `now`. `arrivedAt`
    /// is when the host received it, if the loop knows (kernel timestamps): a
    /// POLL's hold time in the NACK then counts from there (P-25a).
    public mutating func handleDatagram(_ bytes: [UInt8], from peer: PeerAddress, at now: Instant, arrivedAt: Instant? = nil) {
        let datagram: Datagram
        do { datagram = try Datagram(parsing: bytes) } catch {
            stats.malformed.add(error.code)
            return
        }
        if case .cookie(let c) = datagram { handleCookie(c, at: now); return }
        if case .session(let r) = datagram { handleRecord(r, at: now); return }
        switch state {
        case .listening, .offered: handleUnjoined(datagram, from: peer, at: now)
        case .receiving: handleInSession(datagram, from: peer, at: now, arrivedAt: min(arrivedAt ?? now, now))
        case .finishing: handleFinishing(datagram, at: now)
        case .modifying: preconditionFailure("re-entered while the state was being changed")
        }
    }

    public mutating func handleTimeout(at now: Instant) {
        switch state {
        case .receiving:
            withSession(at: now) { s, r in r.sessionTimeout(&s, at: now) }
        case .finishing:
            var f = takeFinishing()
            f.handleTimeout(at: now, receiver: &self)
            put(f)
        case .listening, .offered: return
        case .modifying: preconditionFailure("re-entered while the state was being changed")
        }
    }

    /// The driver carried out `.store` for this block (Specs/protocol.md P-5c: only
    /// auth-chain bytes reported stored may leave memory).
    public mutating func handleStored(_ object: ObjectID, block: Int) {
        guard object == .authChain, case .receiving = state else { return }
        var s = takeSession()
        s.chain.markStored(block)
        put(s)
    }

    /// Specs/protocol.md P-29c: the driver stages payload blocks below `end` only
    /// (a window ahead of step 2, which consumes them in order); symbols of later
    /// blocks are dropped (`beyondWindow`) and those blocks are not asked for until
    /// the window reaches them. The window is opened at `accept` and only moves
    /// forward; a session accepted without one has none.
    public mutating func setPayloadWindow(end: Int, at now: Instant) {
        guard case .receiving = state else { return }
        withSession(at: now) { s, r in
            guard let old = s.payloadWindowEnd, end > old else { return }
            s.payloadWindowEnd = end
            // Blocks that came inside may be asked for now.
            r.scheduleNack(&s, at: now)
        }
    }

    /// A store or commit failed: the session fails with reason `storage`.
    public mutating func handleStorageFailure(_ text: String, at now: Instant) {
        abort(.storage, text, at: now)
    }

    /// The device gives up on the session for a reason only it can see (a step-2
    /// failure during the transfer): the sender hears it in the final STATUS.
    public mutating func abort(_ reason: Status.Reason, _ text: String, at now: Instant) {
        switch state {
        case .receiving:
            withSession(at: now) { s, _ in s.abort = (reason, text) }
        case .finishing:
            var f = takeFinishing()
            if f.verdict == nil { f.decide(.failed(reason, text), at: now, config: config) }
            put(f)
        case .listening, .offered, .modifying: return
        }
    }

    /// Step 2's verdict after `.verify` (Specs/protocol.md P-21).
    public mutating func handleVerdict(_ verdict: Verdict, at now: Instant) {
        guard case .finishing = state else { preconditionFailure("a verdict before the transfer completed") }
        var f = takeFinishing()
        precondition(f.verdict == nil, "the verdict is given once")
        f.decide(verdict, at: now, config: config)
        put(f)
    }

    // MARK: Plumbing

    /// Runs `body` on the joined session, moved out of `state` so that its block
    /// buffers are mutated in place (no copy), then moves the session on: to
    /// `finishing` if it completed or failed meanwhile.
    mutating func withSession(at now: Instant, _ body: (inout Session, inout Receiver) -> Void) {
        var s = takeSession()
        body(&s, &self)
        settle(s, at: now)
    }

    /// Puts a session back, or ends it: a failure, or the last block verified.
    mutating func settle(_ s: consuming Session, at now: Instant) {
        if let (reason, text) = s.abort {
            actions.append(.failed(reason, text))
            put(Finishing(failed: s, reason: reason, text: text, at: now, config: config))
        } else if s.isTransferComplete {
            s.commitIfDue(force: true, actions: &actions)
            actions.append(.verify)
            var f = Finishing(completed: s)
            f.reportReceived(at: now, receiver: &self)
            put(f)
        } else {
            put(s)
        }
    }

    // The state is moved out (`swap`, no copy of the session's many buffers) while it
    // is worked on, and put back with the fields read from it that queries need.

    /// Moves the joined session out of `state`, leaving `.modifying`.
    mutating func takeSession() -> Session {
        var taken = State.modifying
        swap(&state, &taken)
        guard case .receiving(let s) = consume taken else { preconditionFailure("no session joined") }
        return s
    }

    mutating func takeFinishing() -> Finishing {
        var taken = State.modifying
        swap(&state, &taken)
        guard case .finishing(let f) = consume taken else { preconditionFailure("not finishing") }
        return f
    }

    mutating func put(_ s: consuming Session) {
        nextDeadline = s.timers.next
        isFinished = false
        state = .receiving(s)
    }

    mutating func put(_ f: consuming Finishing) {
        nextDeadline = f.timers.next
        isFinished = f.isFinished
        state = .finishing(f)
    }

    /// Listening, or an offer waiting: no timer runs.
    mutating func put(_ l: consuming Listening, offer: Offer? = nil) {
        nextDeadline = nil
        isFinished = false
        state = offer.map { .offered(l, $0) } ?? .listening(l)
    }

    /// Queues feedback for the sender: NACK and STATUS with the session's cookie, or
    /// held while a REGISTER asks for one (P-30, `CookieJar`).
    mutating func send(_ d: Datagram, to peer: PeerAddress, at now: Instant) {
        let registration = register(for: d.sessionID)
        for out in cookies.outgoing(d, to: peer, at: now, registration: { _ in registration }) { transmit(out, to: peer) }
    }

    private mutating func transmit(_ d: Datagram, to peer: PeerAddress) {
        outgoing.append(Transmit(destination: .peer(peer), bytes: d.encoded()))
        stats.sent.add(d.kind)
    }

    /// Specs/protocol.md P-31: a SESSION record. Verified and newer, it is what the
    /// receiver knows of its session (feedback address, envelope, POLL chain), and says
    /// the joined session's sender is alive.
    private mutating func handleRecord(_ r: SessionRecord, at now: Instant) {
        switch records.take(r, trust: config.trust, at: now, stats: &stats) {
        case .taken: stats.sessionRecords += 1
        case .stale: stats.drops.add(.sessionRecordStale); return
        case .failed: stats.drops.add(.sessionRecordInvalid); return
        case .overBudget: stats.drops.add(.sessionRecordOverBudget); return
        }
        switch state {
        case .receiving(let s) where s.id == r.session && s.authenticated:
            withSession(at: now) { s, c in
                s.timers[.inactivity] = now + c.config.inactivityTimeout
                s.lastHeard = now
            }
        case .finishing(let f) where f.id == r.session && f.authenticated:
            var f = takeFinishing()
            f.timers[.closeConfirm] = nil
            put(f)
        default: break
        }
    }

    /// Specs/protocol.md P-30: the sender's COOKIE for a session this receiver asked; the
    /// feedback held for it goes now. Any other COOKIE is dropped.
    private mutating func handleCookie(_ c: Cookie, at now: Instant) {
        let registration = register(for: c.session)
        guard let out = cookies.handle(c, at: now, registration: { _ in registration }), let peer = cookies.peer(for: c.session) else {
            stats.drops.add(.unsolicitedCookie)
            return
        }
        stats.cookiesReceived += 1
        for d in out { transmit(d, to: peer) }
    }

    /// Timing from unauthenticated datagrams is clamped: a corrupted GRTT must not park
    /// the NACK timer for an hour.
    static let grttMin = Interval(microseconds: 100)
    static let grttMax = Interval.seconds(2)
    static let groupSizeMax: UInt32 = 1 << 20
    static func clampGRTT(_ microseconds: UInt32) -> Interval {
        min(max(Interval(microseconds: UInt64(microseconds)), grttMin), grttMax)
    }

    /// Specs/protocol.md P-4: the device refused a validly signed announce. It may be a
    /// replay of an old session, so the receiver keeps listening; it tells that
    /// session's sender why, a bounded number of times.
    mutating func recordDecline(_ reason: Status.Reason, _ text: String, offer: Offer, at now: Instant) {
        stats.offersDeclined.add(reason)
        lastDecline = (reason, text)
        guard intake.noteRefusal(of: offer.envelope, repeatMax: config.statusRepeatMax), !offer.carousel else { return }
        send(.status(Status(session: offer.session, receiver: config.receiverID, state: .failed, reason: reason,
                            blocksDone: 0, blocksTotal: 0, bytesReceived: 0, nacksSent: 0)), to: offer.sender, at: now)
    }
}
