import BundleFormat
import WireFormat

/// The repair the sender announced for a block (DATA's pending repair) and when.
struct RepairPromise {
    var count: Int
    var heardAt: Instant
}

struct BlockKey: Hashable {
    var object: ObjectID
    var block: Int
}

/// A joined session's feedback state (Specs/protocol.md §5.3): the round, how far
/// the sender has gone, what was asked for and promised, and the NACK budget.
/// Its one timer (`nack`) is in the session's table.
struct FeedbackState {
    var round: UInt32 = 0
    /// A POLL of this session was heard: every incomplete block may be asked for.
    var afterPoll = false
    /// The furthest (object, interleave window) the sender's genuine DATA reached (P-17c).
    var frontier = (object: UInt8(0), window: -1)
    /// When the last genuine DATA symbol arrived, and the mean gap between them (an
    /// exponentially weighted average, 1/8 per symbol) (P-17c).
    var lastGenuineDataAt: Instant?
    var genuineDataGap = Interval(microseconds: 0)
    var frontierAdvanced = false
    /// Payload blocks per first-pass NACK epoch (P-19a), as the sender computes them.
    let nackEpochBlocks: Int
    /// The first pass's NACK epoch the receiver is in (P-19a).
    var nackEpoch = 0
    var nackedThisRound: Set<BlockKey> = []
    var promised: [BlockKey: RepairPromise] = [:]
    var nackDatagramsThisRound = 0
    /// P-19b: when the NACK datagrams of the last second went, oldest first.
    var recentNackTimes: [Instant] = []
    var lastNackAt: Instant?
    /// The latest POLL's sent-at and when it arrived at the host (P-25a), echoed
    /// in NACKs for the GRTT.
    var pollEcho: (sentAt: UInt64, heardAt: Instant)?
    var nacksSent = 0

    init(nackEpochBlocks: Int) {
        precondition(nackEpochBlocks >= 1)
        self.nackEpochBlocks = nackEpochBlocks
    }

    mutating func observeFrontier(object: ObjectID, block: Int, window: Int) {
        let position = (object.rawValue, block / window)
        if position.0 > frontier.object || (position.0 == frontier.object && position.1 > frontier.window) {
            frontier = (position.0, position.1)
            frontierAdvanced = true
        }
    }

    /// Has the sender moved past this block in the current pass?
    ///
    /// Specs/protocol.md P-17c: after a POLL every incomplete block may be asked for, but a
    /// POLL of an unauthenticated session may be forged (while the real sender is still in
    /// its first pass): there, a block beyond the genuine data seen (past the frontier's
    /// window) may be asked for only once no genuine DATA has come for `quiet`, as at the
    /// end of a pass. A verified POLL (`trusted`) opens every block at once.
    func isPassed(object: ObjectID, block: Int, window: Int, trusted: Bool, quiet: Interval, at now: Instant) -> Bool {
        let position = (object.rawValue, block / window)
        guard afterPoll else { return position < (frontier.object, frontier.window) }
        if trusted || position <= (frontier.object, frontier.window) { return true }
        return lastGenuineDataAt.map { now >= $0 + quiet } ?? true
    }

    /// P-19b: NACK datagrams still allowed now (at most `max` in any second), and when
    /// one more will be, if none is.
    mutating func nackSecondBudget(at now: Instant, max: Int) -> (left: Int, nextAt: Instant?) {
        while let first = recentNackTimes.first, now >= first + .seconds(1) { recentNackTimes.removeFirst() }
        let left = Swift.max(0, max - recentNackTimes.count)
        return (left, left == 0 ? recentNackTimes.first.map { $0 + .seconds(1) } : nil)
    }

    mutating func countNacks(_ n: Int, at now: Instant) {
        recentNackTimes += repeatElement(now, count: n)
    }

    /// Specs/protocol.md P-18a: the repair symbols the sender still promises for this
    /// block, 0 if none. A promise lapses when the repair it announced stops arriving
    /// for `lifetime` (its last symbols were lost, so no DATA with a pending count of 0
    /// ever came).
    func promisedRepair(_ key: BlockKey, at now: Instant, lifetime: Interval) -> Int {
        guard let p = promised[key], now < p.heardAt + lifetime else { return 0 }
        return p.count
    }
}

/// The numbers a STATUS carries about the transfer.
struct StatusReport {
    var blocksDone: UInt32
    var blocksTotal: UInt32
    var bytesReceived: UInt64
    var nacksSent: UInt32
}

extension Session {
    var report: StatusReport {
        StatusReport(blocksDone: UInt32(payload.doneCount), blocksTotal: UInt32(payload.layout.blockCount),
                     bytesReceived: bytesReceived, nacksSent: UInt32(feedback.nacksSent))
    }

    var promiseLifetime: Interval { grtt * repairPromiseLifetimeGRTTs }

    /// Whether block b may be NACKed: the sender has passed it, and (P-29c) it is inside
    /// the staging window.
    func isNackable(_ object: ObjectID, _ b: Int, at now: Instant) -> Bool {
        if object == .payload, let end = payloadWindowEnd, b >= end { return false }
        let quiet = max(grtt * 2, feedback.genuineDataGap * ReceiverConfig.beyondDataQuietGaps, ReceiverConfig.beyondDataQuietMin)
        return feedback.isPassed(object: object, block: b, window: interleaveWindow, trusted: authenticated, quiet: quiet, at: now)
    }

    /// Distinct symbol indices of block b of `object` waiting for their segment, not already held.
    func pendingCount(_ object: ObjectID, block b: Int, excluding partial: PartialBlock?) -> Int {
        var seen = Set<UInt8>()
        for p in pendingSymbols where p.object == object && Int(p.block) == b && !(partial?.seen[Int(p.symbolIndex)] ?? false) { seen.insert(p.symbolIndex) }
        return seen.count
    }

    func hasNackableBlocks(at now: Instant) -> Bool {
        for object in [ObjectID.authChain, .payload] {
            let state = object == .payload ? payload : chain.auth
            for b in 0..<state.layout.blockCount where !state.done[b] && isNackable(object, b, at: now)
                && !feedback.nackedThisRound.contains(BlockKey(object: object, block: b)) && !chain.awaitsSegment(object, b) {
                return true
            }
        }
        return false
    }
}

extension Receiver {
    /// What a DATA symbol tells the feedback: how far the sender has gone, and the
    /// repair it promises for the block (P-17, P-18a, P-16b, P-19a).
    /// `tagChecked`: the symbol passed its tag. Otherwise it is one of a done block (genuine
    /// data of it came), or one held until the auth chain is in (nothing can be checked
    /// before; once the chain is complete no symbol is held, so forged DATA moves nothing):
    /// it moves the frontier and no more (P-17c).
    mutating func observe(_ d: DataSymbol, _ s: inout Session, tagChecked: Bool = true, at now: Instant) {
        let b = Int(d.block)
        s.feedback.observeFrontier(object: d.object, block: b, window: s.interleaveWindow)
        if tagChecked {
            if let last = s.feedback.lastGenuineDataAt {
                let gap = now - last
                s.feedback.genuineDataGap = Interval(microseconds: s.feedback.genuineDataGap.microseconds - s.feedback.genuineDataGap.microseconds / 8 + gap.microseconds / 8)
            }
            s.feedback.lastGenuineDataAt = now
            // Specs/protocol.md P-18a: the sender's promise of more repair for this block this round.
            let key = BlockKey(object: d.object, block: b)
            // P-29c: a block beyond the window drops its symbols; repair promised for it then
            // would count as covering it once the window reaches it.
            let beyondWindow = d.object == .payload && s.payloadWindowEnd.map { b >= $0 } ?? false
            if !beyondWindow && (d.pendingRepair > 0 || s.feedback.promised[key] != nil) {
                s.feedback.promised[key] = RepairPromise(count: Int(d.pendingRepair), heardAt: now)
            }
        }
        guard s.feedback.frontierAdvanced else { return }
        s.feedback.frontierAdvanced = false
        reopenAuthChainNacks(&s)
        // Specs/protocol.md P-19a: a new epoch of the first pass: a fresh NACK allowance, and
        // blocks asked for earlier whose promised repair has all gone by may be asked for again.
        if !s.feedback.afterPoll && d.object == .payload && b / s.feedback.nackEpochBlocks > s.feedback.nackEpoch {
            s.feedback.nackEpoch = b / s.feedback.nackEpochBlocks
            s.feedback.nackDatagramsThisRound = 0
            let lifetime = s.promiseLifetime
            s.feedback.nackedThisRound = s.feedback.nackedThisRound.filter {
                $0.object == .authChain || s.feedback.promisedRepair($0, at: now, lifetime: lifetime) > 0
            }
        }
        scheduleNack(&s, at: now)
    }

    /// Specs/protocol.md P-16b: until the auth chain is in, every window of the first pass
    /// is a new chance to ask for it (a lost repair must not wait for the POLL).
    private mutating func reopenAuthChainNacks(_ s: inout Session) {
        if !s.feedback.afterPoll && !s.chain.isComplete {
            s.feedback.nackedThisRound = s.feedback.nackedThisRound.filter { $0.object != .authChain }
            s.feedback.nackDatagramsThisRound = 0
        }
    }

    /// Specs/protocol.md P-10, P-17a: a POLL starts a round; its timing is clamped.
    /// P-25a: the echo's hold time counts from the POLL's arrival at the host.
    mutating func handlePoll(_ p: Poll, _ s: inout Session, at now: Instant, arrivedAt: Instant) {
        guard !s.carousel else { return }
        s.grtt = Self.clampGRTT(p.grttMicroseconds)
        s.timers[.closeConfirm] = nil
        s.groupSize = Int(min(p.groupSize, Self.groupSizeMax))
        // POLL is not authenticated: a corrupted or forged round number must not freeze
        // feedback, so any change of round starts a round (Specs/protocol.md P-17).
        if p.round != s.feedback.round {
            s.feedback.round = p.round
            s.feedback.nackedThisRound.removeAll()
            s.feedback.promised.removeAll()
            s.feedback.nackDatagramsThisRound = 0
            s.feedback.afterPoll = true
        }
        s.feedback.pollEcho = (p.sentAtMicroseconds, arrivedAt)
        scheduleNack(&s, at: now)
    }

    mutating func scheduleNack(_ s: inout Session, at now: Instant) {
        guard !s.carousel, s.timers[.nack] == nil, s.feedback.nackDatagramsThisRound < config.nackDatagramsPerRoundMax,
              s.hasNackableBlocks(at: now) else { return }
        let maxDelay = s.grtt * (config.backoffGRTTs * backoffShare(groupSize: s.groupSize))
        var due = now + truncatedExponential(max: maxDelay, groupSize: s.groupSize, unit: rng.unit())
        // Specs/protocol.md P-19: no two NACK firings closer than `nackIntervalMin` (one GRTT).
        if let last = s.feedback.lastNackAt, due < last + s.grtt { due = last + s.grtt }
        // P-19b: with the last second's NACKs spent, the next waits until one more is allowed.
        let second = s.feedback.nackSecondBudget(at: now, max: config.nackDatagramsPerSecondMax)
        if second.left == 0, let next = second.nextAt, due < next {
            due = next
            stats.nacksDeferredPerSecond += 1
        }
        s.timers[.nack] = due
    }

    /// Specs/protocol.md P-17..P-19: recompute needs at fire time; what repair filled is not asked for.
    mutating func sendNacks(_ s: inout Session, at now: Instant) {
        let second = s.feedback.nackSecondBudget(at: now, max: config.nackDatagramsPerSecondMax)
        guard second.left > 0 else {
            stats.nacksDeferredPerSecond += 1
            scheduleNack(&s, at: now)
            return
        }
        let budget = min(config.nackDatagramsPerRoundMax - s.feedback.nackDatagramsThisRound, second.left)
        var entries: [Nack.Entry] = []
        var datagrams: [Nack] = []
        func flush() {
            guard !entries.isEmpty else { return }
            let echo = s.feedback.pollEcho
            let hold = echo.map { now - $0.heardAt }?.microseconds ?? 0
            datagrams.append(Nack(session: s.id, receiver: config.receiverID, round: s.feedback.round,
                                  echoedSentAtMicroseconds: echo?.sentAt ?? 0, holdMicroseconds: UInt32(min(hold, UInt64(UInt32.max))),
                                  entries: entries))
            entries = []
        }
        outer: for object in [ObjectID.authChain, .payload] {
            let state = object == .payload ? s.payload : s.chain.auth
            for b in 0..<state.layout.blockCount where !state.done[b] && s.isNackable(object, b, at: now) {
                guard let entry = nackEntry(&s, object, b, state, at: now) else { continue }
                entries.append(entry)
                s.feedback.nackedThisRound.insert(BlockKey(object: object, block: b))
                if entries.count == Nack.entryCountMax {
                    flush()
                    if datagrams.count == budget { break outer }
                }
            }
        }
        flush()
        if datagrams.isEmpty { stats.nacksCancelled += 1 } else { s.feedback.lastNackAt = now }
        s.feedback.countNacks(datagrams.count, at: now)
        for n in datagrams {
            send(.nack(n), to: s.sender, at: now)
            s.feedback.nacksSent += 1
            s.feedback.nackDatagramsThisRound += 1
            stats.nackEntries += UInt64(n.entries.count)
        }
    }

    /// The NACK entry for block b, or nil: asked already, not checkable yet (P-16b),
    /// nothing needed (P-16a), or covered by a promise (P-18a).
    private mutating func nackEntry(_ s: inout Session, _ object: ObjectID, _ b: Int, _ state: ObjectState, at now: Instant) -> Nack.Entry? {
        let key = BlockKey(object: object, block: b)
        guard !s.feedback.nackedThisRound.contains(key) else { return nil }
        // Specs/protocol.md P-16b: payload the receiver could not check yet is not asked for.
        if s.chain.awaitsSegment(object, b) {
            stats.nackEntriesDeferredUntilSegment += 1
            return nil
        }
        // Held symbols, and those waiting for their segment, will count once it verifies.
        let waiting = s.pendingCount(object, block: b, excluding: state.partial[b])
        let needed = state.layout.sourceSymbols(b) - (state.partial[b]?.count ?? 0) - waiting
        guard needed > 0 else { return nil }
        if s.feedback.promisedRepair(key, at: now, lifetime: s.promiseLifetime) >= needed {
            stats.nackEntriesCoveredByPromise += 1
            return nil
        }
        return Nack.Entry(object: object, block: UInt32(b), needed: UInt8(min(needed, 255)))
    }

    /// STATUS (Specs/protocol.md §3.7).
    mutating func sendStatus(_ state: Status.State, _ reason: Status.Reason, session: SessionID, report r: StatusReport, to peer: PeerAddress, at now: Instant) {
        send(.status(Status(session: session, receiver: config.receiverID, state: state, reason: reason,
                            blocksDone: r.blocksDone, blocksTotal: r.blocksTotal, bytesReceived: r.bytesReceived, nacksSent: r.nacksSent)), to: peer, at: now)
    }
}
