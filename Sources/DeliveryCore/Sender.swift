import ErasureCoding
import BundleFormat
import WireFormat

/// Where the sender reads the bytes of the two objects. A file-backed source
/// serves the real tool; an in-memory one serves the simulator.
public protocol ObjectSource {
    func read(object: ObjectID, range: Range<UInt64>) -> [UInt8]
}

/// Both objects held in memory.
public struct InMemoryObjects: ObjectSource, Sendable {
    public let authChain: [UInt8]
    public let payload: [UInt8]
    public init(authChain: [UInt8], payload: [UInt8]) { self.authChain = authChain; self.payload = payload }
    public func read(object: ObjectID, range: Range<UInt64>) -> [UInt8] {
        let bytes = object == .payload ? payload : authChain
        return Array(bytes[Int(range.lowerBound)..<Int(range.upperBound)])
    }
}

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
    public var announceInterval = Interval.seconds(1)
    public var announceStartCopies = 3
    /// The announce is also repeated after this many data datagrams.
    public var announceEveryDataDatagrams = 256
    /// Least time between announces sent early for receivers that missed one.
    public var announceHoldoff = Interval.milliseconds(20)
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
    public var closeRepeatCount = 3
    public var carousel = false
    /// Ends the session this long after the first transmission.
    public var deadline: Interval?
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

    public init(session: SessionID, rateBytesPerSecond: Double) {
        self.session = session
        self.rateBytesPerSecond = rateBytesPerSecond
    }
}

/// What the sender knows of one receiver (the fleet report's rows).
public struct ReceiverRecord: Sendable {
    public enum State: String, Sendable { case registered, receiving, complete, failed }
    public let id: ReceiverID
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
    public var finishedAt: Instant?
}

/// How the sender sees one receiver right now (Specs/protocol.md §4.3).
public enum FleetStanding: String, Sendable {
    case done, failed, receiving
    /// Behind: under half the median progress of the receivers still receiving.
    case slow
    /// Silent for `receiverSilenceMax` without finishing.
    case gone
}

extension Sender {
    /// Who is done, failed, receiving, slow or gone, at `now`.
    public func fleet(at now: Instant) -> [(record: ReceiverRecord, standing: FleetStanding)] {
        let active = receivers.values.filter { $0.state == .registered || $0.state == .receiving }
        let fractions = active.map { $0.blocksTotal == 0 ? 0 : Double($0.blocksDone) / Double($0.blocksTotal) }.sorted()
        let median = fractions.isEmpty ? 0 : fractions[fractions.count / 2]
        return receivers.values.sorted { $0.id < $1.id }.map { r in
            let standing: FleetStanding
            switch r.state {
            case .complete: standing = .done
            case .failed: standing = .failed
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
/// all registered done / idle rounds / deadline ──► CLOSE ×3 ──► finished
/// ```
public struct Sender {
    public let config: SenderConfig
    public let manifest: Manifest
    private let envelope: [UInt8]
    private let source: any ObjectSource
    private let layouts: [ObjectLayout]  // [auth chain, payload]
    public private(set) var counters = Counters()
    public private(set) var receivers: [ReceiverID: ReceiverRecord] = [:]

    enum Phase: Equatable { case firstPass, repairRounds, carousel, closing, finished }
    private var phase: Phase = .firstPass
    public private(set) var round: UInt32 = 0
    private var roundEnds: Instant?
    private var nacksThisRound = 0
    private var idleRounds = 0
    private var closeReason: Close.Reason = .allDone
    private var closesLeft = 0
    private var startedAt: Instant?
    private var lastNewReceiverAt: Instant?
    private var grtt: Interval

    // Rate control (Specs/protocol.md P-9).
    private var tokens: Double
    /// The peak bucket: `peakBurstDatagramCount` datagrams deep, filled at `peakRateFactor` x the rate.
    private var peakTokens: Double
    private let peakBytes: Double
    /// The bucket's depth: `burstDuration` of the rate, in bounds (P-9).
    private let burstBytes: Double
    private var repairTokens: Double
    private var lastRefill: Instant?
    private let datagramWireBytes: Double

    // First pass and carousel cursor.
    private var passObject = 0
    private var windowStart = 0
    private var passSymbol = 0
    private var passOffset = 0

    // Repair (Specs/protocol.md P-8, P-11).
    private var repairQueue: [BlockKey] = []
    private var repairPending: [BlockKey: Int] = [:]
    private var suppliedThisRound: [BlockKey: Int] = [:]
    private var repairCursor: [BlockKey: Int] = [:]
    private var cache: [BlockKey: EncodedBlock] = [:]
    private var cacheOrder: [BlockKey] = []
    /// Blocks the cache holds: `blockCacheBytesMax` over a block's k + R symbols, and at
    /// least two interleave windows so that the first pass never reads a block twice.
    private let cacheBlocksMax: Int
    /// Payload blocks per first-pass NACK epoch (P-19a).
    private let nackEpochBlocks: Int
    private var codecs: [Int: ReedSolomonCodec] = [:]

    private var control: [Transmit] = []
    private var announceDue: Instant?
    private var lastAnnounceAt: Instant?
    private var nextAnnounceAtData: UInt64 = 0

    public private(set) var bytesSent: [String: UInt64] = [:]

    public init(config: SenderConfig, envelope: [UInt8], manifest: Manifest, source: any ObjectSource) {
        precondition(config.rateBytesPerSecond > 0 && config.interleaveWindow >= 1)
        self.config = config
        self.envelope = envelope
        self.manifest = manifest
        self.source = source
        layouts = [ObjectLayout(object: .authChain, size: manifest.authentication.size, profile: manifest.transport),
                   ObjectLayout(object: .payload, size: manifest.payload.size, profile: manifest.transport)]
        grtt = config.grttInitial
        datagramWireBytes = Double(DataSymbol.headerByteCount + manifest.transport.symbolSize + 28)
        let burst = config.rateBytesPerSecond * config.burstDuration.seconds / datagramWireBytes
        burstBytes = datagramWireBytes * min(max(burst.rounded(.up), Double(SenderConfig.burstDatagramCountMin)),
                                             Double(SenderConfig.burstDatagramCountMax))
        // The depth is for catching up after a late wake-up, not for a burst at the start.
        tokens = min(burstBytes, Double(SenderConfig.burstDatagramCountMin) * datagramWireBytes)
        peakBytes = Double(SenderConfig.peakBurstDatagramCount) * datagramWireBytes
        peakTokens = peakBytes
        repairTokens = tokens * config.repairShareMax
        let t = manifest.transport
        nackEpochBlocks = config.nackEpochBlocks ?? SenderConfig.nackEpochBlocks(for: t)
        cacheBlocksMax = max(2 * config.interleaveWindow,
                             config.blockCacheBytesMax / ((t.sourceSymbolsPerBlock + t.repairSymbolsPerBlock) * t.symbolSize))
    }

    public var isFinished: Bool { phase == .finished }
    /// Specs/protocol.md P-17b: the receivers' backoff (scaled by the group size) plus the NACK window.
    public var roundWindow: Interval { grtt * (config.backoffGRTTs * backoffShare(groupSize: max(receivers.count, 1)) + config.nackWindowGRTTs) }
    public var currentGRTT: Interval { grtt }
    public var totalBlocks: Int { layouts[1].blockCount }

    // MARK: Feedback in

    public mutating func handleDatagram(_ bytes: [UInt8], at now: Instant) {
        let datagram: Datagram
        do { datagram = try Datagram(parsing: bytes) } catch {
            counters.add("dropped.parse.\(error.code.rawValue)")
            return
        }
        bytesSent["feedbackReceived", default: 0] += UInt64(bytes.count + 28)
        guard datagram.sessionID == config.session else { counters.add("dropped.otherSession"); return }
        switch datagram {
        case .register(let r):
            let isNew = receivers[r.receiver] == nil
            guard var rec = record(r.receiver, at: now) else { return }
            // Specs/protocol.md P-3a: a receiver that missed the announce gets one soon.
            if isNew, phase != .closing, phase != .finished {
                let soon = max(now, (lastAnnounceAt ?? now) + config.announceHoldoff)
                if announceDue == nil || soon < announceDue! { announceDue = soon }
            }
            rec.deviceID = r.deviceID
            rec.versionBefore = r.version
            rec.installedSequence = r.installedSequence
            receivers[r.receiver] = rec
        case .nack(let n): handleNack(n, at: now)
        case .status(let s): handleStatus(s, at: now)
        case .announce, .data, .poll, .close, .ack: counters.add("dropped.fromSender")
        }
    }

    private mutating func record(_ id: ReceiverID, at now: Instant) -> ReceiverRecord? {
        if var r = receivers[id] {
            r.lastHeard = now
            return r
        }
        guard receivers.count < config.receiverTableSizeMax else { counters.add("dropped.receiverTableFull"); return nil }
        counters.add("receivers.registered")
        lastNewReceiverAt = now
        return ReceiverRecord(id: id, firstHeard: now, lastHeard: now)
    }

    private mutating func handleNack(_ n: Nack, at now: Instant) {
        guard phase != .closing && phase != .finished, var rec = record(n.receiver, at: now) else { return }
        rec.nacksReceived += 1
        rec.nacksThisRound += 1
        if rec.state == .registered { rec.state = .receiving }
        receivers[n.receiver] = rec
        guard rec.nacksThisRound <= config.nackPerReceiverPerRoundMax else { counters.add("dropped.nackRateLimited"); return }
        counters.add("nacks")
        nacksThisRound += 1
        if n.echoedSentAtMicroseconds > 0 && n.echoedSentAtMicroseconds <= now.microseconds {
            let rtt = now.microseconds - n.echoedSentAtMicroseconds - min(UInt64(n.holdMicroseconds), now.microseconds - n.echoedSentAtMicroseconds)
            updateGRTT(Interval(microseconds: rtt))
        }
        for e in n.entries {
            let layout = layouts[e.object == .authChain ? 0 : 1]
            let b = Int(e.block)
            guard b < layout.blockCount else { counters.add("dropped.nackEntryRange"); continue }
            let needed = min(Int(e.needed), layout.sourceSymbols(b))
            let key = BlockKey(object: e.object, block: b)
            var supplied = suppliedThisRound[key] ?? 0
            // An auth-chain block asked for again after its repair went out was lost again:
            // serve it again rather than wait for the next round (Specs/protocol.md P-16b).
            if e.object == .authChain && repairPending[key] == nil { supplied = 0 }
            guard needed > supplied else { counters.add("nackEntriesAlreadyServed"); continue }
            // Specs/protocol.md P-11a: after the first pass a round trip costs several GRTTs,
            // so repair first queued for a block in a round carries a margin against its own loss.
            let margin = phase == .repairRounds && suppliedThisRound[key] == nil
                ? Int((Double(needed) * config.roundRepairMarginFraction).rounded(.up)) : 0
            suppliedThisRound[key] = needed
            // The auth chain gates every payload symbol's check: its repair goes first.
            if repairPending[key] == nil {
                if e.object == .authChain { repairQueue.insert(key, at: 0) } else { repairQueue.append(key) }
            }
            repairPending[key, default: 0] += needed - supplied + margin
            counters.add("repair.queued.round\(round)", UInt64(needed - supplied + margin))
            if margin > 0 { counters.add("repair.margin", UInt64(margin)) }
        }
    }

    private mutating func updateGRTT(_ rtt: Interval) {
        let clamped = min(max(rtt, config.grttMin), config.grttMax)
        grtt = clamped > grtt ? clamped : Interval(microseconds: (grtt.microseconds * 15 + clamped.microseconds) / 16)
    }

    private mutating func handleStatus(_ s: Status, at now: Instant) {
        guard var rec = record(s.receiver, at: now) else { return }
        rec.blocksDone = s.blocksDone
        rec.blocksTotal = s.blocksTotal
        rec.bytesReceived = s.bytesReceived
        rec.nacksReported = s.nacksSent
        switch s.state {
        case .receiving: if rec.state == .registered { rec.state = .receiving }
        case .complete, .failed:
            if rec.state != .complete && rec.state != .failed {
                rec.state = s.state == .complete ? .complete : .failed
                rec.failureReason = s.state == .failed ? s.reason : nil
                rec.finishedAt = now
                counters.add("receivers.\(rec.state.rawValue)")
            }
            control.append(ack(s.receiver, s.state))
        }
        receivers[s.receiver] = rec
        checkAllDone(at: now)
    }

    private mutating func checkAllDone(at now: Instant) {
        guard phase == .repairRounds, !receivers.isEmpty else { return }
        if let expected = config.expectedReceivers, receivers.count < expected { return }
        if receivers.values.allSatisfy({ $0.state == .complete || $0.state == .failed }) { startClosing(.allDone) }
    }

    /// ACK of a receiver's final STATUS (unicast, Specs/protocol.md P-13, P-21).
    private func ack(_ receiver: ReceiverID, _ state: Status.State) -> Transmit {
        Transmit(destination: .receiver(receiver), bytes: Datagram.ack(Ack(session: config.session, receiver: receiver, state: state)).encoded())
    }

    private mutating func startClosing(_ reason: Close.Reason) {
        guard phase != .closing && phase != .finished else { return }
        phase = .closing
        closeReason = reason
        closesLeft = config.closeRepeatCount
        counters.add("close.\(reason)")
        // Specs/protocol.md P-21: every receiver was heard done, but an ACK may have been
        // lost, and such a receiver repeats its STATUS until the CLOSE has been quiet for
        // a while. More ACKs, one with each CLOSE, let it stop at once.
        if reason == .allDone {
            let done = receivers.values.filter { $0.state == .complete || $0.state == .failed }.sorted { $0.id < $1.id }
            let acks = done.map { ack($0.id, $0.state == .complete ? .complete : .failed) }
            for _ in 0..<config.closeRepeatCount { control.append(contentsOf: acks) }
        }
    }

    // MARK: Time

    public mutating func handleTimeout(at now: Instant) {
        if startedAt == nil { startedAt = now }
        if let d = config.deadline, let start = startedAt, now >= start + d, phase != .closing, phase != .finished {
            startClosing(.deadline)
        }
        if phase == .repairRounds, roundEnds == nil, repairQueue.isEmpty { startRound(at: now) }
        if phase == .repairRounds, let end = roundEnds, now >= end, repairQueue.isEmpty {
            if nacksThisRound == 0 { idleRounds += 1 } else { idleRounds = 0 }
            counters.add(nacksThisRound == 0 ? "rounds.idle" : "rounds.busy")
            // Specs/protocol.md P-12: idle rounds end the session only once every receiver
            // still missing blocks has been silent for `receiverSilenceMax` (it is gone).
            var waitingFor = receivers.values.contains { r in
                r.state != .complete && r.state != .failed && now < r.lastHeard + config.receiverSilenceMax
            }
            // Expected receivers that have not registered yet: wait for them a while too.
            if let expected = config.expectedReceivers, receivers.count < expected,
               now < (lastNewReceiverAt ?? startedAt ?? now) + config.expectedReceiverWaitMax {
                waitingFor = true
            }
            if idleRounds >= config.idleRoundsMax && !waitingFor { startClosing(.idle); return }
            startRound(at: now)
        }
    }

    /// Specs/protocol.md P-10: POLL, then a NACK window.
    private mutating func startRound(at now: Instant) {
        round += 1
        nacksThisRound = 0
        suppliedThisRound.removeAll()
        for id in receivers.keys { receivers[id]!.nacksThisRound = 0 }
        // Specs/protocol.md P-12: a sender that only waits polls at a slower pace.
        roundEnds = now + (idleRounds >= config.idleRoundsMax ? max(roundWindow, config.waitingRoundInterval) : roundWindow)
        checkAllDone(at: now)  // a STATUS may have arrived during the first pass
        // Receivers known only by their hello have not joined yet: announce again.
        if receivers.values.contains(where: { $0.state == .registered }) { announceDue = now }
        control.append(Transmit(destination: .group, bytes: Datagram.poll(Poll(
            session: config.session, round: round, sentAtMicroseconds: max(now.microseconds, 1),
            grttMicroseconds: UInt32(min(grtt.microseconds, UInt64(UInt32.max))), groupSize: UInt32(max(receivers.count, 1)))).encoded()))
    }

    /// When `handleTimeout` or `pollTransmit` next has work.
    public func nextDeadline(at now: Instant) -> Instant? {
        if phase == .finished { return nil }
        var candidates: [Instant] = []
        if let a = announceDue { candidates.append(a) }
        if let d = config.deadline, let s = startedAt { candidates.append(s + d) }
        if phase == .repairRounds, let end = roundEnds { candidates.append(end) }
        if !control.isEmpty || hasDataReady {
            let wait = max((datagramWireBytes - tokens) / config.rateBytesPerSecond,
                           (datagramWireBytes - peakTokens) / (config.rateBytesPerSecond * config.peakRateFactor))
            candidates.append(wait <= 0 ? now : now + Interval(microseconds: UInt64((wait * 1e6).rounded(.up))))
        }
        return candidates.min()
    }

    private var hasDataReady: Bool {
        switch phase {
        case .firstPass, .carousel, .closing: true
        case .repairRounds: !repairQueue.isEmpty
        case .finished: false
        }
    }

    private mutating func refill(at now: Instant) {
        if startedAt == nil { startedAt = now }
        if let last = lastRefill, now > last {
            let earned = Double((now - last).microseconds) / 1e6 * config.rateBytesPerSecond
            tokens = min(burstBytes, tokens + earned)
            peakTokens = min(peakBytes, peakTokens + earned * config.peakRateFactor)
            repairTokens = min(burstBytes * config.repairShareMax, repairTokens + earned * config.repairShareMax)
        }
        lastRefill = now
    }

    // MARK: Transmit

    /// The next datagram to send now, or nil (then wait for `nextDeadline`).
    public mutating func pollTransmit(at now: Instant) -> Transmit? {
        refill(at: now)
        let dataSent = (counters["sent.source"] + counters["sent.repair"])
        if dataSent >= nextAnnounceAtData, phase != .closing, phase != .finished {
            announceDue = now
        }
        if announceDue == nil || announceDue! <= now, phase != .closing, phase != .finished {
            // The first announce goes out `announceStartCopies` times: a receiver that misses it
            // would otherwise fetch everything late (Specs/protocol.md §3.1).
            let copies = lastAnnounceAt == nil ? config.announceStartCopies : 1
            nextAnnounceAtData = dataSent + UInt64(config.announceEveryDataDatagrams)
            for _ in 0..<copies { for f in Announce.fragments(of: envelope) {
                control.append(Transmit(destination: .group, bytes: Datagram.announce(Announce(
                    session: config.session, carousel: config.carousel, rateKilobytesPerSecond: UInt32(min(config.rateBytesPerSecond / 1000, Double(UInt32.max))),
                    grttMicroseconds: UInt32(min(grtt.microseconds, UInt64(UInt32.max))), groupSize: UInt32(max(receivers.count, 1)),
                    interleaveWindow: UInt16(config.interleaveWindow), fragmentIndex: f.index, fragmentCount: f.count,
                    envelopeLength: UInt32(envelope.count), fragment: f.bytes)).encoded()))
            } }
            announceDue = now + config.announceInterval
            lastAnnounceAt = now
            counters.add("announces")
        }
        if !control.isEmpty {
            let t = control[0]
            if t.destination == .group {
                let cost = Double(t.bytes.count + 28)
                guard (tokens >= cost || tokens >= datagramWireBytes) && peakTokens >= datagramWireBytes else { return nil }
                debitTokens(cost)
            }
            control.removeFirst()
            account("control", t)
            return t
        }
        guard tokens >= datagramWireBytes && peakTokens >= datagramWireBytes else { return nil }
        switch phase {
        case .finished: return nil
        case .closing:
            guard closesLeft > 0 else { phase = .finished; return nil }
            closesLeft -= 1
            if closesLeft == 0 { phase = .finished }
            return spend(Transmit(destination: .group, bytes: Datagram.close(Close(session: config.session, reason: closeReason)).encoded()), "control")
        case .firstPass:
            // Specs/protocol.md P-9: while source remains, repair takes at most its share.
            if !repairQueue.isEmpty && repairTokens >= datagramWireBytes, let t = nextRepair() {
                repairTokens -= datagramWireBytes
                return spend(t, "repair")
            }
            if let t = nextFirstPassSymbol() { return spend(t, "source") }
            if config.carousel {
                phase = .carousel
                passObject = 0; windowStart = 0; passSymbol = 0; passOffset = 0
            } else {
                // Specs/protocol.md P-10: POLL only once the repair already asked for has gone
                // out; receivers polled earlier would ask again for what is still queued.
                phase = .repairRounds
                roundEnds = nil
                if repairQueue.isEmpty { startRound(at: now) }
            }
            return pollTransmit(at: now)
        case .repairRounds:
            guard let t = nextRepair() else { return nil }
            return spend(t, "repair")
        case .carousel:
            return spend(nextCarouselSymbol(), "repair")
        }
    }

    private mutating func spend(_ t: Transmit, _ category: String) -> Transmit {
        debitTokens(Double(t.bytes.count + 28))
        account(category, t)
        return t
    }

    /// A multicast datagram of `bytes` on the wire spends from both buckets (P-9).
    private mutating func debitTokens(_ bytes: Double) {
        tokens -= bytes
        peakTokens -= bytes
    }

    private mutating func account(_ category: String, _ t: Transmit) {
        bytesSent[category, default: 0] += UInt64(t.bytes.count + 28)
        counters.add("sent.\(category)")
    }

    /// Specs/protocol.md P-7: windows of W blocks, symbol by symbol across the window.
    private mutating func nextFirstPassSymbol() -> Transmit? {
        while passObject < 2 {
            let layout = layouts[passObject]
            let windowEnd = min(windowStart + config.interleaveWindow, layout.blockCount)
            guard windowStart < layout.blockCount else { passObject += 1; windowStart = 0; passSymbol = 0; passOffset = 0; continue }
            let widest = (windowStart..<windowEnd).map { firstPassCount(layout, $0) }.max() ?? 0
            while passSymbol < widest {
                while passOffset < windowEnd - windowStart {
                    let b = windowStart + passOffset
                    passOffset += 1
                    guard passSymbol < firstPassCount(layout, b) else { continue }
                    let k = layout.sourceSymbols(b)
                    let index = passSymbol < k ? passSymbol : k + (passSymbol - k)
                    if passSymbol >= k { repairCursor[BlockKey(object: layout.object, block: b), default: 0] += 1 }
                    return dataTransmit(layout, block: b, index: index)
                }
                passOffset = 0
                passSymbol += 1
            }
            windowStart = windowEnd
            // P-19a: the epoch of a window is that of its last block; a window whose last
            // block is in a later epoch than the previous window's starts that epoch.
            if layout.object == .payload && windowStart < layout.blockCount {
                let last = min(windowStart + config.interleaveWindow, layout.blockCount) - 1
                if last / nackEpochBlocks > (windowStart - 1) / nackEpochBlocks { startNackEpoch() }
            }
            passSymbol = 0
            passOffset = 0
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
        suppliedThisRound = suppliedThisRound.filter { repairPending[$0.key] != nil }
        counters.add("nackEpochs")
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
            let layout = layouts[passObject]
            if windowStart >= layout.blockCount { passObject = (passObject + 1) % 2; windowStart = 0; passSymbol = 0; continue }
            let b = windowStart
            if passSymbol >= layout.sourceSymbols(b) { windowStart += 1; passSymbol = 0; continue }
            passSymbol += 1
            return dataTransmit(layout, block: b, index: nextFreshIndex(BlockKey(object: layout.object, block: b)))
        }
    }

    private mutating func nextRepair() -> Transmit? {
        while let key = repairQueue.first {
            let left = repairPending[key] ?? 0
            if left <= 1 { repairQueue.removeFirst(); repairPending[key] = nil } else { repairPending[key] = left - 1 }
            if left >= 1 {
                return dataTransmit(layouts[key.object == .authChain ? 0 : 1], block: key.block, index: nextFreshIndex(key),
                                    pendingRepair: UInt16(min(left - 1, Int(UInt16.max))))
            }
        }
        return nil
    }

    /// Specs/protocol.md P-8: k_b..k_b+R-1, then 0..k_b-1, then again.
    private mutating func nextFreshIndex(_ key: BlockKey) -> Int {
        let layout = layouts[key.object == .authChain ? 0 : 1]
        let k = layout.sourceSymbols(key.block), r = manifest.transport.repairSymbolsPerBlock
        let p = repairCursor[key, default: 0]
        repairCursor[key] = p + 1
        let q = p % (k + r)
        return q < r ? k + q : q - r
    }

    private mutating func dataTransmit(_ layout: ObjectLayout, block b: Int, index: Int, pendingRepair: UInt16 = 0) -> Transmit {
        let symbol = symbolBytes(layout, block: b, index: index)
        return Transmit(destination: .group, bytes: Datagram.data(DataSymbol(session: config.session, object: layout.object, block: UInt32(b),
                                                                              symbolIndex: UInt8(index), pendingRepair: pendingRepair, symbol: symbol)).encoded())
    }

    /// A symbol of a block: source symbols are read once per cache lifetime of the
    /// block; its repair symbols are encoded `repairRowsPerEncode` at a time as they
    /// are first needed, so a pass without repair costs no encoding.
    private mutating func symbolBytes(_ layout: ObjectLayout, block b: Int, index: Int) -> [UInt8] {
        let key = BlockKey(object: layout.object, block: b)
        let t = manifest.transport.symbolSize
        let k = layout.sourceSymbols(b), r = manifest.transport.repairSymbolsPerBlock
        if cache[key] == nil {
            let range = layout.geometry.byteRange(ofBlock: b)
            var padded = source.read(object: layout.object, range: range)
            padded += [UInt8](repeating: 0, count: k * t - padded.count)
            if cacheOrder.count >= cacheBlocksMax { cache[cacheOrder.removeFirst()] = nil }
            cache[key] = EncodedBlock(k: k, source: padded)
            cacheOrder.append(key)
        }
        if index < k { return Array(cache[key]!.source[(index * t)..<((index + 1) * t)]) }
        precondition(index < k + r, "repair index \(index) beyond the ceiling")
        let row = index - k
        if cache[key]!.repairRowsEncoded <= row {
            let codec = codecs[k] ?? (try! ReedSolomonCodec(sourceCount: k))
            codecs[k] = codec
            var block = cache[key]!
            cache[key] = nil  // mutate outside the dictionary: no copy of the buffers
            if block.repairs.isEmpty { block.repairs = [UInt8](repeating: 0, count: r * t) }
            while block.repairRowsEncoded <= row {
                let rows = block.repairRowsEncoded..<min(block.repairRowsEncoded + Self.repairRowsPerEncode, r)
                block.source.withUnsafeBytes { p in
                    block.repairs.withUnsafeMutableBytes { out in
                        let slice = UnsafeMutableRawBufferPointer(rebasing: out[(rows.lowerBound * t)..<(rows.upperBound * t)])
                        try! codec.encode(block: p, symbolSize: t, repairIndices: (k + rows.lowerBound)..<(k + rows.upperBound), into: slice)
                    }
                }
                block.repairRowsEncoded = rows.upperBound
            }
            cache[key] = block
        }
        return Array(cache[key]!.repairs[(row * t)..<((row + 1) * t)])
    }

    /// Repair symbols are encoded this many at a time, as they are first asked for:
    /// the first pass's proactive repair (10 of the default profile's 56) and a typical
    /// round's needs then cost a fraction of encoding all R.
    static let repairRowsPerEncode = 16
}

struct EncodedBlock {
    let k: Int
    let source: [UInt8]
    /// R x T bytes, allocated on the first request for a repair symbol of the block;
    /// rows below `repairRowsEncoded` hold their symbols.
    var repairs: [UInt8] = []
    var repairRowsEncoded = 0
}
