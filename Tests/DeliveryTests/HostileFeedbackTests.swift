import DeliveryCore
import DeliverySimulation
import Testing
import WireFormat

/// Issue 15: feedback a LAN attacker can forge without any key, against the sender
/// core alone (Specs/protocol.md P-3a, P-11b, P-12b, P-13b). Each test failed on the
/// sender before these rules.
@Suite("Hostile feedback at the sender")
struct HostileFeedbackTests {
    static let session = SessionID(0xBEEF)

    static func nack(_ receiver: UInt64, echo: UInt64, block: UInt32, object: ObjectID = .payload) -> [UInt8] {
        Datagram.nack(Nack(session: session, receiver: ReceiverID(receiver), round: 1, echoedSentAtMicroseconds: echo, holdMicroseconds: 0,
                           entries: [.init(object: object, block: block, needed: 1)])).encoded()
    }

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
        // Forged: an echo of a time the sender never sent, arriving 900 ms "later".
        for i in 0..<64 {
            sender.handleDatagram(Self.nack(100 + UInt64(i), echo: UInt64(i + 1) * 7, block: 0), from: .benchmark(9),
                                  at: Instant(microseconds: poll.sentAtMicroseconds + 900_000))
        }
        #expect(sender.currentGRTT == start, "GRTT \(sender.currentGRTT.microseconds) µs after forged echoes")
        // Genuine, but 300 ms late (a forger replaying it late, or a backlogged host): at most twice the round's start.
        sender.handleDatagram(Self.nack(4, echo: poll.sentAtMicroseconds, block: 0), from: .benchmark(4),
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
        sender.handleDatagram(Self.nack(4, echo: 0, block: last), from: .benchmark(4), at: now)
        sender.handleDatagram(Self.nack(4, echo: 0, block: 0), from: .benchmark(4), at: now)  // the payload has not begun
        #expect(sender.stats.drops[.nackEntryNotSent] == 2)
        #expect(sender.stats.repairQueuedFirstPass == 0)
        // An auth-chain block of the window under way is served.
        sender.handleDatagram(Self.nack(4, echo: 0, block: 0, object: .authChain), from: .benchmark(4), at: now)
        #expect(sender.stats.repairQueuedFirstPass == 1)
    }

    @Test("P-3a: REGISTERs of 200 new receivers in a second add at most one announce per earlyAnnounceIntervalMin")
    func earlyAnnouncesBounded() async throws {
        let bundle = try await BundleCache.shared.bundle(1_000_000)
        func announces(registering: Int) -> UInt64 {
            var sender = makeSender(bundle, rate: 1_000_000)
            var now = Instant.zero
            for i in 0..<1000 {
                sender.handleTimeout(at: now)
                if i % 5 == 0 && i / 5 < registering {
                    sender.handleDatagram(Datagram.register(Register(session: Self.session, receiver: ReceiverID(UInt64(1000 + i)), installedSequence: 1,
                                                                     deviceID: "forged-\(i)", version: "1")).encoded(), from: .benchmark(9), at: now)
                }
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
        while !sender.isFinished && now < Instant.zero + limit + .seconds(60) {
            sender.handleTimeout(at: now)
            // A receiver that never finishes (or an attacker speaking for one) reports every second.
            sender.handleDatagram(Datagram.status(Status(session: Self.session, receiver: ReceiverID(4), state: .receiving, reason: .none,
                                                         blocksDone: 1, blocksTotal: 3, bytesReceived: 1, nacksSent: 0)).encoded(),
                                  from: .benchmark(4), at: now)
            while sender.pollTransmit(at: now) != nil {}
            now = now + .seconds(1)
        }
        #expect(sender.isFinished && sender.stats.closes[.deadline] == 1, "finished \(sender.isFinished) at \(now.microseconds) µs")
    }
}
