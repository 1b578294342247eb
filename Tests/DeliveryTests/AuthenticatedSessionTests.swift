import BundleFormat
import DeliveryCore
import DeliverySimulation
import FleetCrypto
import Testing
import WireFormat

/// Specs/protocol.md §3.10, P-31: sessions whose sender signs SESSION records with a
/// key the vendor delegated; forged or replayed ANNOUNCE, POLL and CLOSE change nothing.
@Suite("Authenticated sessions")
struct AuthenticatedSessionTests {
    static let vendor = try! PrivateKey(raw: [UInt8](repeating: 7, count: 32), algorithm: .ed25519)  // the simulator's vendor key
    static let senderKey = try! PrivateKey(raw: [UInt8](repeating: 0x51, count: 32), algorithm: .ed25519)
    static let delegation = try! SenderDelegation.make(senderKey: senderKey.publicKey, signer: vendor, notBefore: 0, expires: 300 * 86_400)

    static func authenticatedSender(_ bundle: SimulationBundle, key: PrivateKey = senderKey, delegation: SenderDelegation = delegation) -> Sender {
        makeSender(bundle) {
            $0.authentication = SenderAuthentication(key: key, delegation: delegation.encoded, chainLast: [UInt8](repeating: 0x42, count: 32))
            $0.feedbackAddress = senderPeer
            $0.expectedReceivers = 1
        }
    }

    /// The first `count` SESSION records an authenticated sender sends (stepped every 10 ms,
    /// within the time given), and when the last came.
    static func signedRecords(_ bundle: SimulationBundle, count: Int, withinMicroseconds limit: UInt64) -> ([SessionRecord], Instant) {
        var sender = authenticatedSender(bundle)
        var records: [SessionRecord] = []
        var now = Instant.zero
        while records.count < count && now.microseconds < limit {
            sender.handleTimeout(at: now)
            while let t = sender.pollTransmit(at: now) { if case .session(let r)? = try? Datagram(parsing: t.bytes) { records.append(r) } }
            now = now + .milliseconds(10)
        }
        return (records, now)
    }

    static func requiring(_ bundle: SimulationBundle) -> Receiver {
        var c = receiverConfig(bundle)
        c.sessionAuthentication = .required
        return Receiver(config: c)
    }

    @Test("A receiver that requires authenticated sessions completes a signed session; a keyless sender gets no offer from it")
    func signedSessionCompletes() async throws {
        let bundle = try await BundleCache.shared.bundle(300_000)
        var sender = Self.authenticatedSender(bundle)
        var receiver = Self.requiring(bundle)
        CoreUnitTests.runLink(&sender, &receiver)
        #expect(receiver.isComplete && sender.isFinished && sender.stats.closes[.allDone] == 1)
        #expect(receiver.stats.sessionRecords > 0 && receiver.stats.drops[.unauthenticatedControl] == 0)
        #expect(sender.stats.sessionRecords > 0)

        var keyless = makeSender(bundle)
        var strict = Self.requiring(bundle)
        for _ in 0..<20 { if let t = keyless.pollTransmit(at: .zero) { strict.handleDatagram(t.bytes, from: senderPeer, at: .zero) } }
        #expect(strict.pendingOffer == nil && strict.stats.drops[.unauthenticatedSession] >= 1)
    }

    /// Joins `receiver` to `sender`'s session through the first few hundred datagrams.
    static func join(_ sender: inout Sender, _ receiver: inout Receiver) -> Instant {
        var now = Instant.zero
        while receiver.session == nil && now.microseconds < 1_000_000 {
            sender.handleTimeout(at: now)
            while let t = sender.pollTransmit(at: now) { receiver.take(t.bytes, at: now) }
            now = now + Interval(microseconds: 500)
        }
        return now
    }

    @Test("Issue 15, attack 3 and P-13a: forged POLL and CLOSE in an authenticated session are dropped and keep nothing alive")
    func forgedControlIgnored() async throws {
        let bundle = try await BundleCache.shared.bundle(1_000_000)
        var sender = Self.authenticatedSender(bundle)
        var receiver = Self.requiring(bundle)
        var now = Self.join(&sender, &receiver)
        let session = try #require(receiver.session)
        // The sender falls silent; an attacker sends POLLs (new rounds) and a CLOSE, every 100 ms.
        let nacksBefore = receiver.nacksSent
        for i in 0..<100 {
            let forgedPoll = Datagram.poll(Poll(session: session, round: UInt32(1 + i), sentAtMicroseconds: 1, grttMicroseconds: 100, groupSize: 1,
                                                chainValue: [UInt8](repeating: UInt8(i), count: 32))).encoded()
            let forgedClose = Datagram.close(Close(session: session, reason: .aborted, round: UInt32(1 + i), chainValue: [UInt8](repeating: 9, count: 32))).encoded()
            receiver.handleDatagram(forgedPoll, from: .benchmark(66), at: now)
            receiver.handleDatagram(forgedClose, from: .benchmark(66), at: now)
            receiver.handleTimeout(at: now)
            while receiver.pollTransmit() != nil {}
            while receiver.pollAction() != nil {}
            now = now + .milliseconds(100)
        }
        #expect(receiver.stats.drops[.unauthenticatedControl] >= 200)
        #expect(receiver.nacksSent == nacksBefore, "no forged POLL started a round")
        // Forged control kept nothing alive: after its inactivity timeout the session ended
        // as timed out (the sender's silence), not closed (the forged CLOSE).
        #expect(receiver.isFailed, "the session should have timed out")
    }

    @Test("Issue 15, attack 3: the genuine envelope replayed under a fake session with forged POLLs captures no receiver that requires authentication")
    func captureRefused() async throws {
        let bundle = try await BundleCache.shared.bundle(300_000)
        let fake = SessionID(0xFA4E)
        let reflector = PeerAddress.benchmark(200)
        let tree = EnvelopeTree.fragments(of: bundle.envelope)
        let announces = tree.fragments.map { f in
            Datagram.announce(Announce(session: fake, feedbackFamily: .ipv4, feedbackPort: reflector.port, feedbackAddress: reflector.addressBytes + [UInt8](repeating: 0, count: 12),
                                       rateKilobytesPerSecond: 1000, grttMicroseconds: 10_000, groupSize: 1, interleaveWindow: 8,
                                       fragmentIndex: f.index, fragmentCount: f.count, envelopeLength: UInt32(bundle.envelope.count),
                                       root: tree.root, path: f.path, fragment: f.bytes)).encoded()
        }
        let poll = Datagram.poll(Poll(session: fake, round: 1, sentAtMicroseconds: 1, grttMicroseconds: 100, groupSize: 1)).encoded()
        func attack(_ receiver: inout Receiver) -> [Transmit] {
            var sent: [Transmit] = []
            for i in 0..<10 {
                let now = Instant(microseconds: UInt64(i) * 300_000)
                for a in announces + [poll] { receiver.take(a, at: now) }
                receiver.handleTimeout(at: now)
                while let t = receiver.pollTransmit() { sent.append(t) }
            }
            return sent
        }
        var strict = Self.requiring(bundle)
        let strictSent = attack(&strict)
        #expect(strict.session == nil && strictSent.isEmpty, "sent \(strictSent.count) datagrams")
        #expect(strict.stats.drops[.unauthenticatedSession] >= 1)
        // The same against a receiver that takes unauthenticated sessions: it is captured,
        // and its feedback goes where the unsigned announce said (what P-31 prevents).
        var lax = Receiver(config: receiverConfig(bundle))
        let laxSent = attack(&lax)
        #expect(lax.session == fake && laxSent.contains { $0.destination == .peer(reflector) })
    }

    @Test("SESSION records: an untrusted delegation, a tampered field, a key other than the delegated one are refused; an older record is stale")
    func recordForgeries() async throws {
        let bundle = try await BundleCache.shared.bundle(300_000)
        let (records, now) = Self.signedRecords(bundle, count: 2, withinMicroseconds: 3_000_000)
        #expect(records.count >= 2)
        var receiver = Self.requiring(bundle)
        func feed(_ r: SessionRecord) { receiver.handleDatagram(Datagram.session(r).encoded(), from: .benchmark(66), at: now) }
        // A delegation by a key the receiver does not trust.
        let stranger = try PrivateKey.generate(.ed25519)
        var untrusted = records[0]
        untrusted.delegation = try SenderDelegation.make(senderKey: Self.senderKey.publicKey, signer: stranger, notBefore: 0, expires: 86_400).encoded
        untrusted.signature = try Self.senderKey.sign(untrusted.signedBytes)
        feed(untrusted)
        // The genuine record with its feedback address changed.
        var tampered = records[0]
        tampered.feedbackPort &+= 1
        feed(tampered)
        // Signed by another key than the one delegated.
        var otherKey = records[0]
        otherKey.signature = try stranger.sign(otherKey.signedBytes)
        feed(otherKey)
        #expect(receiver.stats.drops[.sessionRecordInvalid] == 3 && receiver.stats.sessionRecords == 0)
        feed(records[1])
        feed(records[0])
        #expect(receiver.stats.sessionRecords == 1 && receiver.stats.drops[.sessionRecordStale] == 1)
    }

    @Test("P-31: an ANNOUNCE naming another feedback address does not move an authenticated session's feedback")
    func feedbackFromRecord() async throws {
        let bundle = try await BundleCache.shared.bundle(300_000)
        var sender = Self.authenticatedSender(bundle)
        var receiver = Self.requiring(bundle)
        var now = Instant.zero
        var registers: [Transmit] = []
        let elsewhere = PeerAddress.benchmark(201)
        while receiver.session == nil && now.microseconds < 1_000_000 {
            sender.handleTimeout(at: now)
            while let t = sender.pollTransmit(at: now) {
                var bytes = t.bytes
                // Rewrite every ANNOUNCE's feedback address (as a forger on the path would).
                if case .announce(var a)? = try? Datagram(parsing: bytes) {
                    a.feedbackFamily = .ipv4; a.feedbackPort = elsewhere.port
                    a.feedbackAddress = elsewhere.addressBytes + [UInt8](repeating: 0, count: 12)
                    bytes = Datagram.announce(a).encoded()
                }
                receiver.take(bytes, at: now)
            }
            while let t = receiver.pollTransmit() { registers.append(t) }
            now = now + Interval(microseconds: 500)
        }
        #expect(receiver.session != nil && !registers.isEmpty)
        #expect(registers.allSatisfy { $0.destination == .peer(senderPeer) }, "\(registers.map(\.destination))")
    }

    @Test("P-31: each POLL chain value hashes to the one before it, down to the anchor")
    func pollChain() {
        let last = [UInt8](repeating: 0x42, count: 32)
        let chain = PollChain.values(length: 1000, last: last)
        #expect(chain[1000] == last)
        for r in [1, 2, 500, 999, 1000] { #expect(PollChain.step(chain[r]) == chain[r - 1], "round \(r)") }
        #expect(PollChain.leads(chain[1000], steps: 1000, to: chain[0]))
    }

    @Test("P-31a: once a session's record is verified, forged later records cost no signature check, and a genuine later one needs none")
    func laterRecordsUnchecked() async throws {
        let bundle = try await BundleCache.shared.bundle(300_000)
        let (records, now) = Self.signedRecords(bundle, count: 3, withinMicroseconds: 5_000_000)
        #expect(records.count >= 3)
        var receiver = Self.requiring(bundle)
        func feed(_ r: SessionRecord) { receiver.handleDatagram(Datagram.session(r).encoded(), from: .benchmark(66), at: now) }
        feed(records[0])
        let checks = receiver.stats.signatureChecks
        #expect(receiver.stats.sessionRecords == 1 && checks == 2, "the delegation and the record")
        for i in 0..<100 {
            var forged = records[0]
            forged.number = 1000 + UInt32(i)
            switch i % 3 {
            case 0: forged.chainRound += 1; forged.chainValue = [UInt8](repeating: UInt8(i), count: 32)  // a made-up newer chain value
            case 1: forged.feedbackPort &+= 1                                                             // feedback elsewhere
            default: forged.envelopeRoot = [UInt8](repeating: 1, count: 32)                                // another envelope
            }
            feed(forged)
        }
        #expect(receiver.stats.signatureChecks == checks, "forged later records cost no check")
        #expect(receiver.stats.drops[.sessionRecordInvalid] == 100)
        feed(records[2])
        #expect(receiver.stats.sessionRecords == 2 && receiver.stats.signatureChecks == checks, "a genuine later record needs no check")
    }
}

