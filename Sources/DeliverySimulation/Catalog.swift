import DeliveryCore
import SeededRandom
import UpdateBundle
import WireFormat

/// Named scenarios, each a pure function of (name, seed), so that any failing
/// run is replayed by `fleetcast simulate --scenario NAME --seed N`.
///
/// Names: `loss-P-N` (N receivers, independent P% loss), `burst-N`,
/// `one-bad-N` (one receiver at 50% among N-1 healthy), `healthy-N` (the same
/// fleet without it), `late-join`, `restart`, `attack`, `signed-attack` (the same against a
/// signed session every receiver requires), `replay`, `carousel`,
/// `spill` (two blocks in memory, the rest spilled), `sweep` (a random fault mix drawn from the seed).
public enum ScenarioCatalog {
    public static let names = ["loss-P-N", "burst-N", "one-bad-N", "healthy-N", "late-join", "restart", "attack", "signed-attack", "replay", "carousel",
                               "spill", "sweep"]

    public static func scenario(named name: String, seed: UInt64) -> Scenario? {
        let parts = name.split(separator: "-").map(String.init)
        func receivers(_ n: Int, _ link: LinkModel) -> [ReceiverSpec] { Array(repeating: ReceiverSpec(downlink: link), count: n) }
        switch parts.first {
        case "loss" where parts.count == 3:
            guard let p = Double(parts[1]), let n = Int(parts[2]), n >= 1, p >= 0, p < 100 else { return nil }
            var s = Scenario(name: name, seed: seed, receivers: receivers(n, LinkModel(loss: .bernoulli(p / 100))))
            s.payloadBytes = n >= 512 ? 100_000 : 300_000
            return s
        case "burst" where parts.count == 2:
            guard let n = Int(parts[1]), n >= 1 else { return nil }
            // Mean burst 5 datagrams at 80% loss; long-run loss about 5%.
            let link = LinkModel(loss: .gilbertElliott(enterBad: 0.012, leaveBad: 0.2, lossGood: 0.005, lossBad: 0.8))
            var s = Scenario(name: name, seed: seed, receivers: receivers(n, link))
            s.payloadBytes = n >= 128 ? 1_500_000 : 600_000
            // Per block the sender must serve the receiver whose burst hit that block worst:
            // across many receivers that exceeds the worst receiver's average loss.
            s.wireFactorMax = n >= 128 ? 2.0 : 1.6
            return s
        case "one", "healthy":
            guard let n = Int(parts.last!), n >= 2 else { return nil }
            var specs = receivers(n - 1, LinkModel(loss: .bernoulli(0.02)))
            if parts.first == "one" { specs.append(ReceiverSpec(downlink: LinkModel(loss: .bernoulli(0.5)))) }
            var s = Scenario(name: name, seed: seed, receivers: specs)
            s.wireFactorMax = 2.0  // the minimum is set by the 50% receiver; small objects round up
            return s
        case "late":
            var specs = receivers(7, LinkModel(loss: .bernoulli(0.05)))
            specs.append(ReceiverSpec(downlink: LinkModel(loss: .bernoulli(0.05)), joinAt: .milliseconds(4)))
            var s = Scenario(name: name, seed: seed, receivers: specs)
            s.wireFactorMax = 1.6 + 1.2  // the late receiver needs what it missed once more
            return s
        case "restart":
            var specs = receivers(3, LinkModel(loss: .bernoulli(0.05)))
            specs.append(ReceiverSpec(downlink: LinkModel(loss: .bernoulli(0.05)), powerLossAt: [.milliseconds(3), .milliseconds(60)]))
            var s = Scenario(name: name, seed: seed, receivers: specs)
            s.payloadBytes = 600_000
            s.rateBytesPerSecond = 20_000_000
            s.wireFactorMax = 1.6 + 2 * 1.2  // up to one more copy per power cut
            return s
        case "attack":
            let link = LinkModel(loss: .bernoulli(0.03), jitter: .milliseconds(1), duplicateProbability: 0.05, corruptProbability: 0.01)
            var s = Scenario(name: name, seed: seed, receivers: receivers(8, link))
            s.forgedDataPerSecond = 3000
            s.forgedAuthFraction = 0.1
            return s
        case "replay":
            var s = Scenario(name: name, seed: seed, receivers: receivers(8, LinkModel(loss: .bernoulli(0.02))))
            s.replayOldSession = true
            return s
        case "signed" where parts == ["signed", "attack"]:
            // The "attack" mix against a signed session: forged DATA, POLL and CLOSE (P-31b).
            let link = LinkModel(loss: .bernoulli(0.03), jitter: .milliseconds(1), duplicateProbability: 0.05, corruptProbability: 0.01)
            var s = Scenario(name: name, seed: seed, receivers: receivers(8, link))
            s.forgedDataPerSecond = 3000
            s.forgedAuthFraction = 0.1
            s.authenticated = true
            return s
        case "carousel":
            var s = Scenario(name: name, seed: seed, receivers: receivers(8, LinkModel(loss: .bernoulli(0.1))))
            s.carousel = true
            s.deadline = .seconds(1)
            s.rateBytesPerSecond = 5_000_000
            return s
        case "spill":
            // Specs/protocol.md P-5a: two blocks in memory, the rest cold in the spill, under loss,
            // corruption and a power cut.
            let link = LinkModel(loss: .bernoulli(0.1), corruptProbability: 0.002)
            var specs = receivers(7, link)
            specs.append(ReceiverSpec(downlink: link, powerLossAt: [.milliseconds(20)]))
            var s = Scenario(name: name, seed: seed, receivers: specs)
            s.payloadBytes = 1_500_000
            s.blocksInMemoryMax = 2
            s.wireFactorMax = 1.6 + 1.2
            return s
        case "sweep":
            return sweep(seed: seed)
        default:
            return nil
        }
    }

    /// A random fault mix: receiver count, payload size, per-link loss model,
    /// jitter, duplication, corruption, late joins, power cuts, forgery.
    public static func sweep(seed: UInt64) -> Scenario {
        var rng = SeededRandom(seed: seed ^ 0x5EED_5EED)
        let n = 1 + Int(rng.next() % 24)
        var specs: [ReceiverSpec] = []
        var extraCopies = 0.0
        for _ in 0..<n {
            var link = LinkModel()
            switch rng.next() % 4 {
            case 0: link.loss = .none
            case 1, 2: link.loss = .bernoulli(rng.unit() * 0.3)
            default: link.loss = .gilbertElliott(enterBad: 0.005 + rng.unit() * 0.02, leaveBad: 0.1 + rng.unit() * 0.3,
                                                 lossGood: rng.unit() * 0.02, lossBad: 0.5 + rng.unit() * 0.5)
            }
            link.delay = Interval(microseconds: 100 + rng.next() % 900)
            if rng.next() % 3 == 0 { link.jitter = Interval(microseconds: rng.next() % 2000) }
            if rng.next() % 4 == 0 { link.duplicateProbability = rng.unit() * 0.05 }
            // Corruption that escapes the UDP checksum: rare on a real LAN, kept at up to 0.5% here.
            if rng.next() % 4 == 0 { link.corruptProbability = rng.unit() * 0.005 }
            var spec = ReceiverSpec(downlink: link)
            if rng.next() % 5 == 0 { spec.joinAt = Interval(microseconds: rng.next() % 20_000); extraCopies += 1 }
            if rng.next() % 8 == 0 { spec.powerLossAt = [Interval(microseconds: 1000 + rng.next() % 30_000)]; extraCopies += 1 }
            specs.append(spec)
        }
        var s = Scenario(name: "sweep", seed: seed, receivers: specs)
        s.payloadBytes = 30_000 + Int(rng.next() % 400_000)
        // Forged symbols, checked one by one on arrival: payload ones, and in half of these
        // runs a share of auth-chain ones (Specs/bundle.md B-13a).
        if rng.next() % 3 == 0 { s.forgedDataPerSecond = 500 + Double(rng.next() % 3000) }
        s.wireFactorMax = 1.6 + 1.2 * extraCopies
        // Bursts over small objects: a burst can take out most of a block at one receiver.
        if specs.contains(where: { if case .gilbertElliott = $0.downlink.loss { true } else { false } }) { s.wireFactorMax += 0.6 }
        // Half the runs keep only a few blocks in memory: the spill path (P-5a) under every fault.
        if rng.next() % 2 == 0 { s.blocksInMemoryMax = 1 + Int(rng.next() % 6) }
        // A third of the runs use the product's default profile (one or two 280 KB blocks
        // here), the rest the compact one (several blocks and windows).
        if rng.next() % 3 == 0 { s.profile = .default }
        // One run in eight has a receiver the sender cannot hear at first (its ARP replies
        // lost): it must still be waited for and counted done (P-12).
        if rng.next() % 8 == 0 {
            let unheard = Int(rng.next() % UInt64(n))
            s.receivers[unheard].feedbackLostUntil = Interval(microseconds: rng.next() % 4_000_000)
            s.wireFactorMax += 1.2
        }
        // One run in four cuts the chain into segments of 1-3 blocks and leaves room for
        // under 8 KB of them, so that verified segments leave memory and are read back (P-5c).
        if rng.next() % 4 == 0 {
            s.blocksPerSegment = 1 + Int(rng.next() % 3)
            s.segmentBytesInMemoryMax = Int(rng.next() % 8192)
        }
        // A third of the runs are authenticated sessions every receiver requires (P-31),
        // where the attacker, when there is one, also forges POLLs and CLOSEs.
        if rng.next() % 3 == 0 { s.authenticated = true }
        // Half the attacks aim a share at the auth chain, checked per symbol (B-13a).
        if s.forgedDataPerSecond > 0, rng.next() % 2 == 0 { s.forgedAuthFraction = 0.05 + 0.45 * rng.unit() }
        return s
    }

    /// The datagrams of an older session (an older bundle, validly signed by the
    /// same key), recorded for the replay attack.
    public static func recordedOldSession(count: Int = 64) throws -> [[UInt8]] {
        let old = try SimulationBundle.make(payloadBytes: 50_000, seed: 99, sequence: 5)
        var sender = Sender(config: SenderConfig(session: SessionID(0x01D5E55), rateBytesPerSecond: 1e9, cookieSecret: [UInt8](repeating: 0x5E, count: 32)), envelope: old.envelope, manifest: old.manifest,
                            source: InMemoryObjects(authChain: old.authChain, payload: old.payload))
        var out: [[UInt8]] = []
        var now = Instant.zero
        while out.count < count, !sender.isFinished {
            while let t = sender.pollTransmit(at: now), out.count < count { out.append(t.bytes) }
            now = now + Interval(microseconds: 100)
            sender.handleTimeout(at: now)
        }
        return out
    }
}
