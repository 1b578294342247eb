import DeliveryCore
import DeliverySimulation
import Testing
import WireFormat

@Suite("Simulation smoke")
struct SmokeTests {
    @Test("Probe")
    func probe() throws {
        let bundle = try SimulationBundle.make(payloadBytes: 400_000, seed: 1)
        let s = Scenario(name: "16 @ 0", seed: 3, receivers: Array(repeating: ReceiverSpec(downlink: .init(loss: .bernoulli(0.3))), count: 16))
        let t0 = ContinuousClock.now
        let r = Simulation(scenario: s, bundle: bundle).run()
        print(r, "wall", ContinuousClock.now - t0)
        print("  ", r.senderCounters)
        print("  ", r.receiverCounters)
    }
}

@Suite("Sender unit")
struct SenderUnitProbe {
    @Test("announce repeats")
    func announces() throws {
        let bundle = try SimulationBundle.make(payloadBytes: 50_000, seed: 1)
        var c = SenderConfig(session: SessionID(5), rateBytesPerSecond: 1e7)
        c.announceInterval = .milliseconds(200)
        var s = Sender(config: c, envelope: bundle.envelope, manifest: bundle.manifest, source: InMemoryObjects(authChain: bundle.authChain, payload: bundle.payload))
        var now = Instant.zero
        var kinds: [String: Int] = [:]
        for _ in 0..<2000 {
            s.handleTimeout(at: now)
            while let t = s.pollTransmit(at: now) { kinds["\(t.bytes[1])", default: 0] += 1 }
            guard let next = s.nextDeadline(at: now) else { break }
            now = max(next, now + Interval(microseconds: 1))
            if now.microseconds > 2_000_000 { break }
        }
        print("kinds", kinds, "now", now, s.counters)
    }
}
