import FleetCrypto
import BundleFormat
import ErasureCoding
import WireFormat

/// One joined session (Specs/protocol.md §5): the objects being assembled, the
/// authentication chain, feedback and timers. It exists only while receiving;
/// what the final report needs is copied into `Finishing` when it ends.
struct Session {
    enum Timer: Int, CaseIterable { case nack, status, inactivity, closeConfirm }

    var id: SessionID
    let envelope: [UInt8]
    let carousel: Bool
    /// Feedback goes here (P-23): the signed record's feedback address, or the
    /// announce's feedback address or source.
    var sender: PeerAddress
    /// A signed SESSION record vouches for the session (P-31): only verified POLL and
    /// CLOSE count, and only authenticated progress keeps it alive.
    let authenticated: Bool
    var grtt: Interval
    var groupSize: Int
    let interleaveWindow: Int
    let manifest: VerifiedManifest
    let profile: TransportProfile
    /// Incomplete blocks that keep their bytes in memory (P-5a), from the config's budget.
    let blocksInMemoryMax: Int
    /// Verified blocks between journal commits, from the config's byte interval.
    let commitBlockCount: Int
    /// GRTTs without DATA of its block after which a repair promise lapses (P-18a).
    let repairPromiseLifetimeGRTTs: Double
    var payload: ObjectState
    /// The auth-chain object and the segments it verifies (P-16, P-5b, P-5c).
    var chain: SegmentStore
    private var codecs: [Int: ReedSolomonCodec] = [:]
    /// Payload symbols waiting for their segment (P-5), bounded.
    var pendingSymbols: [DataSymbol] = []
    var uncommitted = 0
    var feedback: FeedbackState
    var bytesReceived: UInt64 = 0
    /// Specs/protocol.md P-29c: payload blocks from here on are neither taken nor
    /// asked for (nil: no window). The driver moves it as step 2 consumes.
    var payloadWindowEnd: Int?
    var timers = TimerTable<Timer>()
    var lastHeard = Instant.zero
    /// Set when the session must fail; `Receiver.settle` ends it at once.
    var abort: (reason: Status.Reason, text: String)?

    init(offer: Offer, verified: VerifiedManifest, now: Instant, config: ReceiverConfig) {
        let a = offer.announce, m = verified.manifest
        id = offer.session
        authenticated = offer.senderDelegation != nil
        envelope = offer.envelope
        carousel = offer.carousel
        sender = offer.sender
        grtt = Receiver.clampGRTT(a.grttMicroseconds)
        groupSize = Int(max(min(a.groupSize, Receiver.groupSizeMax), 1))
        interleaveWindow = Int(a.interleaveWindow)
        manifest = verified
        profile = m.transport
        blocksInMemoryMax = config.blocksInMemoryMax
            ?? max(ReceiverConfig.blocksInMemoryMin, config.blockBytesInMemoryMax / m.transport.blockByteCount)
        commitBlockCount = config.commitBlockCount ?? max(1, config.commitByteCount / m.transport.blockByteCount)
        repairPromiseLifetimeGRTTs = config.repairPromiseLifetimeGRTTs
        payload = ObjectState(layout: ObjectLayout(object: .payload, size: m.payload.size, profile: m.transport))
        chain = SegmentStore(manifest: m)
        feedback = FeedbackState(nackEpochBlocks: config.nackEpochBlocks ?? SenderConfig.nackEpochBlocks(for: m.transport))
        timers[.inactivity] = now + config.inactivityTimeout
        timers[.status] = carousel ? nil : now + config.statusInterval
    }

    var isTransferComplete: Bool { abort == nil && payload.doneCount == payload.layout.blockCount }

    mutating func codec(k: Int) -> ReedSolomonCodec {
        if let c = codecs[k] { return c }
        let c = try! ReedSolomonCodec(sourceCount: k)
        codecs[k] = c
        return c
    }

    /// Specs/protocol.md P-20: journalled blocks are durable; they are not asked for again.
    /// P-29c: a session with a staging window resumes its auth chain only (step 2 starts
    /// over from block 0, and staged blocks ahead of it would hold room the window needs).
    mutating func resume(from r: ResumeState, stats: inout ReceiverStats) {
        for (b, bytes) in r.authBlockBytes.sorted(by: { $0.key < $1.key }) where r.progress.authBlocks.contains(b) {
            chain.markAuthBlock(b, bytes: bytes)
        }
        chain.advanceSegments(payloadDone: payload.done, stats: &stats)
        chain.forgetVerifiedBlocks()  // already in storage
        for b in r.progress.payloadBlocks where payloadWindowEnd == nil && b < payload.layout.blockCount && !payload.done[b] {
            payload.markDone(b)
            chain.releaseSegmentIfDone(containing: b, payloadDone: payload.done)
        }
    }

    /// Emits `commit` every `commitBlockCount` stored blocks, and when forced (at completion).
    mutating func commitIfDue(force: Bool, actions: inout [ReceiverAction]) {
        guard uncommitted > 0, force || uncommitted >= commitBlockCount else { return }
        // P-29c: with a window, no payload block is listed (a restart fetches them again),
        // so the driver may free a block's staging as soon as step 2 has consumed it.
        let payloadBlocks = payloadWindowEnd != nil ? [] : (0..<payload.layout.blockCount).filter { payload.done[$0] }
        actions.append(.commit(ProgressJournal(envelope: envelope, authBlocks: chain.emittedBlocks, payloadBlocks: payloadBlocks)))
        uncommitted = 0
    }
}

extension Receiver {
    // MARK: Datagrams of a joined session

    mutating func handleInSession(_ datagram: Datagram, from peer: PeerAddress, at now: Instant, arrivedAt: Instant) {
        withSession(at: now) { s, r in
            guard datagram.sessionID == s.id else {
                r.stats.drops.add(.otherSession)
                // A new session may carry the same bundle (the sender restarted).
                if case .announce(let a) = datagram { r.handleOtherAnnounce(a, &s, from: peer, at: now) }
                return
            }
            // Specs/protocol.md P-31: in an authenticated session a POLL or CLOSE counts only
            // with its chain value; it and DATA that passed its tag are the progress that
            // keeps the session alive. Elsewhere any datagram of the session does (P-13a, P-17a).
            if s.authenticated, !r.verifiesChain(datagram, s.id, at: now) { r.stats.drops.add(.unauthenticatedControl); return }
            let acceptedBefore = r.stats.acceptedPayloadSymbols + r.stats.acceptedAuthSymbols
            switch datagram {
            case .announce(let a):
                s.grtt = Self.clampGRTT(a.grttMicroseconds)
                s.groupSize = Int(min(a.groupSize, Self.groupSizeMax))
            case .data(let d): r.handleData(d, &s, at: now)
            case .poll(let p): r.handlePoll(p, &s, at: now, arrivedAt: arrivedAt)
            case .close:
                r.stats.closesHeard += 1
                if s.authenticated {
                    // Verified: only the sender can close it.
                    s.timers[.closeConfirm] = now
                } else if s.timers[.closeConfirm] == nil {
                    // Specs/protocol.md P-13a: a CLOSE may be forged; it takes effect only if the
                    // session then stays quiet (genuine data or a POLL cancels it).
                    s.timers[.closeConfirm] = now + max(r.config.closeConfirmQuiet, s.grtt * 8)
                }
            case .ack, .cookie, .session: return
            case .register, .nack, .status: r.stats.drops.add(.feedbackFromPeer)
            }
            let progressed = r.stats.acceptedPayloadSymbols + r.stats.acceptedAuthSymbols > acceptedBefore
            if !s.authenticated || datagram.kind == .poll || datagram.kind == .close || progressed {
                s.timers[.inactivity] = now + r.config.inactivityTimeout
                s.lastHeard = now
            }
        }
    }

    /// Specs/protocol.md P-2: an announce of another session. The receiver moves to it
    /// only if it announces the very same envelope (the sender restarted) and its own
    /// session has been silent for `sessionSwitchQuiet`: a replayed announce of an
    /// older session of the same bundle must not pull a live receiver away.
    private mutating func handleOtherAnnounce(_ a: Announce, _ s: inout Session, from peer: PeerAddress, at now: Instant) {
        guard let envelope = collect(a) else { return }
        if intake.wasRefusedEnough(envelope, repeatMax: config.statusRepeatMax) { stats.drops.add(.announceRefusedBefore); return }
        guard envelope == s.envelope, now >= s.lastHeard + config.sessionSwitchQuiet else { return }
        // P-31: an authenticated session moves only to a session a signed record vouches for.
        let known = records.record(for: a.session).flatMap { $0.record.envelopeRoot == a.root ? $0 : nil }
        if s.authenticated && known == nil { return }
        s.id = a.session
        s.sender = known.map { $0.record.feedbackDestination(source: peer) } ?? a.feedbackDestination(source: peer)
        s.timers[.inactivity] = now + config.inactivityTimeout
        stats.sessionSwitches += 1
    }

    /// P-31: a POLL or CLOSE of an authenticated session carries its round's chain value
    /// (checked, and in order); anything else passes here.
    mutating func verifiesChain(_ datagram: Datagram, _ session: SessionID, at now: Instant) -> Bool {
        switch datagram {
        case .poll(let p): records.verifyChain(session, round: p.round, value: p.chainValue, at: now)
        case .close(let c): records.verifyChain(session, round: c.round, value: c.chainValue, at: now)
        default: true
        }
    }

    /// Specs/protocol.md P-5, P-6, P-14: one DATA symbol into its block.
    mutating func handleData(_ d: DataSymbol, _ s: inout Session, at now: Instant) {
        // The session may have ended earlier in this call (symbols buffered before the join
        // are replayed in one): it takes nothing more.
        guard s.abort == nil, !s.isTransferComplete else { stats.drops.add(.notReceiving); return }
        s.bytesReceived += UInt64(d.symbol.count + DataSymbol.headerByteCount)
        guard d.symbol.count == s.profile.symbolSize else { stats.drops.add(.symbolSize); return }
        let layout = d.object == .payload ? s.payload.layout : s.chain.auth.layout
        let b = Int(d.block), i = Int(d.symbolIndex)
        guard b < layout.blockCount else { stats.drops.add(.blockRange); return }
        guard i < layout.symbolCount(b) else { stats.drops.add(.symbolRange); return }
        // Specs/protocol.md P-17c: what DATA tells the feedback (how far the sender went, the
        // repair it promises) counts only from a symbol known genuine: one that passed its
        // tag, or one of a block already done (genuine symbols of it came; such a symbol moves
        // the frontier only, since it may be forged). So forged DATA cannot open NACKs for
        // blocks the sender has not sent, nor promise repair, nor hold off the quiet of P-17c.

        // Specs/protocol.md P-5c: segments beyond the budget leave memory here, while the
        // chain arrives (it comes first, P-7) as well as during the payload; only those whose
        // bytes the driver has stored (it reported their `.store` actions done).
        if authReader != nil { s.chain.evictIfNeeded(budget: config.segmentBytesInMemoryMax, stats: &stats) }
        // A done block's symbols are dropped before their tag is computed (a payload block's
        // segment may be released, P-5b); they move the frontier only (P-17c).
        if d.object == .payload ? s.payload.done[b] : s.chain.auth.done[b] {
            observe(d, &s, tagChecked: false, at: now)
            stats.symbolsOfDoneBlocks += 1
            return
        }
        if d.object == .payload {
            // Specs/protocol.md P-29c: no room staged for it yet; it is asked for once inside
            // (the sender's progress still counts when its tag can be checked now).
            if let end = s.payloadWindowEnd, b >= end {
                // Hashed only when it would move the frontier: most such symbols do not.
                if (d.object.rawValue, b / s.interleaveWindow) > (s.feedback.frontier.object, s.feedback.frontier.window),
                   s.chain.tagMatches(d) == true { observe(d, &s, at: now) }
                stats.drops.add(.beyondWindow)
                return
            }
            // Specs/protocol.md P-5c: a segment that left memory comes back when a symbol of
            // its blocks needs it.
            guard reloadSegmentIfEvicted(&s, block: b) else { return }
        }
        // Specs/protocol.md P-5, Specs/bundle.md B-13a: every symbol, payload or auth chain, is
        // checked on arrival against its tag (for the chain: the tags the manifest or the segment
        // before holds); never decode an unauthenticated symbol; one whose tag is in a segment
        // not verified yet waits (a bounded few) until it is.
        guard let authentic = s.chain.tagMatches(d) else {
            observe(d, &s, tagChecked: false, at: now)
            if s.pendingSymbols.count < config.unauthenticatedSymbolCountMax { s.pendingSymbols.append(d) }
            else { stats.drops.add(.unauthenticatedBufferFull) }
            return
        }
        guard authentic else { stats.drops.add(.badTag); return }
        s.timers[.closeConfirm] = nil  // genuine data: the sender is still there
        observe(d, &s, at: now)
        acceptSymbol(&s, object: d.object, block: b, index: i, symbol: d.symbol)
        // A segment may have just verified: the held symbols of its blocks can now be checked.
        // Held auth-chain symbols may verify the next segment in turn (B-13a), whose own held
        // symbols then wait no longer: they count as had in NACKs (P-16a), so none may be left.
        while s.chain.segmentsAdvanced {
            s.chain.segmentsAdvanced = false
            checkHeldSymbols(&s, at: now)
        }
    }

    /// Symbols held for a segment that has since verified are checked and accepted.
    private mutating func checkHeldSymbols(_ s: inout Session, at now: Instant) {
        let held = s.pendingSymbols
        s.pendingSymbols.removeAll()
        for p in held {
            guard s.abort == nil else { return }
            guard let authentic = s.chain.tagMatches(p) else { s.pendingSymbols.append(p); continue }
            guard authentic else { stats.drops.add(.badTag); continue }
            observe(p, &s, at: now)
            acceptSymbol(&s, object: p.object, block: Int(p.block), index: Int(p.symbolIndex), symbol: p.symbol)
        }
    }

    /// Adds an authenticated symbol to its block; a block that can decode is
    /// decoded, checked and handed to storage.
    private mutating func acceptSymbol(_ s: inout Session, object: ObjectID, block b: Int, index i: Int, symbol: ArraySlice<UInt8>) {
        let limit = config.blocksInFlightMax
        // Mutate the object's state in place: a copy would copy every partial block's buffer.
        let outcome: AcceptOutcome
        do {
            outcome = object == .payload
                ? try s.payload.add(block: b, index: i, symbol: symbol, limit: limit, hotMax: s.blocksInMemoryMax, spill: spill, stats: &stats)
                : try s.chain.auth.add(block: b, index: i, symbol: symbol, limit: limit, hotMax: s.blocksInMemoryMax, spill: spill, stats: &stats)
        } catch {
            s.abort = (.storage, error.reason)
            return
        }
        let partial: PartialBlock
        switch outcome {
        case .blockDone: stats.symbolsOfDoneBlocks += 1; return
        case .tooManyBlocks: stats.drops.add(.blocksInFlight); return
        case .duplicate: stats.duplicateSymbols += 1; return
        case .held:
            if object == .payload { stats.acceptedPayloadSymbols += 1 } else { stats.acceptedAuthSymbols += 1 }
            return
        case .decodable(let p):
            if object == .payload { stats.acceptedPayloadSymbols += 1 } else { stats.acceptedAuthSymbols += 1 }
            partial = p
        }
        let padded = partial.decode(codec: s.codec(k: partial.k))
        let reconstructed = partial.presentSources.contains(false)
        if reconstructed { if object == .payload { stats.repairedPayloadBlocks += 1 } else { stats.repairedAuthBlocks += 1 } }
        let range = (object == .payload ? s.payload.layout : s.chain.auth.layout).geometry.byteRange(ofBlock: b)
        // Only a short last block is trimmed (copied); a full one is handed on as it is.
        let exact = padded.count == range.count ? padded : Array(padded.prefix(range.count))
        if object == .payload {
            completePayloadBlock(&s, block: b, padded: padded, exact: exact, partial: partial, offset: range.lowerBound)
        } else {
            stats.authBlocks += 1
            s.chain.markAuthBlock(b, bytes: exact)
            s.chain.advanceSegments(payloadDone: s.payload.done, stats: &stats)
            for (block, bytes) in s.chain.takeVerifiedBlocks() {
                actions.append(.store(object: .authChain, block: block, offset: UInt64(block) * UInt64(s.profile.blockByteCount), bytes: bytes))
                s.uncommitted += 1
            }
        }
    }

    /// Specs/bundle.md B-14: a block rebuilt from repair symbols is checked before
    /// staging, by the tags of the source symbols the decoder rebuilt: the others
    /// matched theirs on arrival. A block whose k source symbols all arrived is
    /// already authenticated byte for byte.
    private mutating func completePayloadBlock(_ s: inout Session, block b: Int, padded: [UInt8], exact: [UInt8], partial: PartialBlock, offset: UInt64) {
        if partial.presentSources.contains(false) {
            guard reloadSegmentIfEvicted(&s, block: b) else { return }
            let segment = s.chain.segment(containing: b)
            let authentic = padded.withUnsafeBytes {
                Self.rebuiltSymbolsMatch($0, present: partial.presentSources, block: b, symbolSize: s.profile.symbolSize, segment: segment)
            }
            guard authentic else {
                stats.rebuiltTagFailures += 1
                return
            }
        }
        s.payload.markDone(b)
        s.chain.releaseSegmentIfDone(containing: b, payloadDone: s.payload.done)
        stats.payloadBlocks += 1
        actions.append(.store(object: .payload, block: b, offset: offset, bytes: exact))
        s.uncommitted += 1
        s.commitIfDue(force: false, actions: &actions)
    }

    /// Reads segment j of block b back from staging if it left memory (P-5c), checking
    /// it against the hash it had when it verified. False if it cannot be: the session
    /// then fails with reason `storage`.
    private mutating func reloadSegmentIfEvicted(_ s: inout Session, block b: Int) -> Bool {
        guard s.chain.reloadIfEvicted(block: b, from: authReader, stats: &stats) else {
            s.abort = (.storage, "authentication segment \(b / s.chain.layout.blocksPerSegment) read back from staging does not match its hash")
            return false
        }
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

    // MARK: Time

    /// Specs/protocol.md P-17, P-21, P-13a: the NACK and STATUS timers, then the
    /// deadlines that end a session: a confirmed CLOSE or silence.
    mutating func sessionTimeout(_ s: inout Session, at now: Instant) {
        if s.timers.isDue(.nack, at: now) {
            s.timers[.nack] = nil
            sendNacks(&s, at: now)
        }
        if s.timers.isDue(.status, at: now) {
            sendStatus(.receiving, .none, session: s.id, report: s.report, to: s.sender, at: now)
            s.timers[.status] = now + config.statusInterval
        }
        if s.timers.isDue(.closeConfirm, at: now) {
            s.abort = (.sessionClosed, "the sender closed the session before every block arrived")
        } else if s.timers.isDue(.inactivity, at: now) {
            s.abort = (.timedOut, "no datagram from the sender for \(config.inactivityTimeout.seconds) s")
        }
    }
}
