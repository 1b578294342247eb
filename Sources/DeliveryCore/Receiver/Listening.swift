import BundleFormat
import FleetCrypto
import WireFormat

/// A receiver not in a session yet: DATA it hears early is kept (P-3b), and it
/// says hello to sessions whose announce it missed (P-3a).
struct Listening {
    /// DATA seen before the announce verified, replayed at the join (bounded).
    var preJoin: [DataSymbol] = []
    var lastHello: Instant?
}

/// Announce fragments and the memory of refused envelopes. Both outlive a state:
/// a joined receiver still assembles announces of other sessions to follow its
/// sender's restart (P-2), and a refusal is remembered for whatever comes next (P-4).
struct AnnounceIntake {
    var collector = EnvelopeCollector()
    /// Refused envelopes (by hash) and how often the refusal was sent, so a repeated
    /// announce is not verified and answered forever.
    private var refused: [[UInt8]: Int] = [:]
    static let refusedEnvelopeCountMax = 8
    /// Hashes of envelopes whose signatures failed, oldest first (Specs/bundle.md B-8a):
    /// a forged envelope repeated costs one hash, not a signature check each time.
    private var failed: [[UInt8]] = []
    static let failedEnvelopeCountMax = 64

    func hasFailed(_ hash: [UInt8]) -> Bool { failed.contains(hash) }

    mutating func noteFailed(_ hash: [UInt8]) {
        guard !failed.contains(hash) else { return }
        if failed.count >= Self.failedEnvelopeCountMax { failed.removeFirst() }
        failed.append(hash)
    }

    /// Never offers `envelope` again (the device already has it), and tells nobody.
    mutating func ignore(_ envelope: [UInt8], repeatMax: Int) {
        let key = SHA256.hash(envelope)
        if refused[key] == nil && refused.count >= Self.refusedEnvelopeCountMax { refused.removeAll() }
        refused[key] = repeatMax
    }

    func wasRefusedEnough(_ envelope: [UInt8], repeatMax: Int) -> Bool {
        (refused[SHA256.hash(envelope)] ?? 0) >= repeatMax
    }

    /// Counts one more refusal of `envelope`; false once it has been told `repeatMax` times.
    mutating func noteRefusal(of envelope: [UInt8], repeatMax: Int) -> Bool {
        let key = SHA256.hash(envelope)
        let told = refused[key, default: 0]
        guard told < repeatMax else { return false }
        if refused[key] == nil && refused.count >= Self.refusedEnvelopeCountMax { refused.removeAll() }
        refused[key] = told + 1
        return true
    }
}

/// Collects ANNOUNCE fragments into envelopes (Specs/protocol.md P-3, P-3d). Each
/// fragment is checked against the Merkle root its ANNOUNCE names before it is kept,
/// and fragments are kept together only with others of the same session, root, length
/// and count: a forged fragment cannot spoil a genuine envelope, and a forged root
/// collects apart (at most `collectorsMax` collections at once, the least recently
/// fed one going first).
struct EnvelopeCollector {
    private struct Key: Hashable {
        let session: SessionID
        let root: [UInt8]
        let length: UInt32
        let count: UInt16
    }
    private var partials: [Key: (fragments: [UInt16: [UInt8]], fedAt: UInt64)] = [:]
    private var feeds: UInt64 = 0
    static let collectorsMax = 4

    enum Outcome {
        case incomplete
        case envelope([UInt8])
        /// The fragment does not hash to its root (forged or corrupt).
        case badFragment
        /// Another root than the one a signed record names for the session.
        case foreignRoot
    }

    /// `root`: the root a verified SESSION record names for the announce's session, if any.
    mutating func add(_ a: Announce, root: [UInt8]?) -> Outcome {
        guard Int(a.envelopeLength) <= BundleLimits.envelopeByteCountMax else { return .badFragment }
        if let root, root != a.root { return .foreignRoot }
        guard EnvelopeTree.verify(a) else { return .badFragment }
        let key = Key(session: a.session, root: a.root, length: a.envelopeLength, count: a.fragmentCount)
        feeds += 1
        if partials[key] == nil, partials.count >= Self.collectorsMax,
           let oldest = partials.min(by: { $0.value.fedAt < $1.value.fedAt })?.key {
            partials[oldest] = nil
        }
        var p = partials[key] ?? ([:], feeds)
        p.fragments[a.fragmentIndex] = a.fragment
        p.fedAt = feeds
        guard p.fragments.count == Int(a.fragmentCount) else { partials[key] = p; return .incomplete }
        partials[key] = nil
        let envelope = (0..<a.fragmentCount).flatMap { p.fragments[$0]! }
        return envelope.count == Int(a.envelopeLength) ? .envelope(envelope) : .badFragment
    }
}

extension Announce {
    /// Specs/protocol.md §3.1: where this session's feedback goes. Address family 0
    /// means "reply to the announce's source".
    func feedbackDestination(source: PeerAddress) -> PeerAddress {
        Self.feedbackDestination(feedbackFamily, feedbackAddress, feedbackPort, source: source)
    }

    /// A feedback address as ANNOUNCE and SESSION name it: family 0 is the datagram's source.
    static func feedbackDestination(_ family: AddressFamily, _ address: [UInt8], _ port: UInt16, source: PeerAddress) -> PeerAddress {
        switch family {
        case .sourceAddress: source
        case .ipv4: PeerAddress(family: .ipv4, address: address.prefix(4), port: port)
        case .ipv6: PeerAddress(family: .ipv6, address: address, port: port, scopeID: source.family == .ipv6 ? source.scopeID : 0)
        }
    }
}

extension Receiver {
    // MARK: Not joined

    /// A datagram while listening or while an offer awaits its answer.
    mutating func handleUnjoined(_ datagram: Datagram, from peer: PeerAddress, at now: Instant) {
        var taken = State.modifying
        swap(&state, &taken)
        switch consume taken {
        case .listening(var l):
            handleUnjoined(datagram, &l, from: peer, at: now, offerPending: false)
            // An announce may have made an offer of it.
            if case .modifying = state { put(l) }
        case .offered(var l, let offer):
            handleUnjoined(datagram, &l, from: peer, at: now, offerPending: true)
            put(l, offer: offer)
        case .receiving, .finishing, .modifying:
            preconditionFailure("not listening")
        }
    }

    private mutating func handleUnjoined(_ datagram: Datagram, _ l: inout Listening, from peer: PeerAddress, at now: Instant, offerPending: Bool) {
        switch datagram {
        case .data(let d):
            requestAnnounce(d.session, &l, to: peer, at: now)
            // Specs/protocol.md P-3b: keep a bounded number of DATA datagrams seen before the
            // announce; they are checked like any other once the manifest verifies.
            if l.preJoin.count < config.unauthenticatedSymbolCountMax { l.preJoin.append(d) } else { stats.drops.add(.preJoinBufferFull) }
        case .poll(let p):
            requestAnnounce(p.session, &l, to: peer, at: now)
        case .announce(let a):
            // One offer at a time: announces wait until the device has answered.
            guard !offerPending else { return }
            handleAnnounce(a, &l, from: peer)
        case .close, .ack, .cookie, .session:
            return
        case .register, .nack, .status:
            stats.drops.add(.feedbackFromPeer)
        }
    }

    /// Specs/protocol.md P-3a: traffic of a session whose announce this receiver
    /// missed. It says hello (REGISTER) so that the sender announces again and
    /// waits for it; at most once per `statusInterval`.
    private mutating func requestAnnounce(_ id: SessionID, _ l: inout Listening, to source: PeerAddress, at now: Instant) {
        // P-31a: a receiver that requires authenticated sessions says hello only to the
        // address a signed record names (a forged POLL must not aim it at anyone).
        var peer = source
        if config.sessionAuthentication == .required {
            guard let k = records.record(for: id) else { return }
            peer = k.record.feedbackDestination(source: source)
        }
        if let last = l.lastHello, now < last + config.statusInterval { return }
        l.lastHello = now
        stats.hellos += 1
        send(registration(for: id), to: peer, at: now)
    }

    /// REGISTER for a session: who this device is and what it runs (Specs/protocol.md §3.5).
    func registration(for id: SessionID) -> Datagram { .register(register(for: id)) }

    func register(for id: SessionID) -> Register {
        Register(session: id, receiver: config.receiverID, installedSequence: config.installedSequence,
                 deviceID: Register.fitting(config.deviceID), version: Register.fitting(config.installedVersion))
    }

    /// Specs/protocol.md P-3d: the announce's fragment into its collection (checked
    /// against its root, and against the root a signed record names); the envelope once
    /// every fragment is in.
    mutating func collect(_ a: Announce) -> [UInt8]? {
        switch intake.collector.add(a, root: records.record(for: a.session)?.record.envelopeRoot) {
        case .incomplete: return nil
        case .envelope(let e): return e
        case .badFragment: stats.drops.add(.announceBadFragment); return nil
        case .foreignRoot: stats.drops.add(.announceForeignRoot); return nil
        }
    }

    /// Specs/protocol.md P-3, P-3c: a complete envelope whose signatures verify
    /// becomes an offer; a forged or corrupt one is counted and dropped, and the
    /// receiver keeps listening for a genuine announce (P-4).
    private mutating func handleAnnounce(_ a: Announce, _ l: inout Listening, from peer: PeerAddress) {
        guard let envelope = collect(a) else { return }
        if intake.wasRefusedEnough(envelope, repeatMax: config.statusRepeatMax) { stats.drops.add(.announceRefusedBefore); return }
        let hash = SHA256.hash(envelope)
        if intake.hasFailed(hash) { stats.drops.add(.announceFailedBefore); return }
        // Specs/protocol.md P-31a: the signed SESSION record of this session, if one names
        // this envelope: the session is authenticated, and its feedback goes where it says.
        let known = records.record(for: a.session).flatMap { k in
            k.record.envelopeRoot == a.root && Int(k.record.envelopeLength) == envelope.count
                && Int(k.record.interleaveWindow) == Int(a.interleaveWindow) && k.record.carousel == a.carousel ? k : nil
        }
        if known == nil && config.sessionAuthentication == .required { stats.drops.add(.unauthenticatedSession); return }
        let signed: SignedManifest
        var checks = 0
        do { signed = try ManifestVerifier.verifySignatures(envelope: envelope, trust: config.trust) { checks += 1 } } catch {
            stats.signatureChecks += UInt64(checks)
            stats.announcesRejected.add(error.code)
            if error.code == .signatureInvalid { intake.noteFailed(hash) }
            return
        }
        stats.signatureChecks += UInt64(checks)
        let sender = known.map { $0.record.feedbackDestination(source: peer) } ?? a.feedbackDestination(source: peer)
        let offer = Offer(session: a.session, manifest: signed, envelope: envelope, carousel: a.carousel,
                          sender: sender, resumes: resume?.progress.envelope == envelope, announce: a, senderDelegation: known?.delegation)
        stats.offers += 1
        actions.append(.offer(offer))
        put(l, offer: offer)
    }

    // MARK: The device's answer

    /// Accepts the pending offer, whose manifest the device admitted under its policy
    /// (`SignedManifest.admit(under:)`), and joins its session. `resuming: false`
    /// discards the journal given at `init` (its staging files were not kept).
    /// `payloadWindowEnd`: stage payload blocks below it only (P-29c, moved on with
    /// `setPayloadWindow`); nil, no window.
    public mutating func accept(_ verified: VerifiedManifest, resuming: Bool = true, payloadWindowEnd: Int? = nil, at now: Instant) {
        guard case .offered(let l, let offer) = state else { preconditionFailure("accept without a pending offer") }
        precondition(verified.manifestBytes == offer.manifest.manifestBytes, "accept the manifest that was offered")
        precondition(payloadWindowEnd.map { $0 >= 1 } ?? true, "a window holds a block at least")
        if !resuming { resume = nil }
        join(offer, verified: verified, early: l.preJoin.filter { $0.session == offer.session }, payloadWindowEnd: payloadWindowEnd, at: now)
    }

    /// Drops the pending offer without a word to its sender, and never offers the same
    /// envelope again: the device already has this update.
    public mutating func dismiss(at now: Instant) {
        guard case .offered(var l, let offer) = state else { preconditionFailure("dismiss without a pending offer") }
        l.preJoin.removeAll { $0.session == offer.session }
        put(l)
        intake.ignore(offer.envelope, repeatMax: config.statusRepeatMax)
    }

    /// Declines the pending offer (Specs/protocol.md P-4): the sender is told why and
    /// the receiver goes on listening for an acceptable session.
    public mutating func decline(_ reason: Status.Reason, _ text: String, at now: Instant) {
        guard case .offered(var l, let offer) = state else { preconditionFailure("decline without a pending offer") }
        precondition(reason != .none, "a decline has a reason")
        // Its DATA, kept for the join (P-3b), would only take the room of another session's.
        l.preJoin.removeAll { $0.session == offer.session }
        put(l)
        recordDecline(reason, text, offer: offer, at: now)
    }

    private mutating func join(_ offer: Offer, verified: VerifiedManifest, early: [DataSymbol], payloadWindowEnd: Int?, at now: Instant) {
        var s = Session(offer: offer, verified: verified, now: now, config: config)
        s.payloadWindowEnd = payloadWindowEnd
        stats.joins += 1
        if let r = resume, r.progress.envelope == offer.envelope {
            // Specs/protocol.md P-20: journalled blocks are durable; do not ask for them again.
            s.resume(from: r, stats: &stats)
            stats.resumedPayloadBlocks += UInt64(s.payload.doneCount)
        }
        resume = nil
        state = .modifying
        for d in early { handleData(d, &s, at: now) }
        stats.preJoinReplayed += UInt64(early.count)
        if !s.carousel {
            send(registration(for: offer.session), to: s.sender, at: now)
        }
        settle(s, at: now)
    }
}
