#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import BundleFormat
import ErasureCoding
import FleetCrypto
import WireFormat

/// What the sender knows of one receiver (the fleet report's rows).
public struct ReceiverRecord: Sendable {
    /// `received`: every block in, step 2 running; `verified`: step 2 passed (P-21).
    /// A device agent goes on (Specs/agent.md §6): `installed` (written to its spare
    /// side and read back), `activating` (on trial), `confirmed` or `rolledBack`.
    public enum State: String, Sendable {
        case registered, receiving, received, verified, installed, activating, confirmed, rolledBack, failed
        /// How far along: later states never give way to earlier ones.
        var rank: Int {
            switch self {
            case .registered: 0
            case .receiving: 1
            case .received: 2
            case .verified: 3
            case .installed: 4
            case .activating: 5
            case .confirmed, .rolledBack, .failed: 6
            }
        }
        var isTerminal: Bool { rank == 6 }
    }
    public let id: ReceiverID
    /// The address it registered from (P-30): its feedback counts only from there, and
    /// ACKs go there (P-22).
    public var address: PeerAddress
    /// The cookie it registered with: its NACK and STATUS carry it, ACKs to it too.
    public var cookie: FeedbackCookie
    public var deviceID: String?
    public var versionBefore: String?
    public var installedSequence: UInt64?
    public var state: State = .registered
    public var failureReason: Status.Reason?
    public var blocksDone: UInt32 = 0
    public var blocksTotal: UInt32 = 0
    public var bytesReceived: UInt64 = 0
    public var nacksReported: UInt32 = 0
    public var nacksReceived = 0
    public var nacksThisRound = 0
    public var firstHeard: Instant
    public var lastHeard: Instant
    /// When it reported every block in (STATUS received), if it did before its verdict.
    public var receivedAt: Instant?
    /// When it reported its verdict (verified or failed).
    public var finishedAt: Instant?
    /// When it reported the state the session awaits (`SenderConfig.await`), if beyond verified.
    public var settledAt: Instant?

    /// Step 2's verdict is known (verified, or failed; or an agent's later state).
    public var hasVerdict: Bool { state.rank >= State.verified.rank }

    /// Whether the receiver reached the state awaited (and not a failure).
    public func reached(_ target: SenderConfig.Await) -> Bool {
        switch target {
        case .verified: state != .failed && state.rank >= State.verified.rank && state != .rolledBack
        case .installed: state != .failed && state != .rolledBack && state.rank >= State.installed.rank
        case .confirmed: state == .confirmed
        }
    }

    /// Whether the receiver reached the state the session awaits, or can no longer.
    public func isSettled(awaiting target: SenderConfig.Await) -> Bool {
        switch target {
        case .verified: hasVerdict
        case .installed: state == .failed || state.rank >= State.installed.rank
        case .confirmed: state.isTerminal
        }
    }
}

/// How the sender sees one receiver right now (Specs/protocol.md §4.3).
public enum FleetStanding: String, Sendable {
    /// Step 2 passed on the device.
    case verified
    /// Failed, with a reason (policy, storage, step 2, session).
    case failed
    /// Every block in; step 2 was running when last heard.
    case received
    case receiving
    /// Behind: under half the median progress of the receivers still receiving.
    case slow
    /// Silent for `receiverSilenceMax` without a verdict (`stepTwoSilenceMax` once every block was in).
    case gone
    /// A device agent's states after verified (Specs/agent.md §6).
    case installed, activating, confirmed
    case rolledBack = "rolled back"
}

extension Sender {
    /// Who is verified, failed, received, receiving, slow or gone, at `now`.
    public func fleet(at now: Instant) -> [(record: ReceiverRecord, standing: FleetStanding)] {
        let active = receivers.values.filter { $0.state == .registered || $0.state == .receiving }
        let fractions = active.map { $0.blocksTotal == 0 ? 0 : Double($0.blocksDone) / Double($0.blocksTotal) }.sorted()
        let median = fractions.isEmpty ? 0 : fractions[fractions.count / 2]
        return receivers.values.sorted { $0.id < $1.id }.map { r in
            let standing: FleetStanding
            switch r.state {
            case .verified: standing = .verified
            case .failed: standing = .failed
            case .installed: standing = .installed
            case .activating: standing = .activating
            case .confirmed: standing = .confirmed
            case .rolledBack: standing = .rolledBack
            case .received: standing = now >= r.lastHeard + config.stepTwoSilenceMax ? .gone : .received
            case .registered, .receiving:
                let fraction = r.blocksTotal == 0 ? 0 : Double(r.blocksDone) / Double(r.blocksTotal)
                if now >= r.lastHeard + config.receiverSilenceMax { standing = .gone }
                else if fraction < median * 0.5 { standing = .slow }
                else { standing = .receiving }
            }
            return (r, standing)
        }
    }
}

/// Step B as a sans-I/O state machine (Specs/protocol.md §4).
///
/// ```
/// first pass ──all source + proactive sent──► POLL r ─► collecting NACKs, sending repair
///                                               ▲                 │
///                                               └── window over ──┘ (idle round if no NACK)
/// all registered verified or failed / idle rounds / deadline ──► CLOSE ×3 ──► finished
/// ```
///
/// Its parts: `Pacer` (the token buckets, P-9), `RepairQueue` (what repair is owed,
/// P-8, P-11), `BlockCache` (read and encoded blocks), and the pass cursor here.
public struct Sender {
    public let config: SenderConfig
    public let manifest: Manifest
    private let envelope: [UInt8]
    /// The envelope's Merkle root and fragments with their paths (P-3d), made once.
    private let envelopeTree: (root: [UInt8], fragments: [(index: UInt16, count: UInt16, bytes: [UInt8], path: [[UInt8]])])
    private let layouts: [ObjectLayout]  // [auth chain, payload]
    public internal(set) var stats = SenderStats()
    public internal(set) var receivers: [ReceiverID: ReceiverRecord] = [:]

    enum Phase: Equatable { case firstPass, repairRounds, carousel, closing, finished }
    private var phase: Phase = .firstPass
    public private(set) var round: UInt32 = 0
    private var roundEnds: Instant?
    private var nacksThisRound = 0
    private var idleRounds = 0
    private var closeReason: Close.Reason = .allDone
    private var closesLeft = 0
    private var startedAt: Instant?
    var lastNewReceiverAt: Instant?
    private var grtt: Interval
    /// P-13b: the GRTT when the current round began (its growth within the round is bounded),
    /// and the sent-at values of the latest POLLs (only their echoes are samples).
    private var grttAtRoundStart: Interval
    private var issuedPollSentAt: [UInt64] = []
    /// The session's limit: the configured deadline, or the default one (P-12b).
    public let sessionDeadline: Interval

    private var pacer: Pacer
    private var repair = RepairQueue()
    private var cache: BlockCache
    /// Payload blocks per first-pass NACK epoch (P-19a).
    private let nackEpochBlocks: Int

    /// The first pass's (and the carousel's) position: object, window, symbol, block in window.
    private struct PassCursor { var object = 0, windowStart = 0, symbol = 0, offset = 0 }
    private var pass = PassCursor()

    var control: [Transmit] = []
    private var announceDue: Instant?
    private var lastAnnounceAt: Instant?
    /// P-31: the POLL chain (value(r) for r in 0...pollChainLength) of an authenticated
    /// session, empty otherwise; SESSION records sent so far; where feedback goes.
    private let pollChain: PollChain.Values?
    private var recordsSent: UInt32 = 0
    public private(set) var feedbackAddress: PeerAddress?
    /// Registered receivers per host address (P-30a: `receiversPerAddressMax`).
    var addressCounts: [PeerAddress: Int] = [:]
    /// COOKIE replies in the current second (`cookieRepliesPerSecondMax`).
    var cookieSecond: UInt64 = .max
    var cookiesThisSecond = 0
    /// When the latest early announce was scheduled (P-3a: at most one per `earlyAnnounceIntervalMin`).
    private var lastEarlyAnnounceAt: Instant?
    private var nextAnnounceAtData: UInt64 = 0

    public init(config: SenderConfig, envelope: [UInt8], manifest: Manifest, source: any ObjectSource) {
        precondition(config.rateBytesPerSecond > 0 && config.interleaveWindow >= 1)
        self.config = config
        self.envelope = envelope
        envelopeTree = EnvelopeTree.fragments(of: envelope)
        self.manifest = manifest
        layouts = [ObjectLayout(object: .authChain, size: manifest.authentication.size, profile: manifest.transport),
                   ObjectLayout(object: .payload, size: manifest.payload.size, profile: manifest.transport)]
        grtt = config.grttInitial
        grttAtRoundStart = config.grttInitial
        pollChain = config.authentication.map { PollChain.values(length: SenderConfig.pollChainLength, last: $0.chainLast) }
        feedbackAddress = config.feedbackAddress
        sessionDeadline = config.deadline ?? SenderConfig.defaultDeadline(
            objectBytes: manifest.authentication.size + manifest.payload.size, symbolBytes: manifest.transport.symbolSize,
            rateBytesPerSecond: config.rateBytesPerSecond)
        pacer = Pacer(config: config, datagramWireBytes: Double(DataSymbol.headerByteCount + manifest.transport.symbolSize + 28))
        cache = BlockCache(source: source, profile: manifest.transport, config: config)
        nackEpochBlocks = config.nackEpochBlocks ?? SenderConfig.nackEpochBlocks(for: manifest.transport)
    }

    public var isFinished: Bool { phase == .finished }
    /// Whether receivers can authenticate this session (a signed SESSION record, P-31).
    public var isAuthenticated: Bool { config.authentication != nil }

    /// Names where receivers send feedback (the driver, once its socket is bound).
    public mutating func nameFeedbackAddress(_ address: PeerAddress) { feedbackAddress = address }
    /// Specs/protocol.md P-17b: the receivers' backoff (scaled by the group size) plus the NACK window.
    public var roundWindow: Interval { grtt * (config.backoffGRTTs * backoffShare(groupSize: max(receivers.count, 1)) + config.nackWindowGRTTs) }
    public var currentGRTT: Interval { grtt }
    public var totalBlocks: Int { layouts[1].blockCount }

    // MARK: Feedback in

    /// A feedback datagram from `peer`, handled at `now`. The peer is remembered per
    /// receiver (bounded by the receiver table): its ACKs go there. `arrivedAt` is
    /// when the host received it, if the driver knows (kernel timestamps): a NACK's
    /// round-trip sample then leaves out the time it waited here (P-25a).
    public mutating func handleDatagram(_ bytes: [UInt8], from peer: PeerAddress, at now: Instant, arrivedAt: Instant? = nil) {
        let datagram: Datagram
        do { datagram = try Datagram(parsing: bytes) } catch {
            stats.malformed.add(error.code)
            return
        }
        stats.feedbackBytes += UInt64(bytes.count + 28)
        guard datagram.sessionID == config.session else { stats.drops.add(.otherSession); return }
        switch datagram {
        case .register(let r):
            // Specs/protocol.md P-30: state only for a receiver that proved it can be reached.
            guard isValid(r.cookie, for: r.receiver, from: peer, at: now) else {
                replyCookie(to: r.receiver, peer, at: now)
                return
            }
            let isNew = receivers[r.receiver] == nil
            guard var rec = bind(r.receiver, cookie: r.cookie, from: peer, at: now) else { return }
            // Specs/protocol.md P-3a: a receiver that missed the announce gets one soon.
            if isNew { scheduleEarlyAnnounce(at: now) }
            rec.deviceID = r.deviceID
            rec.versionBefore = r.version
            rec.installedSequence = r.installedSequence
            receivers[r.receiver] = rec
        case .nack(let n): handleNack(n, from: peer, at: now, arrivedAt: min(arrivedAt ?? now, now))
        case .status(let s): handleStatus(s, from: peer, at: now)
        case .announce, .data, .poll, .close, .ack, .cookie, .session: stats.drops.add(.fromSender)
        }
    }

    /// Specs/protocol.md P-3a: an announce soon, for a receiver that missed it: at least
    /// `announceHoldoff` after the last announce and `earlyAnnounceIntervalMin` after the
    /// last early one, so that REGISTERs (genuine or forged) cannot make the group's
    /// control traffic grow with their number.
    private mutating func scheduleEarlyAnnounce(at now: Instant) {
        guard phase != .closing, phase != .finished else { return }
        var soon = max(now, (lastAnnounceAt ?? now) + config.announceHoldoff)
        if let last = lastEarlyAnnounceAt { soon = max(soon, last + config.earlyAnnounceIntervalMin) }
        guard announceDue == nil || soon < announceDue! else { return }
        announceDue = soon
        lastEarlyAnnounceAt = soon
    }

    private mutating func handleNack(_ n: Nack, from peer: PeerAddress, at now: Instant, arrivedAt: Instant) {
        guard phase != .closing && phase != .finished, var rec = boundRecord(n.receiver, n.cookie, from: peer, at: now) else { return }
        rec.nacksReceived += 1
        rec.nacksThisRound += 1
        if rec.state == .registered { rec.state = .receiving }
        receivers[n.receiver] = rec
        guard rec.nacksThisRound <= config.nackPerReceiverPerRoundMax else { stats.drops.add(.nackRateLimited); return }
        stats.nacks += 1
        nacksThisRound += 1
        // Specs/protocol.md P-17, P-25a: without the receiver's hold (from the POLL's arrival
        // there) and the NACK's wait in this host's queue. The POLL's wait here before it
        // left (behind the pacer, in the driver's batch) still counts.
        // P-13b: only the echo of a POLL this sender issued (lately) is a sample.
        if n.echoedSentAtMicroseconds > 0 && n.echoedSentAtMicroseconds <= arrivedAt.microseconds
            && issuedPollSentAt.contains(n.echoedSentAtMicroseconds) {
            let elapsed = arrivedAt.microseconds - n.echoedSentAtMicroseconds
            updateGRTT(Interval(microseconds: elapsed - min(UInt64(n.holdMicroseconds), elapsed)))
        }
        for e in n.entries {
            let layout = layouts[e.object == .authChain ? 0 : 1]
            let b = Int(e.block)
            guard b < layout.blockCount else { stats.drops.add(.nackEntryRange); continue }
            // P-11b: nothing is repaired that the first pass has not sent yet.
            guard hasStartedSending(layout, block: b) else { stats.drops.add(.nackEntryNotSent); continue }
            let needed = min(Int(e.needed), layout.sourceSymbols(b))
            let (queued, margin) = repair.enqueue(BlockKey(object: e.object, block: b), needed: needed,
                                                  marginFraction: phase == .repairRounds ? config.roundRepairMarginFraction : nil)
            guard queued > 0 else { stats.nackEntriesAlreadyServed += 1; continue }
            if round == 0 { stats.repairQueuedFirstPass += UInt64(queued) } else { stats.repairQueuedInRounds += UInt64(queued) }
            stats.repairMargin += UInt64(margin)
        }
    }

    /// P-11b: whether the first pass has begun sending block `b` of `layout` (its window
    /// is under way or behind it). After the first pass, every block has been sent.
    private func hasStartedSending(_ layout: ObjectLayout, block b: Int) -> Bool {
        guard phase == .firstPass else { return true }
        let index = layout.object == .authChain ? 0 : 1
        if index != pass.object { return index < pass.object }
        return b < min(pass.windowStart + config.interleaveWindow, layout.blockCount)
    }

    /// Rises at once (up to `grttGrowthPerRoundMax` times its value when the round began,
    /// P-13b), falls by 1/16 of the difference per sample.
    private mutating func updateGRTT(_ rtt: Interval) {
        let clamped = min(max(rtt, config.grttMin), config.grttMax)
        let ceiling = Interval(microseconds: UInt64(Double(grttAtRoundStart.microseconds) * SenderConfig.grttGrowthPerRoundMax))
        grtt = clamped > grtt ? max(grtt, min(clamped, ceiling)) : Interval(microseconds: (grtt.microseconds * 15 + clamped.microseconds) / 16)
    }

    /// Specs/protocol.md §3.7, P-21: a receiver's progress, or its verdict, which is ACKed.
    private mutating func handleStatus(_ s: Status, from peer: PeerAddress, at now: Instant) {
        guard var rec = boundRecord(s.receiver, s.cookie, from: peer, at: now) else { return }
        // An agent's reports after step 2 carry no counts (P-21b): the transfer's stay.
        if s.blocksTotal > 0 || s.state.rawValue <= Status.State.received.rawValue {
            rec.blocksDone = s.blocksDone
            rec.blocksTotal = s.blocksTotal
            rec.bytesReceived = s.bytesReceived
            rec.nacksReported = s.nacksSent
        }
        switch s.state {
        case .receiving: if rec.state == .registered { rec.state = .receiving }
        case .received:
            if rec.state == .registered || rec.state == .receiving {
                rec.state = .received
                rec.receivedAt = now
                stats.receiversReceived += 1
            }
        case .failed where s.reason == .interrupted:
            // P-21b: an agent cut during its install resumes the session if it still runs:
            // not a verdict. ACKed, so that it stops repeating it.
            control.append(ack(rec, s.state))
        case .complete, .failed:
            if !rec.hasVerdict {
                rec.state = s.state == .complete ? .verified : .failed
                rec.failureReason = s.state == .failed ? s.reason : nil
                rec.finishedAt = now
                if s.state == .complete { stats.receiversVerified += 1 } else { stats.receiversFailed += 1 }
            } else if s.state == .failed && !rec.state.isTerminal {
                // An agent that failed after its verification (installing, a slot too small).
                rec.state = .failed
                rec.failureReason = s.reason
                rec.settledAt = now
                stats.receiversFailed += 1
            }
            control.append(ack(rec, s.state))
        case .installed, .activating:
            // Specs/agent.md §6: an agent's progress after verified; not ACKed.
            let next: ReceiverRecord.State = s.state == .installed ? .installed : .activating
            if next.rank > rec.state.rank && !rec.state.isTerminal {
                rec.state = next
                if config.await == .installed && rec.settledAt == nil { rec.settledAt = now }
            }
        case .confirmed, .rolledBack:
            if !rec.state.isTerminal {
                rec.state = s.state == .confirmed ? .confirmed : .rolledBack
                rec.failureReason = s.state == .rolledBack ? s.reason : nil
                rec.settledAt = now
            }
            control.append(ack(rec, s.state))
        }
        receivers[s.receiver] = rec
        checkAllDone(at: now)
    }

    private mutating func checkAllDone(at now: Instant) {
        guard phase == .repairRounds, !receivers.isEmpty else { return }
        if let expected = config.expectedReceivers, receivers.count < expected { return }
        if receivers.values.allSatisfy({ $0.isSettled(awaiting: config.await) }) { startClosing(.allDone) }
    }

    /// The STATUS state an ACK acknowledges for a receiver in `state`.
    static func acknowledged(_ state: ReceiverRecord.State) -> Status.State {
        switch state {
        case .confirmed: .confirmed
        case .rolledBack: .rolledBack
        case .failed: .failed
        case .registered, .receiving, .received, .verified, .installed, .activating: .complete
        }
    }

    /// ACK of a receiver's final STATUS (unicast, Specs/protocol.md P-13, P-21).
    private func ack(_ r: ReceiverRecord, _ state: Status.State) -> Transmit {
        Transmit(destination: .peer(r.address), bytes: Datagram.ack(Ack(session: config.session, receiver: r.id, cookie: r.cookie, state: state)).encoded())
    }

    private mutating func startClosing(_ reason: Close.Reason) {
        guard phase != .closing && phase != .finished else { return }
        phase = .closing
        closeReason = reason
        closesLeft = config.closeRepeatCount
        stats.closes.add(reason)
        // Specs/protocol.md P-21: every receiver was heard done, but an ACK may have been
        // lost, and such a receiver repeats its STATUS until the CLOSE has been quiet for
        // a while. More ACKs, one with each CLOSE, let it stop at once.
        if reason == .allDone {
            let done = receivers.values.filter { $0.isSettled(awaiting: config.await) }.sorted { $0.id < $1.id }
            let acks = done.map { ack($0, Self.acknowledged($0.state)) }
            for _ in 0..<config.closeRepeatCount { control.append(contentsOf: acks) }
        }
    }

    // MARK: Time

    public mutating func handleTimeout(at now: Instant) {
        if startedAt == nil { startedAt = now }
        if let start = startedAt, now >= start + sessionDeadline, phase != .closing, phase != .finished {
            startClosing(.deadline)
        }
        if phase == .repairRounds, roundEnds == nil, repair.isEmpty { startRound(at: now) }
        if phase == .repairRounds, let end = roundEnds, now >= end, repair.isEmpty {
            if nacksThisRound == 0 { idleRounds += 1 } else { idleRounds = 0 }
            if nacksThisRound == 0 { stats.roundsIdle += 1 } else { stats.roundsBusy += 1 }
            if idleRounds >= config.idleRoundsMax && !isWaiting(at: now) { startClosing(.idle); return }
            startRound(at: now)
        }
    }

    /// Specs/protocol.md P-12: idle rounds end the session only once every receiver
    /// without a verdict has been silent for `receiverSilenceMax` (`stepTwoSilenceMax`
    /// once it reported every block in; then it is gone), and
    /// expected receivers not yet heard have had `expectedReceiverWaitMax`.
    private func isWaiting(at now: Instant) -> Bool {
        let live = receivers.values.contains { r in
            guard !r.isSettled(awaiting: config.await) else { return false }
            // A device verified and on its way to the awaited state may be silent a while
            // (rebooting), and one finishing step 2 while it fsyncs and reads back its slots.
            let silence = r.hasVerdict ? config.awaitSilenceMax : r.state == .received ? config.stepTwoSilenceMax : config.receiverSilenceMax
            return now < r.lastHeard + silence
        }
        if live { return true }
        if let expected = config.expectedReceivers, receivers.count < expected,
           now < (lastNewReceiverAt ?? startedAt ?? now) + config.expectedReceiverWaitMax {
            return true
        }
        return false
    }

    /// Specs/protocol.md P-10: POLL, then a NACK window.
    private mutating func startRound(at now: Instant) {
        round += 1
        nacksThisRound = 0
        repair.startRound()
        for id in receivers.keys { receivers[id]!.nacksThisRound = 0 }
        // Specs/protocol.md P-12: a sender that only waits polls at a slower pace.
        roundEnds = now + (idleRounds >= config.idleRoundsMax ? max(roundWindow, config.waitingRoundInterval) : roundWindow)
        checkAllDone(at: now)  // a STATUS may have arrived during the first pass
        // Receivers known only by their hello have not joined yet: announce again (P-3a).
        if receivers.values.contains(where: { $0.state == .registered }) { scheduleEarlyAnnounce(at: now) }
        grttAtRoundStart = grtt
        // P-31: an authenticated session has as many rounds as its chain has values.
        if isAuthenticated && Int(round) >= SenderConfig.pollChainLength { startClosing(.idle); return }
        let sentAt = max(now.microseconds, 1)
        issuedPollSentAt.append(sentAt)
        if issuedPollSentAt.count > SenderConfig.pollEchoesRememberedMax { issuedPollSentAt.removeFirst() }
        control.append(Transmit(destination: .group, bytes: Datagram.poll(Poll(
            session: config.session, round: round, sentAtMicroseconds: sentAt,
            grttMicroseconds: UInt32(min(grtt.microseconds, UInt64(UInt32.max))), groupSize: UInt32(max(receivers.count, 1)),
            chainValue: pollChain?[Int(round)] ?? SessionRecord.noChainValue)).encoded()))
    }

    /// When `handleTimeout` or `pollTransmit` next has work.
    public func nextDeadline(at now: Instant) -> Instant? {
        if phase == .finished { return nil }
        var candidates: [Instant] = []
        if let a = announceDue { candidates.append(a) }
        if let s = startedAt { candidates.append(s + sessionDeadline) }
        if phase == .repairRounds, let end = roundEnds { candidates.append(end) }
        if !control.isEmpty || hasDataReady { candidates.append(pacer.nextSendTime(after: now)) }
        return candidates.min()
    }

    private var hasDataReady: Bool {
        switch phase {
        case .firstPass, .carousel, .closing: true
        case .repairRounds: !repair.isEmpty
        case .finished: false
        }
    }

    // MARK: Transmit

    /// The next datagram to send now, or nil (then wait for `nextDeadline`).
    public mutating func pollTransmit(at now: Instant) -> Transmit? {
        if startedAt == nil { startedAt = now }
        pacer.refill(at: now)
        queueAnnounceIfDue(at: now)
        if !control.isEmpty {
            var index = 0
            if control[0].destination == .group {
                let cost = Double(control[0].bytes.count + 28)
                if pacer.canSendControl(cost: cost) {
                    pacer.debit(cost)
                } else if let unicast = control.firstIndex(where: { $0.destination != .group }) {
                    // An ACK or COOKIE to one receiver does not wait behind the group's pacing.
                    index = unicast
                } else {
                    return nil
                }
            }
            let t = control.remove(at: index)
            stats.controlDatagrams += 1
            stats.controlBytes += UInt64(t.bytes.count + 28)
            return t
        }
        guard pacer.canSendData else { return nil }
        switch phase {
        case .finished: return nil
        case .closing:
            guard closesLeft > 0 else { phase = .finished; return nil }
            closesLeft -= 1
            if closesLeft == 0 { phase = .finished }
            // P-31: CLOSE discloses the chain's next value, which only the sender knows.
            let closeRound = min(Int(round) + 1, SenderConfig.pollChainLength)
            let close = pollChain.map { Close(session: config.session, reason: closeReason, round: UInt32(closeRound), chainValue: $0[closeRound]) }
                ?? Close(session: config.session, reason: closeReason)
            return spend(Transmit(destination: .group, bytes: Datagram.close(close).encoded()), \.controlDatagrams, \.controlBytes)
        case .firstPass:
            // Specs/protocol.md P-9: while source remains, repair takes at most its share.
            if !repair.isEmpty && pacer.repairShareAvailable, let t = nextRepair() {
                pacer.debitRepairShare()
                return spend(t, \.repairDatagrams, \.repairBytes)
            }
            if let t = nextFirstPassSymbol() { return spend(t, \.sourceDatagrams, \.sourceBytes) }
            if config.carousel {
                phase = .carousel
                pass = PassCursor()
            } else {
                // Specs/protocol.md P-10: POLL only once the repair already asked for has gone
                // out; receivers polled earlier would ask again for what is still queued.
                phase = .repairRounds
                roundEnds = nil
                if repair.isEmpty { startRound(at: now) }
            }
            return pollTransmit(at: now)
        case .repairRounds:
            guard let t = nextRepair() else { return nil }
            return spend(t, \.repairDatagrams, \.repairBytes)
        case .carousel:
            return spend(nextCarouselSymbol(), \.repairDatagrams, \.repairBytes)
        }
    }

    /// Specs/protocol.md §3.1: the announce every `announceInterval`, after every
    /// `announceEveryDataDatagrams` data datagrams, and soon for an unknown REGISTER.
    private mutating func queueAnnounceIfDue(at now: Instant) {
        guard phase != .closing, phase != .finished else { return }
        let dataSent = stats.dataDatagrams
        if dataSent >= nextAnnounceAtData { announceDue = now }
        guard announceDue == nil || announceDue! <= now else { return }
        // The first announce goes out `announceStartCopies` times: a receiver that misses it
        // would otherwise fetch everything late.
        let copies = lastAnnounceAt == nil ? config.announceStartCopies : 1
        nextAnnounceAtData = dataSent + UInt64(config.announceEveryDataDatagrams)
        let (family, address, port) = feedbackFields
        for _ in 0..<copies {
            if let record = signedRecord() { control.append(Transmit(destination: .group, bytes: Datagram.session(record).encoded())) }
            for f in envelopeTree.fragments {
                control.append(Transmit(destination: .group, bytes: Datagram.announce(Announce(
                    session: config.session, feedbackFamily: family, carousel: config.carousel, feedbackPort: port, feedbackAddress: address, rateKilobytesPerSecond: UInt32(min(config.rateBytesPerSecond / 1000, Double(UInt32.max))),
                    grttMicroseconds: UInt32(min(grtt.microseconds, UInt64(UInt32.max))), groupSize: UInt32(max(receivers.count, 1)),
                    interleaveWindow: UInt16(config.interleaveWindow), fragmentIndex: f.index, fragmentCount: f.count,
                    envelopeLength: UInt32(envelope.count), root: envelopeTree.root, path: f.path, fragment: f.bytes)).encoded()))
            }
        }
        announceDue = now + config.announceInterval
        lastAnnounceAt = now
        stats.announces += 1
    }

    /// The feedback address as ANNOUNCE and SESSION name it (§3.1): explicit, or "this datagram's source".
    private var feedbackFields: (Announce.AddressFamily, [UInt8], UInt16) {
        guard let a = feedbackAddress else { return (.sourceAddress, [UInt8](repeating: 0, count: 16), 0) }
        let bytes = a.addressBytes
        return (a.family == .ipv6 ? .ipv6 : .ipv4, bytes + [UInt8](repeating: 0, count: 16 - bytes.count), a.port)
    }

    /// Specs/protocol.md §3.10: this session's SESSION record, numbered, with the latest
    /// POLL chain value disclosed, signed by the delegated key; nil unauthenticated.
    private mutating func signedRecord() -> SessionRecord? {
        guard let auth = config.authentication else { return nil }
        precondition(feedbackAddress != nil, "an authenticated session names its feedback address (P-31)")
        recordsSent += 1
        let (family, address, port) = feedbackFields
        var record = SessionRecord(session: config.session, number: recordsSent, carousel: config.carousel, feedbackFamily: family,
                                   feedbackPort: port, feedbackAddress: address, interleaveWindow: UInt16(config.interleaveWindow),
                                   envelopeLength: UInt32(envelope.count), envelopeRoot: envelopeTree.root, chainRound: round,
                                   chainValue: pollChain![Int(round)], chainLastRound: UInt32(SenderConfig.pollChainLength), delegation: auth.delegation)
        do { record.signature = try auth.key.sign(record.signedBytes) } catch { preconditionFailure("the sender key cannot sign: \(error)") }
        stats.sessionRecords += 1
        return record
    }

    /// A multicast datagram goes: both buckets pay its wire size (P-9), and it is counted.
    private mutating func spend(_ t: Transmit, _ datagrams: WritableKeyPath<SenderStats, UInt64>, _ bytes: WritableKeyPath<SenderStats, UInt64>) -> Transmit {
        let wire = UInt64(t.bytes.count + 28)
        pacer.debit(Double(wire))
        stats[keyPath: datagrams] += 1
        stats[keyPath: bytes] += wire
        return t
    }

    /// Specs/protocol.md P-7: windows of W blocks, symbol by symbol across the window.
    private mutating func nextFirstPassSymbol() -> Transmit? {
        while pass.object < 2 {
            let layout = layouts[pass.object]
            let windowEnd = min(pass.windowStart + config.interleaveWindow, layout.blockCount)
            guard pass.windowStart < layout.blockCount else { pass = PassCursor(object: pass.object + 1); continue }
            let widest = (pass.windowStart..<windowEnd).map { firstPassCount(layout, $0) }.max() ?? 0
            while pass.symbol < widest {
                while pass.offset < windowEnd - pass.windowStart {
                    let b = pass.windowStart + pass.offset
                    pass.offset += 1
                    guard pass.symbol < firstPassCount(layout, b) else { continue }
                    let k = layout.sourceSymbols(b)
                    let index = pass.symbol < k ? pass.symbol : k + (pass.symbol - k)
                    if pass.symbol >= k { repair.advanceCursor(BlockKey(object: layout.object, block: b)) }
                    return dataTransmit(layout, block: b, index: index)
                }
                pass.offset = 0
                pass.symbol += 1
            }
            pass.windowStart = windowEnd
            // P-19a: the epoch of a window is that of its last block; a window whose last
            // block is in a later epoch than the previous window's starts that epoch.
            if layout.object == .payload && pass.windowStart < layout.blockCount {
                let last = min(pass.windowStart + config.interleaveWindow, layout.blockCount) - 1
                if last / nackEpochBlocks > (pass.windowStart - 1) / nackEpochBlocks { startNackEpoch() }
            }
            pass.symbol = 0
            pass.offset = 0
        }
        return nil
    }

    /// Specs/protocol.md P-19a: a new NACK epoch of the first pass. Each receiver's
    /// per-round NACK allowance starts again, and a block whose repair has all gone
    /// out may be served again when asked (a repair symbol was lost again).
    private mutating func startNackEpoch() {
        for (id, var rec) in receivers where rec.nacksThisRound > 0 {
            rec.nacksThisRound = 0
            receivers[id] = rec
        }
        repair.startNackEpoch()
        stats.nackEpochs += 1
    }

    private func firstPassCount(_ layout: ObjectLayout, _ b: Int) -> Int {
        let k = layout.sourceSymbols(b)
        // The auth chain gates every payload symbol's check: send it with far more redundancy.
        let fraction = layout.object == .authChain ? config.authProactiveRepairFraction : config.proactiveRepairFraction
        let proactive = min(Int((Double(k) * fraction).rounded(.up)), manifest.transport.repairSymbolsPerBlock)
        return k + proactive
    }

    /// Specs/protocol.md §4.4: block by block, k_b fresh symbols each, pass after pass.
    private mutating func nextCarouselSymbol() -> Transmit {
        while true {
            let layout = layouts[pass.object]
            if pass.windowStart >= layout.blockCount { pass = PassCursor(object: (pass.object + 1) % 2); continue }
            let b = pass.windowStart
            if pass.symbol >= layout.sourceSymbols(b) { pass.windowStart += 1; pass.symbol = 0; continue }
            pass.symbol += 1
            let key = BlockKey(object: layout.object, block: b)
            return dataTransmit(layout, block: b, index: repair.nextFreshIndex(key, k: layout.sourceSymbols(b), r: manifest.transport.repairSymbolsPerBlock))
        }
    }

    private mutating func nextRepair() -> Transmit? {
        guard let (key, pendingAfter) = repair.next() else { return nil }
        let layout = layouts[key.object == .authChain ? 0 : 1]
        let index = repair.nextFreshIndex(key, k: layout.sourceSymbols(key.block), r: manifest.transport.repairSymbolsPerBlock)
        return dataTransmit(layout, block: key.block, index: index, pendingRepair: UInt16(min(pendingAfter, Int(UInt16.max))))
    }

    private mutating func dataTransmit(_ layout: ObjectLayout, block b: Int, index: Int, pendingRepair: UInt16 = 0) -> Transmit {
        let symbol = cache.symbol(layout, block: b, index: index)
        return Transmit(destination: .group, bytes: Datagram.data(DataSymbol(session: config.session, object: layout.object, block: UInt32(b),
                                                                              symbolIndex: UInt8(index), pendingRepair: pendingRepair, symbol: symbol)).encoded())
    }
}
