import DeliveryCore
import BundleFormat
import DeliverySimulation
import FleetCrypto
import Testing
import WireFormat

/// Issue 15: feedback a LAN attacker can forge without any key, against the sender
/// core alone (Specs/protocol.md P-3a, P-11b, P-12b, P-13b). Each test failed on the
/// sender before these rules.
@Suite("Hostile feedback at the sender")
struct HostileFeedbackTests {
    static let session = SessionID(0xBEEF)

    /// Steps the sender every 100 µs, from `now`, until it sends a POLL; returns the POLL.
    static func untilPoll(_ sender: inout Sender, _ now: inout Instant) -> Poll? {
        while now.microseconds < 10_000_000 {
            sender.handleTimeout(at: now)
            while let t = sender.pollTransmit(at: now) {
                if case .poll(let p)? = try? Datagram(parsing: t.bytes) { return p }
            }
            now = now + Interval(microseconds: 100)
        }
        return nil
    }

    @Test("P-13b: a NACK echoing a sent-at the sender never issued is no round-trip sample; a genuine one raises the GRTT at most 2x in a round")
    func forgedEchoes() async throws {
        let bundle = try await BundleCache.shared.bundle(300_000)
        var sender = makeSender(bundle)
        var now = Instant.zero
        let poll = try #require(Self.untilPoll(&sender, &now))
        let start = sender.currentGRTT
        #expect(start == .milliseconds(10))
        // Registered receivers (P-30) whose echoes are of times the sender never sent, arriving 900 ms "later".
        let late = Instant(microseconds: poll.sentAtMicroseconds + 900_000)
        for i in 0..<64 {
            let peer = TestPeer(100 + UInt64(i), with: &sender, at: now)
            sender.handleDatagram(peer.nack([.init(object: .payload, block: 0, needed: 1)], echo: UInt64(i + 1) * 7), from: peer.address, at: late)
        }
        #expect(sender.stats.nacks == 64, "the NACKs themselves count")
        #expect(sender.currentGRTT == start, "GRTT \(sender.currentGRTT.microseconds) µs after forged echoes")
        // Genuine, but 300 ms late (a forger replaying it late, or a backlogged host): at most twice the round's start.
        let peer = TestPeer(4, with: &sender, at: now)
        sender.handleDatagram(peer.nack([.init(object: .payload, block: 0, needed: 1)], echo: poll.sentAtMicroseconds), from: peer.address,
                              at: Instant(microseconds: poll.sentAtMicroseconds + 300_000))
        #expect(sender.currentGRTT == start * 2, "GRTT \(sender.currentGRTT.microseconds) µs")
    }

    @Test("P-11b: a NACK for a block the first pass has not sent yet is dropped, not repaired")
    func unsentBlocksNotRepaired() async throws {
        let bundle = try await BundleCache.shared.bundle(1_000_000)
        var sender = makeSender(bundle)
        let now = Instant.zero
        sender.handleTimeout(at: now)
        for _ in 0..<5 { _ = sender.pollTransmit(at: now) }  // the announce and a few auth-chain symbols
        let last = UInt32(sender.totalBlocks - 1)
        #expect(last >= 8, "a payload of more than one window")
        let peer = TestPeer(4, with: &sender, at: now)
        sender.handleDatagram(peer.nack([.init(object: .payload, block: last, needed: 1)]), from: peer.address, at: now)
        sender.handleDatagram(peer.nack([.init(object: .payload, block: 0, needed: 1)]), from: peer.address, at: now)  // the payload has not begun
        #expect(sender.stats.drops[.nackEntryNotSent] == 2)
        #expect(sender.stats.repairQueuedFirstPass == 0)
        // An auth-chain block of the window under way is served.
        sender.handleDatagram(peer.nack([.init(object: .authChain, block: 0, needed: 1)]), from: peer.address, at: now)
        #expect(sender.stats.repairQueuedFirstPass == 1)
    }

    /// Specs/protocol.md P-17c, issue 15's attack 5: in an unauthenticated session, forged
    /// POLLs (and forged DATA of blocks far ahead) during the first pass make a receiver
    /// ask for no block the sender has not sent. Before, each forged POLL opened every
    /// incomplete block (577 POLLs drew 2,791 NACKs).
    @Test("P-17c: forged POLLs and forged DATA mid-pass draw no NACK for blocks beyond the genuine data seen (keyless session)")
    func noNackBeyondData() async throws {
        let bundle = try await BundleCache.shared.bundle(3_000_000)
        var sender = makeSender(bundle, rate: 2_000_000)
        var receiver = Receiver(config: receiverConfig(bundle))
        var now = AuthenticatedSessionTests.join(&sender, &receiver)
        let session = try #require(receiver.session)
        var sentThrough = -1, asked: [Int] = [], nacks = 0, forgeries = 0
        let lastBlock = UInt32(sender.totalBlocks - 1)
        for i in 0..<300 {  // 300 ms of a 1.5 s first pass
            sender.handleTimeout(at: now)
            while let t = sender.pollTransmit(at: now) {
                if case .data(let d)? = try? Datagram(parsing: t.bytes), d.object == .payload { sentThrough = max(sentThrough, Int(d.block)) }
                receiver.take(t.bytes, at: now)
            }
            // Once the auth chain is in and the payload flows (the limits P-17c states: before the
            // chain, held symbols move the frontier; while only symbols of done blocks come, which
            // are not checked, the quiet runs), every forged DATA fails its tag on arrival and no
            // forged POLL opens a block beyond the data seen.
            if i % 4 == 0 && receiver.stats.segmentsVerified == UInt64(bundle.manifest.authentication.segmentCount)
                && receiver.stats.acceptedPayloadSymbols > 0 {
                forgeries += 1
                let poll = Datagram.poll(Poll(session: session, round: UInt32(100 + i), sentAtMicroseconds: 1, grttMicroseconds: 100, groupSize: 1)).encoded()
                let data = Datagram.data(DataSymbol(session: session, object: .payload, block: lastBlock, symbolIndex: 0,
                                                    symbol: ArraySlice(repeating: 7, count: Scenario.compactProfile.symbolSize))).encoded()
                receiver.handleDatagram(data, from: .benchmark(66), at: now)
                receiver.handleDatagram(poll, from: .benchmark(66), at: now)
            }
            receiver.handleTimeout(at: now)
            while let t = receiver.pollTransmit() {
                if case .nack(let n)? = try? Datagram(parsing: t.bytes) {
                    nacks += 1
                    asked += n.entries.filter { $0.object == .payload }.map { Int($0.block) }
                }
                sender.handleDatagram(t.bytes, from: .benchmark(2), at: now)
            }
            while receiver.pollAction() != nil {}
            now = now + .milliseconds(1)
        }
        #expect(sentThrough > 0 && sentThrough < Int(lastBlock), "the first pass is under way: sent through block \(sentThrough)")
        #expect(forgeries >= 40 && receiver.stats.drops[.badTag] == UInt64(forgeries), "the forged DATA failed its tag")
        let window = 8
        #expect(asked.allSatisfy { $0 / window <= sentThrough / window }, "NACKed beyond the data sent (through \(sentThrough)): \(asked.filter { $0 > sentThrough }.prefix(10))")
        #expect(sender.stats.drops[.nackEntryNotSent] == 0)
    }

    @Test("P-3a: 200 new receivers registering in a second add at most one announce per earlyAnnounceIntervalMin")
    func earlyAnnouncesBounded() async throws {
        let bundle = try await BundleCache.shared.bundle(1_000_000)
        func announces(registering: Int) -> UInt64 {
            var sender = makeSender(bundle, rate: 1_000_000)
            var now = Instant.zero
            for i in 0..<1000 {
                sender.handleTimeout(at: now)
                // Each from an address of its own, with the cookie exchange: receivers the sender
                // must take (an attacker on the LAN can register IDs like any device).
                if i % 5 == 0 && i / 5 < registering { _ = TestPeer(UInt64(1000 + i), with: &sender, at: now) }
                while sender.pollTransmit(at: now) != nil {}
                now = now + Interval.milliseconds(1)
            }
            return sender.stats.announces
        }
        let quiet = announces(registering: 0), flooded = announces(registering: 200)
        // One second: at most four early announces more (one every 250 ms), and one for rounding.
        #expect(flooded <= quiet + 5, "announces: \(quiet) without REGISTERs, \(flooded) with 200")
        #expect(flooded > quiet, "a REGISTER still brings an early announce")
    }

    @Test("P-12b: without a deadline of its own, a session fed STATUS forever ends at the default limit")
    func defaultDeadline() async throws {
        let bundle = try await BundleCache.shared.bundle(300_000)
        var sender = makeSender(bundle)
        let limit = sender.sessionDeadline
        #expect(limit >= SenderConfig.defaultDeadlineBase && limit < SenderConfig.defaultDeadlineBase + .seconds(5), "\(limit.microseconds) µs")
        var now = Instant.zero
        var peer: TestPeer?
        while !sender.isFinished && now < Instant.zero + limit + .seconds(60) {
            sender.handleTimeout(at: now)
            // A receiver that never finishes (or an attacker registered as one) reports every second.
            if peer == nil { peer = TestPeer(4, with: &sender, at: now) }
            sender.handleDatagram(peer!.status(.receiving, done: 1), from: .benchmark(4), at: now)
            while sender.pollTransmit(at: now) != nil {}
            now = now + .seconds(1)
        }
        #expect(sender.isFinished && sender.stats.closes[.deadline] == 1, "finished \(sender.isFinished) at \(now.microseconds) µs")
    }
}

/// Specs/protocol.md §3.9, P-30: feedback counts only from a receiver that proved it
/// can be reached where it registered.
@Suite("Feedback cookies")
struct FeedbackCookieTests {
    static let session = SessionID(0xBEEF)

    static func register(_ id: UInt64, cookie: FeedbackCookie = .none) -> [UInt8] {
        Datagram.register(Register(session: session, receiver: ReceiverID(id), cookie: cookie, installedSequence: 1, deviceID: "x", version: "1")).encoded()
    }

    @Test("Issue 15, attacks 1 and 6: forged REGISTERs make no state, a forged STATUS complete counts for nothing, COOKIE replies are bounded")
    func spoofedFeedback() async throws {
        let bundle = try await BundleCache.shared.bundle(300_000)
        var sender = makeSender(bundle) { $0.expectedReceivers = 1 }
        let now = Instant(microseconds: 5_000_000)
        // 4,096 REGISTERs from spoofed addresses: each answered by a COOKIE (no larger than it), none remembered.
        for i in 0..<4096 { sender.handleDatagram(Self.register(UInt64(10_000 + i)), from: .benchmark(UInt16(100 + i % 60_000)), at: now) }
        #expect(sender.receivers.isEmpty && sender.stats.receiversRegistered == 0)
        var cookies = 0
        while let t = sender.pollTransmit(at: now) {
            if case .cookie? = try? Datagram(parsing: t.bytes) { cookies += 1; #expect(t.bytes.count <= Self.register(1).count) }
        }
        #expect(cookies == sender.config.cookieRepliesPerSecondMax && sender.stats.drops[.cookieRateLimited] == 4096 - cookies)
        // A forged STATUS complete for a receiver ID, with no cookie or a guessed one: nothing counts.
        for c in [FeedbackCookie.none, FeedbackCookie([UInt8](repeating: 7, count: 16))] {
            sender.handleDatagram(Datagram.status(Status(session: Self.session, receiver: ReceiverID(4), cookie: c, state: .complete, reason: .none,
                                                         blocksDone: 3, blocksTotal: 3, bytesReceived: 1, nacksSent: 0)).encoded(),
                                  from: .benchmark(4), at: now)
        }
        #expect(sender.receivers[ReceiverID(4)] == nil && sender.stats.receiversVerified == 0 && sender.stats.drops[.unbound] == 2)
        // The genuine receiver registers (next second: the COOKIE budget is new) and its report counts.
        let later = now + .seconds(1)
        let genuine = TestPeer(4, with: &sender, at: later)
        sender.handleDatagram(genuine.status(.complete), from: genuine.address, at: later)
        #expect(sender.receivers[ReceiverID(4)]?.state == .verified)
    }

    @Test("A receiver's feedback counts only from its address and with its cookie; another host takes an ID over only once it went silent; a restart on a new port rebinds")
    func binding() async throws {
        let bundle = try await BundleCache.shared.bundle(300_000)
        var sender = makeSender(bundle)
        var now = Instant(microseconds: 1_000_000)
        let a = TestPeer(7, with: &sender, at: now, address: .benchmark(7))
        // Its cookie from another host: dropped.
        sender.handleDatagram(a.status(.receiving, done: 1), from: .benchmark(8), at: now)
        #expect(sender.stats.drops[.unbound] == 1)
        // Another host registering the same ID while it is live: a collision, the binding kept.
        let thief = PeerAddress.benchmark(9)
        sender.handleDatagram(Self.register(7), from: thief, at: now)
        var stolen: FeedbackCookie?
        while let t = sender.pollTransmit(at: now) { if case .cookie(let c)? = try? Datagram(parsing: t.bytes) { stolen = c.cookie } }
        sender.handleDatagram(Self.register(7, cookie: stolen!), from: thief, at: now)
        #expect(sender.stats.drops[.receiverIDCollision] == 1 && sender.receivers[ReceiverID(7)]?.address == .benchmark(7))
        // The same host from a new port (restarted): rebound at once.
        let restarted = PeerAddress(family: .ipv4, address: [198, 18, 0, 7], port: 40_000)
        #expect(restarted.hostOnly == PeerAddress.benchmark(7).hostOnly && restarted != .benchmark(7))
        let b = TestPeer(7, with: &sender, at: now, address: restarted)
        #expect(sender.receivers[ReceiverID(7)]?.address == restarted && sender.stats.receiversRebound == 1)
        sender.handleDatagram(b.status(.receiving, done: 2), from: restarted, at: now)
        #expect(sender.receivers[ReceiverID(7)]?.blocksDone == 2)
        // Silent past receiverSilenceMax: another host may take the ID (a device that moved).
        now = now + sender.config.receiverSilenceMax + .seconds(1)
        _ = TestPeer(7, with: &sender, at: now, address: thief)
        #expect(sender.receivers[ReceiverID(7)]?.address == thief && sender.stats.receiversRebound == 2)
    }

    @Test("At most receiversPerAddressMax receivers register from one host")
    func perAddress() async throws {
        let bundle = try await BundleCache.shared.bundle(300_000)
        var sender = makeSender(bundle) { $0.receiversPerAddressMax = 3 }
        for i in 0..<5 { _ = TestPeer(UInt64(50 + i), with: &sender, at: .zero, address: PeerAddress(family: .ipv4, address: [198, 18, 0, 50], port: UInt16(1000 + i))) }
        #expect(sender.receivers.count == 3 && sender.stats.drops[.receiversPerAddress] == 2)
    }

    @Test("CookieJar: feedback waits for the cookie and goes with it; an unasked COOKIE is refused; an ACK counts only with the cookie")
    func jar() {
        var jar = CookieJar(receiver: ReceiverID(3))
        let sender = PeerAddress.benchmark(1)
        let registration = { (s: SessionID) in Register(session: s, receiver: ReceiverID(3), installedSequence: 1, deviceID: "d", version: "1") }
        let status = Datagram.status(Status(session: Self.session, receiver: ReceiverID(3), state: .complete, reason: .none,
                                            blocksDone: 1, blocksTotal: 1, bytesReceived: 1, nacksSent: 0))
        // Without a cookie: a REGISTER asks for one; the STATUS waits; a second one soon after asks nothing more.
        let first = jar.outgoing(status, to: sender, at: .zero, registration: registration)
        guard case .register(let r)? = first.first, first.count == 1 else { Issue.record("\(first)"); return }
        #expect(r.cookie.isNone)
        #expect(jar.outgoing(status, to: sender, at: Instant(microseconds: 1000), registration: registration).isEmpty)
        #expect(jar.handle(Cookie(session: SessionID(0xDEAD), receiver: ReceiverID(3), cookie: FeedbackCookie([UInt8](repeating: 1, count: 16))),
                           at: .zero, registration: registration) == nil, "a session it never asked")
        let c = FeedbackCookie([UInt8](repeating: 9, count: 16))
        let released = jar.handle(Cookie(session: Self.session, receiver: ReceiverID(3), cookie: c), at: .zero, registration: registration) ?? []
        // The REGISTER with the cookie first, then both held STATUS, stamped.
        #expect(released.count == 3)
        if case .register(let r2)? = released.first { #expect(r2.cookie == c) } else { Issue.record("\(released)") }
        for d in released.dropFirst() { if case .status(let s) = d { #expect(s.cookie == c) } else { Issue.record("\(d)") } }
        #expect(jar.accepts(Ack(session: Self.session, receiver: ReceiverID(3), cookie: c, state: .complete)))
        #expect(!jar.accepts(Ack(session: Self.session, receiver: ReceiverID(3), state: .complete)), "a forged ACK (no cookie)")
        #expect(!jar.accepts(Ack(session: Self.session, receiver: ReceiverID(3), cookie: FeedbackCookie([UInt8](repeating: 8, count: 16)), state: .complete)))
    }
}

@Suite("Hostile announces")
struct HostileAnnounceTests {
    /// Issue 15, attack 8: forged envelopes with 16 signatures whose key IDs name a
    /// trusted key cost a receiver 16 signature checks each, and the same forgery again
    /// cost as much again.
    @Test("Specs/bundle.md B-8a: 16 forged signatures naming the trusted key cost one check, and the same forged envelope again none")
    func forgedSignatures() async throws {
        let bundle = try await BundleCache.shared.bundle(300_000)
        let key = try PrivateKey(raw: [UInt8](repeating: 7, count: 32), algorithm: .ed25519)  // the simulator's vendor key
        #expect(key.publicKey.keyID == bundle.trustedKey.keyID)
        let (manifest, _) = try COSE.parseEnvelope(bundle.envelope)
        var envelope = try COSE.envelope(manifest: manifest, keys: Array(repeating: key, count: 16))
        // One bit of the payload hash flipped: every signature now fails.
        let at = try #require(envelope.firstRange(of: bundle.manifest.payload.sha256)).lowerBound + 3
        envelope[at] ^= 1
        let tree = EnvelopeTree.fragments(of: envelope)
        let announces = tree.fragments.map { f in
            Datagram.announce(Announce(session: SessionID(0xBAD), rateKilobytesPerSecond: 1000, grttMicroseconds: 10_000, groupSize: 1, interleaveWindow: 8,
                                       fragmentIndex: f.index, fragmentCount: f.count, envelopeLength: UInt32(envelope.count),
                                       root: tree.root, path: f.path, fragment: f.bytes)).encoded()
        }
        var receiver = Receiver(config: receiverConfig(bundle))
        for _ in 0..<5 { for a in announces { receiver.handleDatagram(a, from: .benchmark(66), at: .zero) } }
        #expect(receiver.stats.signatureChecks == 1, "\(receiver.stats.signatureChecks) checks")
        #expect(receiver.stats.announcesRejected[.signatureInvalid] == 1 && receiver.stats.drops[.announceFailedBefore] == 4)
        #expect(receiver.pendingOffer == nil)
        // The genuine announce still becomes an offer, at one check.
        var sender = makeSender(bundle)
        if let t = sender.pollTransmit(at: .zero) { receiver.handleDatagram(t.bytes, from: senderPeer, at: .zero) }
        #expect(receiver.pendingOffer != nil && receiver.stats.signatureChecks == 2)
    }

    /// Issue 15, attack 5: 577 forged POLLs (18 KB) drew 2,791 NACKs from one receiver.
    @Test("P-19b: forged POLLs, each a new round with the least GRTT, draw at most nackDatagramsPerSecondMax NACKs a second")
    func forgedPolls() async throws {
        let bundle = try await BundleCache.shared.bundle(1_000_000)
        var sender = makeSender(bundle)
        var receiver = Receiver(config: receiverConfig(bundle))
        // The first pass, every third DATA lost, the sender deaf: blocks stay incomplete.
        var now = Instant.zero, count = 0
        pass: while now.microseconds < 2_000_000 {
            sender.handleTimeout(at: now)
            while let t = sender.pollTransmit(at: now) {
                if t.bytes[1] == Datagram.Kind.poll.rawValue { break pass }
                count += 1
                if t.bytes[1] == Datagram.Kind.data.rawValue && count % 3 == 0 { continue }
                receiver.take(t.bytes, at: now)
            }
            receiver.handleTimeout(at: now)
            while receiver.pollTransmit() != nil {}
            while receiver.pollAction() != nil {}
            now = now + Interval(microseconds: 500)
        }
        #expect(receiver.session != nil && !receiver.isComplete)
        // 577 forged POLLs within 0.98 s, each a new round, GRTT 100 µs, a group of one.
        let before = receiver.nacksSent
        let start = now
        for i in 0..<577 {
            let t = start + Interval(microseconds: UInt64(i) * 1_700)
            let poll = Datagram.poll(Poll(session: SessionID(0xBEEF), round: UInt32(1000 + i), sentAtMicroseconds: 1, grttMicroseconds: 100, groupSize: 1)).encoded()
            receiver.handleDatagram(poll, from: .benchmark(66), at: t)
            for step in 0..<17 {
                receiver.handleTimeout(at: t + Interval(microseconds: UInt64(step) * 100))
                while receiver.pollTransmit() != nil {}
            }
        }
        let nacks = receiver.nacksSent - before
        #expect(nacks > 0 && nacks <= receiver.config.nackDatagramsPerSecondMax, "\(nacks) NACKs in under a second")
        #expect(receiver.stats.nacksDeferredPerSecond > 0, "the cap held NACKs back")
    }

    /// Issue 15, attack 4: forged ANNOUNCE fragments (66 KB/s) kept a late joiner from
    /// ever assembling a multi-fragment envelope.
    @Test("P-3d: forged fragments, under the genuine root or their own, do not keep a receiver from assembling the genuine envelope")
    func forgedFragments() async throws {
        let bundle = try await BundleCache.shared.bundle(300_000)
        let key = try PrivateKey(raw: [UInt8](repeating: 7, count: 32), algorithm: .ed25519)  // the simulator's vendor key
        let (manifest, _) = try COSE.parseEnvelope(bundle.envelope)
        // Twelve signatures by the trusted key: an envelope of several fragments that verifies.
        let envelope = try COSE.envelope(manifest: manifest, keys: Array(repeating: key, count: 12))
        let genuine = EnvelopeTree.fragments(of: envelope)
        #expect(genuine.fragments.count >= 2)
        func announce(_ f: (index: UInt16, count: UInt16, bytes: [UInt8], path: [[UInt8]]), root: [UInt8], length: Int) -> [UInt8] {
            Datagram.announce(Announce(session: SessionID(0xBEEF), rateKilobytesPerSecond: 1000, grttMicroseconds: 10_000, groupSize: 1, interleaveWindow: 8,
                                       fragmentIndex: f.index, fragmentCount: f.count, envelopeLength: UInt32(length), root: root, path: f.path, fragment: f.bytes)).encoded()
        }
        // A forger's own envelope of the same size (its own root, valid paths) and garbage under the genuine root.
        let junk = [UInt8](repeating: 0x5A, count: envelope.count)
        let forgedTree = EnvelopeTree.fragments(of: junk)
        var receiver = Receiver(config: receiverConfig(bundle))
        for (i, g) in genuine.fragments.enumerated() {
            var spoiled = g
            spoiled.bytes = [UInt8](repeating: 0xEE, count: g.bytes.count)
            // The genuine fragment, then a forger's copy of it that would replace it, then the forger's own.
            receiver.handleDatagram(announce(g, root: genuine.root, length: envelope.count), from: senderPeer, at: .zero)
            receiver.handleDatagram(announce(spoiled, root: genuine.root, length: envelope.count), from: .benchmark(66), at: .zero)
            receiver.handleDatagram(announce(forgedTree.fragments[i], root: forgedTree.root, length: junk.count), from: .benchmark(66), at: .zero)
        }
        // Every spoiled copy but the last was checked and dropped (the last came after the
        // genuine envelope was complete and offered: announces wait for the device's answer).
        #expect(receiver.stats.drops[.announceBadFragment] == UInt64(genuine.fragments.count - 1))
        #expect(receiver.pendingOffer != nil, "the genuine envelope was assembled and offered")
    }

    @Test("P-3d: every fragment of envelopes of 1 to 5 fragments verifies at its index; another index, a flipped bit or another root does not")
    func envelopeTree() {
        for length in [1, 1024, 1025, 3000, 4097] {
            let envelope = (0..<length).map { UInt8(truncatingIfNeeded: $0 &* 13) }
            let tree = EnvelopeTree.fragments(of: envelope)
            for f in tree.fragments {
                var a = Announce(session: SessionID(1), rateKilobytesPerSecond: 1, grttMicroseconds: 1, groupSize: 1, interleaveWindow: 1, fragmentIndex: f.index,
                                 fragmentCount: f.count, envelopeLength: UInt32(length), root: tree.root, path: f.path, fragment: f.bytes)
                #expect(EnvelopeTree.verify(a), "length \(length) fragment \(f.index)")
                var flipped = a
                flipped.fragment[0] ^= 1
                #expect(!EnvelopeTree.verify(flipped))
                if f.count > 1 {
                    var moved = a
                    moved.fragmentIndex = (f.index + 1) % f.count
                    #expect(!EnvelopeTree.verify(moved))
                    a.path[0][5] ^= 0x80
                    #expect(!EnvelopeTree.verify(a))
                }
            }
        }
    }
}

