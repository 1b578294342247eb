import ErasureCoding
import FleetCrypto
import SeededRandom
import BundleFormat
import WireFormat

/// How a receiver behaves; every limit has a name and a default (Specs/protocol.md §6).
public struct ReceiverConfig: Sendable {
    public var receiverID: ReceiverID
    public var deviceID: String
    public var installedVersion: String
    public var trust: TrustPolicy
    /// Hardware ID, installed sequence and the wall-clock time for expiry.
    public var device: DevicePolicy
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
    /// Bytes of verified auth-chain segments kept in memory (Specs/protocol.md P-5c).
    /// Beyond it, with an `AuthChainReader`, the least recently used segment whose
    /// bytes are staged leaves memory and is read back (and hashed again) when a
    /// symbol of its blocks arrives. 16 segments of the default profile (4.2 MB), where
    /// a 1 GiB payload's whole chain is 15.8 MB and a 4 GiB one's 63 MB.
    public var segmentBytesInMemoryMax = 16 * 264_240
    public var unauthenticatedSymbolCountMax = 1024
    public var backoffGRTTs = 4.0
    public var nackDatagramsPerRoundMax = 8
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

    public init(receiverID: ReceiverID, deviceID: String, installedVersion: String, trust: TrustPolicy, device: DevicePolicy, seed: UInt64) {
        self.receiverID = receiverID; self.deviceID = deviceID; self.installedVersion = installedVersion
        self.trust = trust; self.device = device; self.seed = seed
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

/// What the receiver asks of its driver, in order.
public enum ReceiverEvent: Sendable {
    case joined(session: SessionID, manifest: Manifest)
    /// Write these bytes (exact, unpadded) at `offset` of the object's staging file.
    case store(object: ObjectID, block: Int, offset: UInt64, bytes: [UInt8])
    /// Make every stored byte durable, then record this journal atomically.
    case commit(ProgressJournal)
    case completed
    case failed(Status.Reason, String)
}

/// Step 1 as a sans-I/O state machine (Specs/protocol.md §5): datagrams and
/// timeouts in, datagrams and storage events out. No clock, no socket, no disk.
///
/// ```
/// listening ──ANNOUNCE verified──► receiving ──all blocks──► complete (STATUS until ACK)
///     ▲                                │
///     └── inactivity (not joined yet)  └── policy refused / CLOSE / timeout ──► failed
/// ```
public struct Receiver {
    public let config: ReceiverConfig
    public private(set) var counters = Counters()
    private var rng: SeededRandom
    private var phase: Phase = .listening
    private var collector = EnvelopeCollector()
    private var resume: ResumeState?
    private var session: Session?
    private var outgoing: [Transmit] = []
    private var events: [ReceiverEvent] = []

    enum Phase: Equatable { case listening, receiving, complete, failed }

    /// Where the symbols of incomplete blocks go once the session's `blocksInMemoryMax` blocks are held.
    private let spill: SymbolSpill
    /// Reads staged auth-chain bytes back, so that segments may leave memory (P-5c); nil keeps them all.
    private let authReader: AuthChainReader?

    public init(config: ReceiverConfig, resume: ResumeState? = nil, spill: SymbolSpill = MemorySpill(), authReader: AuthChainReader? = nil) {
        self.config = config
        self.spill = spill
        self.authReader = authReader
        self.rng = SeededRandom(seed: config.seed)
        self.resume = resume
    }

    // MARK: Queries

    public var isComplete: Bool { phase == .complete }
    public var isFailed: Bool { phase == .failed }
    public var isFinished: Bool { (phase == .complete || phase == .failed) && (session?.finalAcknowledged ?? true) }
    public var manifest: Manifest? { session?.manifest.manifest }
    /// The joined session's manifest with its verified signers (for the driver's recipient check).
    public var verifiedManifest: VerifiedManifest? { session?.manifest }
    public var blocksDone: Int { session?.payload.doneCount ?? 0 }
    /// Whether payload block `b` of the joined session is verified and staged.
    public func isPayloadBlockDone(_ b: Int) -> Bool {
        guard b >= 0, b < session?.payload?.layout.blockCount ?? 0 else { return false }
        return session?.payload?.done[b] ?? false
    }
    public var nacksSent: Int { session?.nacksSent ?? 0 }
    /// Incomplete blocks that went to the spill because the memory budget was full (P-5a).
    public var blocksSpilled: UInt64 { (session?.payload?.evictions ?? 0) + (session?.auth?.evictions ?? 0) }
    /// Authenticated segments whose tags are held (Specs/protocol.md P-5b: none once complete).
    public var authSegmentsHeld: Int { session?.segments.count ?? 0 }
    public var failure: (Status.Reason, String)? { failureInfo }
    /// The signed envelope of the session joined (the driver lays out staging by it).
    public var envelope: [UInt8]? { session?.envelope }
    private var failureInfo: (Status.Reason, String)?

    /// The earliest instant at which `handleTimeout` has something to do.
    public var nextDeadline: Instant? {
        guard let s = session else { return nil }
        return [s.nackDue, s.statusDue, s.inactivityDeadline, s.closeConfirmAt].compactMap { $0 }.min()
    }

    // MARK: Polling

    public mutating func pollTransmit() -> Transmit? { outgoing.isEmpty ? nil : outgoing.removeFirst() }
    /// The caller carries out each event as it takes it (before its next call into the
    /// receiver): P-5c relies on it to know which auth-chain bytes are staged.
    public mutating func pollEvent() -> ReceiverEvent? {
        guard !events.isEmpty else { return nil }
        let e = events.removeFirst()
        if case .store(.authChain, let block, _, _) = e { session?.authBlocksStored.insert(block) }
        return e
    }

    // MARK: Events in

    public mutating func handleDatagram(_ bytes: [UInt8], at now: Instant) {
        let datagram: Datagram
        do { datagram = try Datagram(parsing: bytes) } catch {
            counters.add("dropped.parse.\(error.code.rawValue)")
            return
        }
        if let id = session?.id {
            guard datagram.sessionID == id else {
                counters.add("dropped.otherSession")
                // A new session may carry the same bundle (the sender restarted): accept its announce below.
                if case .announce(let a) = datagram, phase == .receiving { handleAnnounce(a, at: now) }
                return
            }
            if phase == .receiving { session!.inactivityDeadline = now + config.inactivityTimeout }
            // Specs/protocol.md P-21: an ANNOUNCE or POLL says the sender is alive, so a CLOSE
            // heard after the final STATUS was forged: keep repeating the STATUS until ACKed.
            // (DATA does not count here: a complete receiver no longer checks its tags.)
            if phase != .receiving, datagram.kind == .announce || datagram.kind == .poll { session!.closeConfirmAt = nil }
            session!.lastHeard = now
        }
        if session == nil, datagram.kind == .data || datagram.kind == .poll {
            requestAnnounce(datagram.sessionID, at: now)
            // Specs/protocol.md P-3b: keep a bounded number of DATA datagrams seen before the
            // announce; they are checked like any other once the manifest verifies.
            if case .data(let d) = datagram, phase == .listening {
                if preJoin.count < config.unauthenticatedSymbolCountMax { preJoin.append(d) } else { counters.add("dropped.data.preJoinBufferFull") }
                return
            }
        }
        switch datagram {
        case .announce(let a): handleAnnounce(a, at: now)
        case .data(let d): handleData(d, at: now)
        case .poll(let p): handlePoll(p, at: now)
        case .close(let c): handleClose(c, at: now)
        case .ack(let a): handleAck(a)
        case .register, .nack, .status: counters.add("dropped.feedbackFromPeer")
        }
    }

    public mutating func handleTimeout(at now: Instant) {
        guard var s = session.take() else { return }  // own it while mutating: no copy of the session or its block buffers
        if let due = s.nackDue, due <= now {
            s.nackDue = nil
            sendNacks(&s, at: now)
        }
        if let due = s.statusDue, due <= now { sendStatus(&s, at: now) }
        let inactive = s.inactivityDeadline.map { $0 <= now } ?? false
        let closed = s.closeConfirmAt.map { $0 <= now } ?? false
        if phase != .receiving {
            s.inactivityDeadline = nil
            // Specs/protocol.md P-21: a CLOSE followed by quiet: the sender has gone and
            // will ACK nothing, so the final STATUS stops repeating.
            if closed {
                s.closeConfirmAt = nil
                s.statusDue = nil
                s.finalAcknowledged = true
                counters.add("status.closedBeforeAck")
            }
        }
        session = s
        if closed && phase == .receiving {
            fail(.sessionClosed, "the sender closed the session before every block arrived", at: now)
        } else if inactive && phase == .receiving {
            fail(.timedOut, "no datagram from the sender for \(config.inactivityTimeout.seconds) s", at: now)
        }
    }

    // MARK: Announce and join

    /// Specs/protocol.md P-3a: traffic of a session whose announce this receiver
    /// missed. It says hello (REGISTER) so that the sender announces again and
    /// waits for it; at most once per `statusInterval`.
    private mutating func requestAnnounce(_ id: SessionID, at now: Instant) {
        if let last = lastHello, now < last + config.statusInterval { return }
        lastHello = now
        counters.add("hello")
        send(registration(for: id))
    }

    /// REGISTER for a session: who this device is and what it runs (Specs/protocol.md §3.5).
    private func registration(for id: SessionID) -> Datagram {
        .register(Register(session: id, receiver: config.receiverID, installedSequence: config.device.installedSequence ?? 0,
                           deviceID: String(config.deviceID.utf8.prefix(Register.textByteCountMax))!,
                           version: String(config.installedVersion.utf8.prefix(Register.textByteCountMax))!))
    }

    private var lastHello: Instant?
    private var preJoin: [DataSymbol] = []

    private mutating func handleAnnounce(_ a: Announce, at now: Instant) {
        if let s = session {
            // Same session: refresh timing. Another session of the same bundle: switch to it (sender restart).
            if a.session == s.id {
                session!.grtt = Self.clampGRTT(a.grttMicroseconds)
                session!.groupSize = Int(min(a.groupSize, Self.groupSizeMax))
                return
            }
            guard phase == .receiving else { return }
        }
        guard let envelope = collector.add(a) else { return }
        if let told = refusedEnvelopes[SHA256.hash(envelope)], told >= config.statusRepeatMax { counters.add("dropped.announce.refusedBefore"); return }
        if var s = session {
            // Only once the current session has gone quiet: a replayed announce of an older
            // session of the same bundle must not pull a live receiver away (Specs/protocol.md P-2).
            if envelope == s.envelope, now >= s.lastHeard + config.sessionSwitchQuiet {
                s.id = a.session
                s.inactivityDeadline = now + config.inactivityTimeout
                session = s
                counters.add("session.switched")
            }
            return
        }
        let verified: VerifiedManifest
        do {
            verified = try ManifestVerifier.verify(envelope: envelope, trust: config.trust, device: config.device)
        } catch {
            switch error.code {
            case .expired: refuse(.expired, error, a, envelope, at: now)
            case .incompatibleHardware: refuse(.incompatibleHardware, error, a, envelope, at: now)
            case .rollback: refuse(.rollback, error, a, envelope, at: now)
            default:
                // Forged or corrupt: keep listening for a genuine announce (Specs/protocol.md P-4).
                counters.add("dropped.announce.\(error.code.rawValue)")
            }
            return
        }
        join(a, envelope: envelope, verified: verified, at: now)
    }

    /// Specs/protocol.md P-4: a validly signed announce the device must refuse (expired,
    /// other hardware, rollback). It may be a replay of an old session, so the receiver
    /// keeps listening; it tells that session's sender why, a bounded number of times.
    private mutating func refuse(_ reason: Status.Reason, _ error: BundleError, _ a: Announce, _ envelope: [UInt8], at now: Instant) {
        counters.add("refused.\(error.code.rawValue)")
        lastRefusal = (reason, error.reason)
        let key = SHA256.hash(envelope)
        let told = refusedEnvelopes[key, default: 0]
        guard told < config.statusRepeatMax else { return }
        if refusedEnvelopes[key] == nil && refusedEnvelopes.count >= Self.refusedEnvelopeCountMax { refusedEnvelopes.removeAll() }
        refusedEnvelopes[key] = told + 1
        guard !a.carousel else { return }
        send(.status(Status(session: a.session, receiver: config.receiverID, state: .failed, reason: reason,
                            blocksDone: 0, blocksTotal: 0, bytesReceived: 0, nacksSent: 0)))
    }

    /// Timing from unauthenticated datagrams is clamped: a corrupted GRTT must not park
    /// the NACK timer for an hour.
    static let grttMin = Interval(microseconds: 100)
    static let grttMax = Interval.seconds(2)
    static let groupSizeMax: UInt32 = 1 << 20
    static func clampGRTT(_ microseconds: UInt32) -> Interval {
        min(max(Interval(microseconds: UInt64(microseconds)), grttMin), grttMax)
    }

    /// Refused envelopes remembered, so a repeated announce is not verified and answered forever.
    static let refusedEnvelopeCountMax = 8
    private var refusedEnvelopes: [[UInt8]: Int] = [:]
    /// The last validly signed announce this device refused, and why.
    public private(set) var lastRefusal: (Status.Reason, String)?

    private mutating func join(_ a: Announce, envelope: [UInt8], verified: VerifiedManifest, at now: Instant) {
        var s = Session(id: a.session, envelope: envelope, announce: a, now: now, config: config, carousel: a.carousel)
        s.attach(verified, config: config)
        phase = .receiving
        events.append(.joined(session: a.session, manifest: verified.manifest))
        counters.add("joined")
        session = s
        if let r = resume, r.progress.envelope == envelope {
            // Specs/protocol.md P-20: journalled blocks are durable; do not ask for them again.
            for (b, bytes) in r.authBlockBytes.sorted(by: { $0.key < $1.key }) where r.progress.authBlocks.contains(b) {
                session!.markAuthBlock(b, bytes: bytes)
            }
            session!.advanceSegments(counters: &counters)
            session!.verifiedAuthBlocks.removeAll()  // already in storage
            for b in r.progress.payloadBlocks where b < session!.payload.layout.blockCount && !session!.payload.done[b] {
                session!.payload.markDone(b)
                session!.releaseSegmentIfDone(containing: b)
            }
            counters.add("resumed.payloadBlocks", UInt64(r.progress.payloadBlocks.count))
        }
        resume = nil
        let early = preJoin.filter { $0.session == a.session }
        preJoin.removeAll()
        for d in early { handleData(d, at: now) }
        counters.add("preJoin.replayed", UInt64(early.count))
        if !s.carousel {
            send(registration(for: a.session))
        }
        checkComplete(at: now)
    }

    // MARK: Data

    private mutating func handleData(_ d: DataSymbol, at now: Instant) {
        // Move the session out while mutating: no copy of its fields or of the block buffers.
        guard phase == .receiving, var s = session.take() else {
            counters.add("dropped.dataNotReceiving")
            return
        }
        defer { session = s }
        guard s.manifest != nil else {
            counters.add("dropped.dataNotReceiving")
            return
        }
        s.bytesReceived += UInt64(d.symbol.count + DataSymbol.headerByteCount)
        let profile: TransportProfile = s.profile
        guard d.symbol.count == profile.symbolSize else { counters.add("dropped.data.symbolSize"); return }
        let layout = d.object == .payload ? s.payload.layout : s.auth.layout
        let b = Int(d.block), i = Int(d.symbolIndex)
        guard b < layout.blockCount else { counters.add("dropped.data.blockRange"); return }
        guard i < layout.symbolCount(b) else { counters.add("dropped.data.symbolRange"); return }
        s.observeFrontier(object: d.object, block: b)
        // Specs/protocol.md P-18a: the sender's promise of more repair for this block this round.
        if d.pendingRepair > 0 || s.promised[BlockKey(object: d.object, block: b)] != nil {
            s.promised[BlockKey(object: d.object, block: b)] = RepairPromise(count: Int(d.pendingRepair), heardAt: now)
        }
        if s.frontierAdvanced {
            s.frontierAdvanced = false
            // Specs/protocol.md P-16b: until the auth chain is in, every window of the first
            // pass is a new chance to ask for it (a lost repair must not wait for the POLL).
            if !s.afterPoll && s.nextSegment < (s.layout?.segmentCount ?? 0) {
                s.nackedThisRound = s.nackedThisRound.filter { $0.object != .authChain }
                s.nackDatagramsThisRound = 0
            }
            // Specs/protocol.md P-19a: a new epoch of the first pass: a fresh NACK allowance, and
            // blocks asked for earlier whose promised repair has all gone by may be asked for again.
            if !s.afterPoll && d.object == .payload && b / s.nackEpochBlocks > s.nackEpoch {
                s.nackEpoch = b / s.nackEpochBlocks
                s.nackDatagramsThisRound = 0
                s.nackedThisRound = s.nackedThisRound.filter { $0.object == .authChain || s.promisedRepair($0, at: now) > 0 }
            }
            scheduleNack(&s, at: now)
        }

        // Specs/protocol.md P-5c: segments beyond the budget leave memory here, while the
        // chain arrives (it comes first, P-7) as well as during the payload; only those whose
        // bytes the driver has stored (it took their `.store` events).
        evictSegmentsIfNeeded(&s)
        if d.object == .payload {
            // A done block's symbols are dropped before their tag is computed (its
            // segment may be released, P-5b).
            if s.payload.done[b] { counters.add(.dataBlockDone); return }
            // Specs/protocol.md P-5c: a segment that left memory comes back when a symbol of
            // its blocks needs it.
            guard reloadSegmentIfEvicted(&s, block: b, at: now) else { return }
            guard let authentic = s.tagMatches(d) else {
                // Specs/protocol.md P-5: never decode an unauthenticated symbol; hold a bounded few.
                if s.pendingSymbols.count < config.unauthenticatedSymbolCountMax { s.pendingSymbols.append(d) }
                else { counters.add("dropped.data.unauthenticatedBufferFull") }
                return
            }
            guard authentic else { counters.add("dropped.data.badTag"); return }
            s.closeConfirmAt = nil  // genuine data: the sender is still there
        }
        accept(&s, object: d.object, block: b, index: i, symbol: d.symbol, at: now)
        // A segment may have just verified: the held symbols of its blocks can now be checked.
        if s.segmentsAdvanced {
            s.segmentsAdvanced = false
            let held = s.pendingSymbols
            s.pendingSymbols.removeAll()
            for p in held {
                guard let authentic = s.tagMatches(p) else { s.pendingSymbols.append(p); continue }
                guard authentic else { counters.add("dropped.data.badTag"); continue }
                accept(&s, object: .payload, block: Int(p.block), index: Int(p.symbolIndex), symbol: p.symbol, at: now)
            }
        }
    }

    private mutating func accept(_ s: inout Session, object: ObjectID, block b: Int, index i: Int, symbol: ArraySlice<UInt8>, at now: Instant) {
        let limit = config.blocksInFlightMax
        let symbolSize = s.profile.symbolSize
        // Mutate the object's state in place: a copy would copy every partial block's buffer.
        let outcome: AcceptOutcome = object == .payload
            ? Self.add(&s.payload!, block: b, index: i, symbol: symbol, limit: limit, hotMax: s.blocksInMemoryMax, symbolSize: symbolSize, spill: spill)
            : Self.add(&s.auth!, block: b, index: i, symbol: symbol, limit: limit, hotMax: s.blocksInMemoryMax, symbolSize: symbolSize, spill: spill)
        let partial: PartialBlock
        switch outcome {
        case .blockDone: counters.add(.dataBlockDone); return
        case .tooManyBlocks: counters.add("dropped.data.blocksInFlight"); return
        case .duplicate: counters.add(.dataDuplicate); return
        case .held: counters.add(object == .payload ? .acceptedPayload : .acceptedAuth); return
        case .decodable(let p):
            counters.add(object == .payload ? .acceptedPayload : .acceptedAuth)
            partial = p
        }
        let state: ObjectState = object == .payload ? s.payload : s.auth
        let padded = partial.decode(codec: s.codec(k: partial.k))
        let reconstructed = partial.presentSources.contains(false)
        if reconstructed { counters.add(object == .payload ? "blocks.repaired" : "blocks.authRepaired") }
        let range = state.layout.geometry.byteRange(ofBlock: b)
        // Only a short last block is trimmed (copied); a full one is handed on as it is.
        let exact = padded.count == range.count ? padded : Array(padded.prefix(range.count))
        if object == .payload {
            // Specs/bundle.md B-14: a block rebuilt from repair symbols is checked before
            // staging, by the tags of the source symbols the decoder rebuilt: the others
            // matched theirs on arrival. A block whose k source symbols all arrived is
            // already authenticated byte for byte.
            if reconstructed {
                guard reloadSegmentIfEvicted(&s, block: b, at: now) else { return }
                let seg = s.segments[b / s.layout!.blocksPerSegment]!
                let authentic = padded.withUnsafeBytes {
                    Self.rebuiltSymbolsMatch($0, present: partial.presentSources, block: b, symbolSize: symbolSize, segment: seg)
                }
                guard authentic else {
                    counters.add("rebuiltTagFailures")
                    return
                }
            }
            s.payload.markDone(b)
            s.releaseSegmentIfDone(containing: b)
            counters.add("blocks.payload")
            events.append(.store(object: .payload, block: b, offset: range.lowerBound, bytes: exact))
            s.uncommitted += 1
            maybeCommit(&s, force: false)
            checkCompleteInline(&s, at: now)
        } else {
            counters.add("blocks.auth")
            s.markAuthBlock(b, bytes: exact)
            s.advanceSegments(counters: &counters)
            emitVerifiedAuthBlocks(&s)
        }
    }

    /// Specs/protocol.md P-5c: while the segments held exceed the budget, the least
    /// recently used one whose bytes are all staged leaves memory (its hash stays).
    private mutating func evictSegmentsIfNeeded(_ s: inout Session) {
        guard authReader != nil, let layout = s.layout else { return }
        while s.segmentBytesHeld > config.segmentBytesInMemoryMax {
            let staged = s.segments.keys.filter { j in
                let range = layout.segmentOffset(j)..<(layout.segmentOffset(j) + UInt64(layout.segmentSize(j)))
                return s.authBlocks(covering: range).allSatisfy { s.authBlocksStored.contains($0) }
            }
            // Least recently used first; among segments no symbol has used yet (the chain
            // arrives before the payload), the last ones, which the payload needs last.
            guard let j = staged.min(by: { (s.segmentUse[$0, default: 0], -$0) < (s.segmentUse[$1, default: 0], -$1) }) else { return }
            s.segmentBytesHeld -= s.segments[j]!.bytes.count
            s.segments[j] = nil
            s.evictedSegments.insert(j)
            counters.add("segments.evicted")
        }
    }

    /// Reads segment j of block b back from staging if it left memory (P-5c), checking
    /// it against the hash it had when it verified. False if it cannot be: the session
    /// has then failed with reason `storage`.
    private mutating func reloadSegmentIfEvicted(_ s: inout Session, block b: Int, at now: Instant) -> Bool {
        guard let layout = s.layout else { return true }
        let j = b / layout.blocksPerSegment
        // Symbols come in runs of one segment: stamping the first of a run keeps the order
        // of last use without a dictionary write per symbol on this hot path.
        if s.lastUsedSegment != j {
            s.useClock += 1
            s.segmentUse[j] = s.useClock
            s.lastUsedSegment = j
        }
        guard s.evictedSegments.contains(j) else { return true }
        let offset = layout.segmentOffset(j), count = layout.segmentSize(j)
        guard let bytes = authReader?.readAuthChain(offset: offset, count: count), bytes.count == count,
              SHA256.hash(bytes) == s.segmentHashes[j], let segment = try? AuthSegment(parsing: bytes, index: j, layout: layout) else {
            counters.add("segments.reloadFailed")
            session = s
            fail(.storage, "authentication segment \(j) read back from staging does not match its hash", at: now)
            s = session!
            return false
        }
        s.evictedSegments.remove(j)
        s.segments[j] = segment
        s.segmentBytesHeld += count
        counters.add("segments.reloaded")
        return true
    }

    /// Specs/bundle.md B-14: whether every source symbol the decoder rebuilt (those not
    /// `present`) matches its tag in `segment`. With the tags checked on arrival, every
    /// source byte of the block is then authenticated. Hashing the rebuilt symbols alone
    /// costs the lost share of the block (10% at 10% loss) where the block hash cost all
    /// of it: at 10% loss a third of the receiver's SHA-256 work.
    public static func rebuiltSymbolsMatch(_ padded: UnsafeRawBufferPointer, present: [Bool], block b: Int, symbolSize: Int,
                                           segment: AuthSegment) -> Bool {
        precondition(padded.count >= present.count * symbolSize, "a padded block holds k symbols")
        for i in present.indices where !present[i] {
            let symbol = UnsafeRawBufferPointer(rebasing: padded[(i * symbolSize)..<((i + 1) * symbolSize)])
            guard BlockAuthentication.tag(block: b, symbol: i, bytes: symbol)[...] == segment.tag(block: b, symbol: i) else { return false }
        }
        return true
    }

    /// Auth-chain blocks go to storage only once every segment they touch is
    /// authenticated: nothing unverified is ever staged.
    private mutating func emitVerifiedAuthBlocks(_ s: inout Session) {
        for (b, bytes) in s.verifiedAuthBlocks {
            events.append(.store(object: .authChain, block: b, offset: UInt64(b) * UInt64(s.profile.blockByteCount), bytes: bytes))
            s.uncommitted += 1
        }
        s.verifiedAuthBlocks.removeAll()
    }

    private mutating func maybeCommit(_ s: inout Session, force: Bool) {
        guard s.uncommitted > 0, force || s.uncommitted >= s.commitBlockCount else { return }
        let auth = s.authBlocksEmitted.sorted()
        let payload = (0..<s.payload.layout.blockCount).filter { s.payload.done[$0] }
        events.append(.commit(ProgressJournal(envelope: s.envelope, authBlocks: auth, payloadBlocks: payload)))
        s.uncommitted = 0
    }

    private mutating func checkComplete(at now: Instant) {
        guard var s = session else { return }
        checkCompleteInline(&s, at: now)
        session = s
    }

    private mutating func checkCompleteInline(_ s: inout Session, at now: Instant) {
        guard phase == .receiving, s.payload.doneCount == s.payload.layout.blockCount else { return }
        maybeCommit(&s, force: true)
        phase = .complete
        events.append(.completed)
        s.nackDue = nil
        s.pendingSymbols.removeAll()
        s.payload.dropAllPartials()
        s.auth.dropAllPartials()
        s.finalAcknowledged = s.carousel
        s.statusDue = s.carousel ? nil : now
        s.inactivityDeadline = nil
    }

    // MARK: Poll, close, ack

    private mutating func handlePoll(_ p: Poll, at now: Instant) {
        guard phase == .receiving, var s = session, !s.carousel else { return }
        session = nil
        s.grtt = Self.clampGRTT(p.grttMicroseconds)
        s.closeConfirmAt = nil
        s.groupSize = Int(min(p.groupSize, Self.groupSizeMax))
        // POLL is not authenticated: a corrupted or forged round number must not freeze
        // feedback, so any change of round starts a round (Specs/protocol.md P-17).
        if p.round != s.round {
            s.round = p.round
            s.nackedThisRound.removeAll()
            s.promised.removeAll()
            s.nackDatagramsThisRound = 0
            s.afterPoll = true
        }
        s.pollEcho = (p.sentAtMicroseconds, now)
        scheduleNack(&s, at: now)
        session = s
    }

    private mutating func handleClose(_ c: Close, at now: Instant) {
        // Specs/protocol.md P-21: a closed sender will not ACK, so the final STATUS stops
        // repeating, but only once the session stays quiet after the CLOSE (P-13a): a
        // forged CLOSE must not silence a receiver whose STATUS the sender has not heard.
        if phase == .complete || phase == .failed {
            if var s = session, !s.finalAcknowledged, s.closeConfirmAt == nil {
                s.closeConfirmAt = now + max(config.closeConfirmQuiet, s.grtt * 8)
                session = s
            }
            return
        }
        guard phase == .receiving, var s = session else { return }
        // Specs/protocol.md P-13a: a CLOSE may be forged; it takes effect only if the
        // session then stays quiet (genuine data or a POLL cancels it).
        counters.add("close.heard")
        if s.closeConfirmAt == nil { s.closeConfirmAt = now + max(config.closeConfirmQuiet, s.grtt * 8) }
        session = s
    }

    private mutating func handleAck(_ a: Ack) {
        guard a.receiver == config.receiverID, var s = session else { return }
        if (phase == .complete && a.state == .complete) || (phase == .failed && a.state == .failed) {
            s.finalAcknowledged = true
            s.statusDue = nil
        }
        session = s
    }

    /// The driver gives up on the session for a reason only it can see (storage
    /// failed, no key to decrypt): the sender hears it in the final STATUS.
    public mutating func abort(_ reason: Status.Reason, _ text: String, at now: Instant) {
        fail(reason, text, at: now)
    }

    private mutating func fail(_ reason: Status.Reason, _ text: String, at now: Instant) {
        guard phase != .failed && phase != .complete else { return }
        phase = .failed
        failureInfo = (reason, text)
        events.append(.failed(reason, text))
        if var s = session {
            session = nil
            s.nackDue = nil
            s.inactivityDeadline = nil
            s.finalAcknowledged = s.carousel
            s.statusDue = s.carousel ? nil : now
            s.failureReason = reason
            s.pendingSymbols.removeAll()
            session = s
        }
    }

    // MARK: Feedback

    private mutating func scheduleNack(_ s: inout Session, at now: Instant) {
        guard !s.carousel, phase == .receiving, s.nackDue == nil, s.manifest != nil,
              s.nackDatagramsThisRound < config.nackDatagramsPerRoundMax, s.hasNackableBlocks else { return }
        let maxDelay = s.grtt * (config.backoffGRTTs * backoffShare(groupSize: s.groupSize))
        var due = now + truncatedExponential(max: maxDelay, groupSize: s.groupSize, unit: rng.unit())
        // Specs/protocol.md P-19: no two NACK firings closer than `nackIntervalMin` (one GRTT).
        if let last = s.lastNackAt, due < last + s.grtt { due = last + s.grtt }
        s.nackDue = due
    }

    /// Specs/protocol.md P-17..P-19: recompute needs at fire time; what repair filled is not asked for.
    private mutating func sendNacks(_ s: inout Session, at now: Instant) {
        guard phase == .receiving else { return }
        var entries: [Nack.Entry] = []
        var datagrams: [Nack] = []
        func flush() {
            guard !entries.isEmpty else { return }
            let hold = s.pollEcho.map { now - $0.1 }?.microseconds ?? 0
            datagrams.append(Nack(session: s.id, receiver: config.receiverID, round: s.round,
                                  echoedSentAtMicroseconds: s.pollEcho?.0 ?? 0, holdMicroseconds: UInt32(min(hold, UInt64(UInt32.max))),
                                  entries: entries))
            entries = []
        }
        let budget = config.nackDatagramsPerRoundMax - s.nackDatagramsThisRound
        outer: for object in [ObjectID.authChain, .payload] {
            let state: ObjectState = object == .payload ? s.payload : s.auth
            for b in 0..<state.layout.blockCount where !state.done[b] && s.isPassed(object: object, block: b) {
                let key = BlockKey(object: object, block: b)
                guard !s.nackedThisRound.contains(key) else { continue }
                // Specs/protocol.md P-16b: payload the receiver could not check yet is not asked for.
                if s.awaitsSegment(object, b) {
                    counters.add("nack.deferredUntilSegment")
                    continue
                }
                // Held symbols, and those waiting for their segment, will count once it verifies.
                let waiting = object == .payload ? s.pendingCount(block: b, excluding: state.partial[b]) : 0
                let needed = state.layout.sourceSymbols(b) - (state.partial[b]?.count ?? 0) - waiting
                guard needed > 0 else { continue }
                if s.promisedRepair(key, at: now) >= needed {
                    counters.add("nack.coveredByPromise")
                    continue
                }
                entries.append(Nack.Entry(object: object, block: UInt32(b), needed: UInt8(min(needed, 255))))
                s.nackedThisRound.insert(key)
                if entries.count == Nack.entryCountMax {
                    flush()
                    if datagrams.count == budget { break outer }
                }
            }
        }
        flush()
        if datagrams.isEmpty { counters.add("nack.cancelled") } else { s.lastNackAt = now }
        for n in datagrams {
            send(.nack(n))
            s.nacksSent += 1
            s.nackDatagramsThisRound += 1
            counters.add("nack.entries", UInt64(n.entries.count))
        }
    }

    private mutating func sendStatus(_ s: inout Session, at now: Instant) {
        let state: Status.State = switch phase {
        case .complete: .complete
        case .failed: .failed
        case .listening, .receiving: .receiving
        }
        send(.status(Status(session: s.id, receiver: config.receiverID, state: state, reason: state == .failed ? (s.failureReason ?? .storage) : .none,
                            blocksDone: UInt32(s.payload.doneCount), blocksTotal: UInt32(s.payload.layout.blockCount),
                            bytesReceived: s.bytesReceived, nacksSent: UInt32(s.nacksSent))))
        if state == .receiving {
            s.statusDue = now + config.statusInterval
        } else {
            s.finalStatusCount += 1
            s.statusDue = s.finalStatusCount < config.statusRepeatMax ? now + config.statusInterval : nil
            if s.statusDue == nil { s.finalAcknowledged = true }  // bounded: give up waiting for the ACK
        }
    }

    private mutating func send(_ d: Datagram) {
        outgoing.append(Transmit(destination: .sender, bytes: d.encoded()))
        counters.add("sent.\(d.kind)")
    }
}

/// The repair the sender announced for a block (DATA's pending repair) and when.
struct RepairPromise {
    var count: Int
    var heardAt: Instant
}

enum AcceptOutcome {
    case blockDone, tooManyBlocks, duplicate, held
    case decodable(PartialBlock)
}

extension Receiver {
    /// Adds a symbol to its block's partial state, in place.
    static func add(_ state: inout ObjectState, block b: Int, index i: Int, symbol: ArraySlice<UInt8>, limit: Int, hotMax: Int,
                    symbolSize: Int, spill: SymbolSpill) -> AcceptOutcome {
        guard !state.done[b] else { return .blockDone }
        if state.partial[b] == nil {
            guard state.partial.count < limit else { return .tooManyBlocks }
            state.partial[b] = PartialBlock(k: state.layout.sourceSymbols(b), symbolCount: state.layout.symbolCount(b), symbolSize: symbolSize)
            state.hotOrder.append(b)
            state.hotCount += 1
            state.evictIfNeeded(hotMax: hotMax, spill: spill)
        }
        guard state.partial[b]!.add(index: i, symbol: symbol, spill: spill, object: state.layout.object, block: b) else { return .duplicate }
        guard state.partial[b]!.isDecodable else { return .held }
        var p = state.partial.removeValue(forKey: b)!
        if p.isCold { p.reload(from: spill, object: state.layout.object, block: b) } else { state.hotCount -= 1 }
        return .decodable(p)
    }
}

struct BlockKey: Hashable {
    var object: ObjectID
    var block: Int
}

/// Collects ANNOUNCE fragments into an envelope (Specs/protocol.md P-3).
struct EnvelopeCollector {
    private var length: UInt32 = 0
    private var count: UInt16 = 0
    private var fragments: [UInt16: [UInt8]] = [:]

    mutating func add(_ a: Announce) -> [UInt8]? {
        guard Int(a.envelopeLength) <= BundleLimits.envelopeByteCountMax else { return nil }
        if a.envelopeLength != length || a.fragmentCount != count {
            length = a.envelopeLength
            count = a.fragmentCount
            fragments = [:]
        }
        fragments[a.fragmentIndex] = a.fragment
        guard fragments.count == Int(count) else { return nil }
        let envelope = (0..<count).flatMap { fragments[$0]! }
        fragments = [:]
        return envelope.count == Int(length) ? envelope : nil
    }
}

/// The symbols held for one incomplete block (Specs/protocol.md P-14).
/// An incomplete block: which symbols arrived, and their bytes while the
/// block is *hot* (held in memory). A *cold* block keeps only its bitmaps;
/// its symbols live in the receiver's `SymbolSpill` until it decodes
/// (Specs/protocol.md P-5a).
struct PartialBlock {
    let k: Int
    let symbolSize: Int
    var source: [UInt8]
    var seen: [Bool]
    var presentSources: [Bool]
    var repairs: [(index: Int, bytes: [UInt8])] = []
    private(set) var count = 0
    private(set) var isCold = false

    init(k: Int, symbolCount: Int, symbolSize: Int) {
        self.k = k
        self.symbolSize = symbolSize
        source = [UInt8](repeating: 0, count: k * symbolSize)
        seen = [Bool](repeating: false, count: symbolCount)
        presentSources = [Bool](repeating: false, count: k)
    }

    var isDecodable: Bool { count >= k }

    /// Adds a symbol; false if it was already held. A cold block's symbols go straight to the spill.
    mutating func add(index: Int, symbol: ArraySlice<UInt8>, spill: SymbolSpill, object: ObjectID, block: Int) -> Bool {
        guard !seen[index] else { return false }
        seen[index] = true
        count += 1
        if index < k { presentSources[index] = true }
        if isCold {
            symbol.withUnsafeBytes { spill.write(object: object, block: block, index: index, symbolSize: symbolSize, bytes: $0) }
            if index >= k { repairs.append((index, [])) }
        } else if index < k {
            source.withUnsafeMutableBytes { s in symbol.withUnsafeBytes { s.baseAddress!.advanced(by: index * symbolSize).copyMemory(from: $0.baseAddress!, byteCount: symbolSize) } }
        } else {
            repairs.append((index, Array(symbol)))
        }
        return true
    }

    /// Moves the held bytes to the spill and frees them (the block turns cold).
    mutating func evict(to spill: SymbolSpill, object: ObjectID, block: Int) {
        guard !isCold else { return }
        // One write for the k source slots (missing ones are zeros, overwritten if they arrive).
        source.withUnsafeBytes { spill.write(object: object, block: block, index: 0, symbolSize: symbolSize, bytes: $0) }
        for r in repairs { r.bytes.withUnsafeBytes { spill.write(object: object, block: block, index: r.index, symbolSize: symbolSize, bytes: $0) } }
        source = []
        repairs = repairs.map { ($0.index, []) }
        isCold = true
    }

    /// Brings a cold block's symbols back from the spill before decoding.
    mutating func reload(from spill: SymbolSpill, object: ObjectID, block: Int) {
        guard isCold else { return }
        var buffer = [UInt8](repeating: 0, count: k * symbolSize)
        // One read for the k source slots; the decoder ignores the missing ones.
        buffer.withUnsafeMutableBytes { spill.read(object: object, block: block, index: 0, symbolSize: symbolSize, into: $0) }
        source = buffer
        let lost = presentSources.filter { !$0 }.count
        repairs = repairs.prefix(lost).map { r in
            var bytes = [UInt8](repeating: 0, count: symbolSize)
            bytes.withUnsafeMutableBytes { spill.read(object: object, block: block, index: r.index, symbolSize: symbolSize, into: $0) }
            return (r.index, bytes)
        }
        isCold = false
    }

    /// The k padded source symbols, rebuilding the lost ones.
    func decode(codec: ReedSolomonCodec) -> [UInt8] {
        precondition(!isCold, "reload a cold block before decoding it")
        guard presentSources.contains(false) else { return source }
        var block = source
        let lost = presentSources.filter { !$0 }.count
        let used = Array(repairs.prefix(lost))
        var packed = [UInt8]()
        packed.reserveCapacity(used.count * symbolSize)
        for r in used { packed += r.bytes }
        packed.withUnsafeBytes { p in
            let list = used.enumerated().map { (index: $0.element.index, bytes: UnsafeRawBufferPointer(rebasing: p[($0.offset * symbolSize)..<(($0.offset + 1) * symbolSize)])) }
            block.withUnsafeMutableBytes { b in
                try! codec.reconstruct(block: b, symbolSize: symbolSize, presentSources: presentSources, repairs: list)
            }
        }
        return block
    }
}

struct ObjectState {
    let layout: ObjectLayout
    var done: [Bool]
    private(set) var doneCount = 0
    var partial: [Int: PartialBlock] = [:]
    /// Hot blocks in the order they were opened; the oldest is evicted first.
    /// Entries of blocks that decoded or went cold are skipped when reached.
    var hotOrder: [Int] = []
    var hotHead = 0
    var hotCount = 0
    /// Blocks that went cold (P-5a), for the receiver's report.
    private(set) var evictions: UInt64 = 0

    init(layout: ObjectLayout) {
        self.layout = layout
        done = [Bool](repeating: false, count: layout.blockCount)
    }

    mutating func markDone(_ b: Int) {
        guard !done[b] else { return }
        done[b] = true
        doneCount += 1
        dropPartial(b)
    }

    mutating func clear(_ b: Int) {
        if done[b] { done[b] = false; doneCount -= 1 }
        dropPartial(b)
    }

    mutating func dropPartial(_ b: Int) {
        if let p = partial.removeValue(forKey: b), !p.isCold { hotCount -= 1 }
    }

    mutating func dropAllPartials() {
        partial.removeAll()
        hotOrder.removeAll()
        hotHead = 0
        hotCount = 0
    }

    /// Specs/protocol.md P-5a: at most `hotMax` blocks hold their bytes in memory.
    mutating func evictIfNeeded(hotMax: Int, spill: SymbolSpill) {
        while hotCount > hotMax && hotHead < hotOrder.count {
            let b = hotOrder[hotHead]
            hotHead += 1
            guard var p = partial[b], !p.isCold else { continue }
            partial[b] = nil  // mutate outside the dictionary: no copy of the buffers
            p.evict(to: spill, object: layout.object, block: b)
            partial[b] = p
            hotCount -= 1
            evictions += 1
        }
        if hotHead > 4096 && hotHead * 2 > hotOrder.count {
            hotOrder.removeFirst(hotHead)
            hotHead = 0
        }
    }
}

/// Everything a receiver knows about the session it joined.
struct Session {
    var id: SessionID
    let envelope: [UInt8]
    var carousel: Bool
    var grtt: Interval
    var groupSize: Int
    let interleaveWindow: Int
    var manifest: VerifiedManifest!
    var layout: AuthChainLayout?
    var profile: TransportProfile!
    /// Incomplete blocks that keep their bytes in memory (P-5a), from the config's budget.
    var blocksInMemoryMax = ReceiverConfig.blocksInMemoryMin
    /// Verified blocks between journal commits, from the config's byte interval.
    var commitBlockCount = 1
    /// Payload blocks per first-pass NACK epoch (P-19a), as the sender computes them.
    var nackEpochBlocks = 1
    /// GRTTs without DATA of its block after which a repair promise lapses (P-18a).
    var repairPromiseLifetimeGRTTs = 0.0
    var payload: ObjectState!
    var auth: ObjectState!
    var codecs: [Int: ReedSolomonCodec] = [:]
    var authBytes: [Int: [UInt8]] = [:]
    var segments: [Int: AuthSegment] = [:]
    /// P-5c: bytes of `segments`, the segments that left memory, the hash each had when it
    /// verified (to check a reload), and when each was last used (least recently used leaves).
    var segmentBytesHeld = 0
    var evictedSegments = Set<Int>()
    var segmentHashes: [Int: [UInt8]] = [:]
    var segmentUse: [Int: UInt64] = [:]
    var useClock: UInt64 = 0
    var lastUsedSegment = -1
    var nextSegment = 0
    var expectedSegmentHash: [UInt8] = []
    var segmentsAdvanced = false
    /// Auth blocks whose every segment verified since the last look, with their bytes.
    var verifiedAuthBlocks: [(Int, [UInt8])] = []
    var authBlocksEmitted = Set<Int>()
    /// Auth blocks whose `.store` event the driver has taken, and so carried out (P-5c).
    var authBlocksStored = Set<Int>()
    var pendingSymbols: [DataSymbol] = []
    var uncommitted = 0
    // Feedback state.
    var round: UInt32 = 0
    var afterPoll = false
    var frontier = (object: UInt8(0), window: -1)
    /// The first pass's NACK epoch the receiver is in (P-19a).
    var nackEpoch = 0
    var frontierAdvanced = false
    var nackedThisRound: Set<BlockKey> = []
    var promised: [BlockKey: RepairPromise] = [:]
    var nackDatagramsThisRound = 0
    var nackDue: Instant?
    var lastNackAt: Instant?
    var pollEcho: (UInt64, Instant)?
    var nacksSent = 0
    var bytesReceived: UInt64 = 0
    var statusDue: Instant?
    var inactivityDeadline: Instant?
    /// A CLOSE was heard; it ends the session at this instant unless cancelled (P-13a).
    var closeConfirmAt: Instant?
    var lastHeard = Instant.zero
    var finalStatusCount = 0
    var finalAcknowledged = false
    var failureReason: Status.Reason?

    init(id: SessionID, envelope: [UInt8], announce a: Announce, now: Instant, config: ReceiverConfig, carousel: Bool) {
        self.id = id
        self.envelope = envelope
        self.carousel = carousel
        grtt = Receiver.clampGRTT(a.grttMicroseconds)
        groupSize = Int(max(min(a.groupSize, Receiver.groupSizeMax), 1))
        interleaveWindow = Int(a.interleaveWindow)
        inactivityDeadline = now + config.inactivityTimeout
        statusDue = carousel ? nil : now + config.statusInterval
    }

    mutating func attach(_ verified: VerifiedManifest, config: ReceiverConfig) {
        manifest = verified
        let m = verified.manifest
        profile = m.transport
        blocksInMemoryMax = config.blocksInMemoryMax
            ?? max(ReceiverConfig.blocksInMemoryMin, config.blockBytesInMemoryMax / m.transport.blockByteCount)
        commitBlockCount = config.commitBlockCount ?? max(1, config.commitByteCount / m.transport.blockByteCount)
        nackEpochBlocks = config.nackEpochBlocks ?? SenderConfig.nackEpochBlocks(for: m.transport)
        repairPromiseLifetimeGRTTs = config.repairPromiseLifetimeGRTTs
        payload = ObjectState(layout: ObjectLayout(object: .payload, size: m.payload.size, profile: m.transport))
        auth = ObjectState(layout: ObjectLayout(object: .authChain, size: m.authentication.size, profile: m.transport))
        layout = AuthChainLayout(geometry: payload.layout.geometry, blocksPerSegment: m.authentication.blocksPerSegment)
        expectedSegmentHash = m.authentication.head
    }

    mutating func codec(k: Int) -> ReedSolomonCodec {
        if let c = codecs[k] { return c }
        let c = try! ReedSolomonCodec(sourceCount: k)
        codecs[k] = c
        return c
    }

    mutating func markAuthBlock(_ b: Int, bytes: [UInt8]) {
        auth.markDone(b)
        authBytes[b] = bytes
    }

    /// Auth-chain blocks covering byte range `r` of the chain.
    func authBlocks(covering r: Range<UInt64>) -> ClosedRange<Int> {
        let blockBytes = UInt64(profile.blockByteCount)
        return Int(r.lowerBound / blockBytes)...Int((r.upperBound - 1) / blockBytes)
    }

    /// Whether a payload symbol's tag matches its authenticated record (Specs/protocol.md P-5);
    /// nil while the segment holding that record is not authenticated yet.
    ///
    /// A released segment's blocks are all done: their symbols pass here and are
    /// dropped as duplicates of a done block (handleData drops them before asking).
    func tagMatches(_ d: DataSymbol) -> Bool? {
        let b = Int(d.block), i = Int(d.symbolIndex)
        let j = b / layout!.blocksPerSegment
        // A segment that left memory (P-5c) must be read back first: unknown until then.
        guard let segment = segments[j] else { return j < nextSegment && !evictedSegments.contains(j) ? true : nil }
        let tag = d.symbol.withUnsafeBytes { BlockAuthentication.tag(block: b, symbol: i, bytes: $0) }
        return tag[...] == segment.tag(block: b, symbol: i)
    }

    /// A payload block whose segment is not authenticated yet: its symbols cannot be checked (P-16b).
    func awaitsSegment(_ object: ObjectID, _ b: Int) -> Bool {
        object == .payload && b / layout!.blocksPerSegment >= nextSegment
    }

    /// Frees the tags of segment j once every payload block it covers is done: they are
    /// only needed to check symbols of incomplete blocks, and kept they would grow with
    /// the payload (1.5% of it: 15.8 MB for 1 GiB; Specs/protocol.md P-5b).
    mutating func releaseSegmentIfDone(containing b: Int) {
        guard let layout else { return }
        let j = b / layout.blocksPerSegment
        guard j < nextSegment, segments[j] != nil || evictedSegments.contains(j),
              layout.blocks(inSegment: j).allSatisfy({ payload.done[$0] }) else { return }
        if let released = segments.removeValue(forKey: j) { segmentBytesHeld -= released.bytes.count }
        evictedSegments.remove(j)
        segmentHashes[j] = nil
        segmentUse[j] = nil
    }

    /// Specs/protocol.md P-16, Specs/bundle.md B-13: authenticate segments in order.
    mutating func advanceSegments(counters: inout Counters) {
        guard let layout else { return }
        while nextSegment < layout.segmentCount {
            let j = nextSegment
            let range = layout.segmentOffset(j)..<(layout.segmentOffset(j) + UInt64(layout.segmentSize(j)))
            let blocks = authBlocks(covering: range)
            guard blocks.allSatisfy({ auth.done[$0] && authBytes[$0] != nil }) else { return }
            var bytes: [UInt8] = []
            bytes.reserveCapacity(range.count)
            let blockBytes = UInt64(profile.blockByteCount)
            for b in blocks {
                let start = UInt64(b) * blockBytes
                let data = authBytes[b]!
                let lo = Int(max(range.lowerBound, start) - start), hi = Int(min(range.upperBound, start + UInt64(data.count)) - start)
                bytes += data[lo..<hi]
            }
            guard bytes.count == range.count, SHA256.hash(bytes) == expectedSegmentHash,
                  let segment = try? AuthSegment(parsing: bytes, index: j, layout: layout) else {
                counters.add("segmentFailures")
                for b in blocks { auth.clear(b); authBytes[b] = nil }
                return
            }
            segments[j] = segment
            segmentBytesHeld += bytes.count
            segmentHashes[j] = expectedSegmentHash
            expectedSegmentHash = segment.nextHash
            nextSegment += 1
            if payload.layout.blockCount > 0 { releaseSegmentIfDone(containing: layout.blocks(inSegment: j).lowerBound) }
            segmentsAdvanced = true
            // Blocks now wholly verified go to storage; chain bytes no later segment needs are freed.
            let verifiedEnd = layout.segmentOffset(nextSegment)
            for b in blocks where !authBlocksEmitted.contains(b) && min(UInt64(b + 1) * blockBytes, layout.totalSize) <= verifiedEnd {
                if let data = authBytes[b] { verifiedAuthBlocks.append((b, data)); authBlocksEmitted.insert(b) }
            }
            let keepFrom = nextSegment < layout.segmentCount ? layout.segmentOffset(nextSegment) / blockBytes : UInt64.max
            for b in authBytes.keys where UInt64(b) < keepFrom { authBytes[b] = nil }
            counters.add("segments.verified")
        }
    }

    mutating func observeFrontier(object: ObjectID, block: Int) {
        let position = (object.rawValue, block / interleaveWindow)
        if position.0 > frontier.object || (position.0 == frontier.object && position.1 > frontier.window) {
            frontier = (position.0, position.1)
            frontierAdvanced = true
        }
    }

    /// Specs/protocol.md P-18a: the repair symbols the sender still promises for this
    /// block, 0 if none. A promise lapses when the repair it announced stops arriving
    /// for `repairPromiseLifetimeGRTTs` (its last symbols were lost, so no DATA with a
    /// pending count of 0 ever came).
    func promisedRepair(_ key: BlockKey, at now: Instant) -> Int {
        guard let p = promised[key], now < p.heardAt + grtt * repairPromiseLifetimeGRTTs else { return 0 }
        return p.count
    }

    /// Has the sender moved past this block in the current pass?
    func isPassed(object: ObjectID, block: Int) -> Bool {
        if afterPoll { return true }
        return (object.rawValue, block / interleaveWindow) < (frontier.object, frontier.window)
    }

    /// Distinct symbol indices of block b waiting for their segment, not already held.
    func pendingCount(block b: Int, excluding partial: PartialBlock?) -> Int {
        var seen = Set<UInt8>()
        for p in pendingSymbols where Int(p.block) == b && !(partial?.seen[Int(p.symbolIndex)] ?? false) { seen.insert(p.symbolIndex) }
        return seen.count
    }

    var hasNackableBlocks: Bool {
        for object in [ObjectID.authChain, .payload] {
            let state = object == .payload ? payload! : auth!
            for b in 0..<state.layout.blockCount where !state.done[b] && isPassed(object: object, block: b)
                && !nackedThisRound.contains(BlockKey(object: object, block: b)) && !awaitsSegment(object, b) {
                return true
            }
        }
        return false
    }
}

/// Reads back auth-chain bytes that the receiver handed to storage in `.store`
/// events, so that verified segments can leave memory (Specs/protocol.md P-5c).
/// Nil for bytes it cannot read.
public protocol AuthChainReader: AnyObject {
    func readAuthChain(offset: UInt64, count: Int) -> [UInt8]?
}

/// Where a receiver keeps the authenticated symbols of incomplete blocks it
/// no longer holds in memory (Specs/protocol.md P-5a): the real driver uses
/// a sparse scratch file, the simulator memory. Symbols of one block occupy
/// consecutive slots by index, so a run of symbols moves in one call.
/// Contents need not survive a restart: the journal lists only whole
/// verified blocks.
public protocol SymbolSpill: AnyObject {
    /// Stores `bytes` (a whole number of symbols) in the slots from `index` on.
    func write(object: ObjectID, block: Int, index: Int, symbolSize: Int, bytes: UnsafeRawBufferPointer)
    /// Reads the slots from `index` on; slots never written read as zeros.
    func read(object: ObjectID, block: Int, index: Int, symbolSize: Int, into buffer: UnsafeMutableRawBufferPointer)
}

/// A spill in memory: for the simulator and tests, where the eviction logic
/// runs unchanged but bytes are only moved, not bounded.
public final class MemorySpill: SymbolSpill {
    private var symbols: [SymbolKey: [UInt8]] = [:]
    struct SymbolKey: Hashable { var object: ObjectID; var block: Int; var index: Int }
    public init() {}
    public func write(object: ObjectID, block: Int, index: Int, symbolSize: Int, bytes: UnsafeRawBufferPointer) {
        precondition(bytes.count % symbolSize == 0)
        for n in 0..<(bytes.count / symbolSize) {
            symbols[SymbolKey(object: object, block: block, index: index + n)] = Array(bytes[(n * symbolSize)..<((n + 1) * symbolSize)])
        }
    }
    public func read(object: ObjectID, block: Int, index: Int, symbolSize: Int, into buffer: UnsafeMutableRawBufferPointer) {
        precondition(buffer.count % symbolSize == 0)
        for n in 0..<(buffer.count / symbolSize) {
            let slot = UnsafeMutableRawBufferPointer(rebasing: buffer[(n * symbolSize)..<((n + 1) * symbolSize)])
            if let bytes = symbols.removeValue(forKey: SymbolKey(object: object, block: block, index: index + n)) {
                bytes.withUnsafeBytes { slot.copyMemory(from: $0) }
            } else {
                slot.initializeMemory(as: UInt8.self, repeating: 0)
            }
        }
    }
}
