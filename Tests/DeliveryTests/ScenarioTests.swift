import DeliveryCore
import DeliverySimulation
import Foundation
import Testing
import UpdateBundle
import WireFormat

/// Bundles are packed once per size and profile and shared by the tests.
actor BundleCache {
    static let shared = BundleCache()
    private var bundles: [String: SimulationBundle] = [:]
    func bundle(_ size: Int, profile: TransportProfile = Scenario.compactProfile, blocksPerSegment: Int? = nil) throws -> SimulationBundle {
        let key = "\(size) \(profile) \(blocksPerSegment ?? 0)"
        if let b = bundles[key] { return b }
        let b = try SimulationBundle.make(payloadBytes: size, seed: 1, profile: profile, blocksPerSegment: blocksPerSegment)
        bundles[key] = b
        return b
    }
}

/// Runs a catalog scenario; a failure prints the seed and the replay command.
@discardableResult
func run(_ name: String, seed: UInt64, old: [[UInt8]] = []) async throws -> SimulationResult {
    let scenario = try #require(ScenarioCatalog.scenario(named: name, seed: seed))
    let bundle = try await BundleCache.shared.bundle(scenario.payloadBytes, profile: scenario.profile)
    let result = Simulation(scenario: scenario, bundle: bundle, oldSession: old).run()
    #expect(result.violations.isEmpty, "\(result)")
    return result
}

@Suite("Delivery scenarios (Specs/protocol.md), deterministic")
struct ScenarioTests {
    @Test("16 receivers at 0, 1, 5, 10, 20, 30% loss all complete within 1.6x the minimum wire bytes", arguments: [0, 1, 5, 10, 20, 30])
    func lossSweep(percent: Int) async throws {
        let r = try await run("loss-\(percent)-16", seed: 11)
        #expect(r.completed.allSatisfy { $0 })
    }

    @Test("1, 16, 256 and 1000 receivers at 5% loss", arguments: [1, 16, 256, 1000])
    func scale(receivers: Int) async throws {
        let r = try await run("loss-5-\(receivers)", seed: 12)
        #expect(r.completed.filter { $0 }.count == receivers)
        // Wire bytes do not grow with the fleet beyond the repair its losses need.
        #expect(r.wireRatio < 1.6, "\(r)")
    }

    @Test("Specs/bundle.md §7.4: the default profile's 200-symbol blocks need fewer wire bytes than 64-symbol ones at 16 receivers, 5% loss")
    func defaultProfileWireBytes() async throws {
        // Each block must be repaired up to its worst receiver's loss; over more symbols
        // per block that maximum comes closer to the mean. Both bundles carry 12 MB (43 and 134 blocks).
        var ratios: [Double] = []
        for profile in [Scenario.compactProfile, TransportProfile.default] {
            var s = try #require(ScenarioCatalog.scenario(named: "loss-5-16", seed: 23))
            s.payloadBytes = 12_000_000
            s.profile = profile
            let r = Simulation(scenario: s, bundle: try await BundleCache.shared.bundle(s.payloadBytes, profile: profile)).run()
            #expect(r.violations.isEmpty && r.completed.allSatisfy { $0 }, "\(r)")
            ratios.append(r.wireRatio)
        }
        // Data datagrams with IPv4 and UDP headers, per payload byte; 1.10 / 0.95 = 1.158 is
        // the issue's bound counting Ethernet frames (14 bytes more per 1,444-byte datagram).
        #expect(ratios[1] < ratios[0] - 0.02, "wire/payload: k=64 \(ratios[0]), k=200 \(ratios[1]) (seed 23)")
        #expect(ratios[1] * 1458 / 1444 < 1.10 / 0.95, "wire/payload with k=200: \(ratios[1]) (seed 23)")
    }

    @Test("P-19a: NACK epochs repair a long first pass as it goes, not after its POLL")
    func nackEpochs() async throws {
        var base = try #require(ScenarioCatalog.scenario(named: "loss-5-4", seed: 19))
        base.payloadBytes = 12_000_000  // 134 blocks: a pass long enough to spend a round's NACK budget early
        let bundle = try await BundleCache.shared.bundle(base.payloadBytes)
        var single = base
        single.nackEpochBlocks = 100_000  // one epoch: the budget of the whole pass is spent early
        var epochs = base
        epochs.nackEpochBlocks = 16
        let without = Simulation(scenario: single, bundle: bundle).run()
        let with = Simulation(scenario: epochs, bundle: bundle).run()
        for r in [without, with] {
            #expect(r.violations.isEmpty && r.completed.allSatisfy { $0 }, "\(r)")
        }
        #expect(without.senderStats.nackEpochs == 0)
        #expect(with.senderStats.nackEpochs > 0)
        // The share of all repair that was asked for during the first pass, before the POLL.
        let firstPassShare = { (r: SimulationResult) -> Double in
            let all = r.senderStats.repairQueuedFirstPass + r.senderStats.repairQueuedInRounds
            return Double(r.senderStats.repairQueuedFirstPass) / Double(max(all, 1))
        }
        #expect(firstPassShare(with) > 0.8 && firstPassShare(with) > firstPassShare(without),
                "first-pass share of repair: \(firstPassShare(with)) with epochs, \(firstPassShare(without)) without (seed 19)")
    }

    @Test("P-18a: a promise whose closing repair was lost lapses, so the block is asked for again in the next epoch, not after the POLL")
    func promiseLapse() async throws {
        var base = try #require(ScenarioCatalog.scenario(named: "loss-5-4", seed: 29))
        base.payloadBytes = 12_000_000  // 134 blocks, epochs of 16
        base.nackEpochBlocks = 16
        base.dropsClosingRepair = true
        let bundle = try await BundleCache.shared.bundle(base.payloadBytes)
        var forever = base
        forever.repairPromiseLifetimeGRTTs = 1e6  // the promise never lapses: the old behaviour
        let without = Simulation(scenario: forever, bundle: bundle).run()
        let with = Simulation(scenario: base, bundle: bundle).run()
        for r in [without, with] {
            #expect(r.violations.isEmpty && r.completed.allSatisfy { $0 }, "\(r)")
        }
        // Blocks short of their closing symbol, re-asked for in the first pass or left for the POLL.
        let afterPoll = { (r: SimulationResult) -> UInt64 in r.senderStats.repairQueuedInRounds }
        #expect(afterPoll(with) * 2 < afterPoll(without),
                "repair symbols queued after the POLL: \(afterPoll(with)) with the lapse, \(afterPoll(without)) without (seed 29)")
    }

    @Test("Burst loss (Gilbert-Elliott) across 16 receivers")
    func bursts() async throws {
        try await run("burst-16", seed: 13)
    }

    @Test("One receiver at 50% loss does not hold back the healthy ones")
    func oneBadReceiver() async throws {
        let healthy = try await run("healthy-16", seed: 14)
        let mixed = try await run("one-bad-16", seed: 14)
        let baseline = healthy.completionTimes.compactMap { $0?.seconds }.max()!
        let others = mixed.completionTimes.dropLast().compactMap { $0?.seconds }.max()!
        // Stated bound: the healthy receivers finish within 1.5x their time without it, plus 5 ms.
        #expect(others <= baseline * 1.5 + 0.005, "healthy \(baseline) s vs with a 50% receiver \(others) s (seed 14)")
        #expect(mixed.completed.last == true, "the 50% receiver completes too")
    }

    @Test("A receiver that joins late completes")
    func lateJoin() async throws {
        let r = try await run("late-join", seed: 15)
        #expect(r.completed.last == true)
    }

    @Test("P-12, P-21: a receiver unheard for 4.5 s (its ARP replies lost) is waited for, completes and is counted done, forged CLOSEs notwithstanding")
    func unheardReceiver() async throws {
        var s = try #require(ScenarioCatalog.scenario(named: "loss-5-8", seed: 31))
        s.receivers[6].feedbackLostUntil = .milliseconds(4500)
        // Receiver 7 too, but it loses nothing, so it completes unheard in the first pass and
        // repeats its STATUS while forged CLOSEs (one forgery in ten, P-13a) arrive.
        s.receivers[7].feedbackLostUntil = .milliseconds(4500)
        s.receivers[7].downlink = LinkModel()
        s.forgedDataPerSecond = 200
        s.wireFactorMax = 2.8  // what it missed in the first pass is sent again for it alone
        let bundle = try await BundleCache.shared.bundle(s.payloadBytes)
        let r = Simulation(scenario: s, bundle: bundle).run()
        #expect(r.violations.isEmpty && r.completed.allSatisfy { $0 }, "\(r)")
        // The wait that P-12 had before (receiverSilenceMax, 3 s) gives up on it.
        var short = s
        short.expectedReceiverWaitMax = .seconds(3)
        let before = Simulation(scenario: short, bundle: bundle).run()
        #expect(before.violations.contains { $0.hasPrefix("receiver 6 ") } && before.violations.contains { $0.hasPrefix("receiver 7 ") }, "\(before)")
    }

    @Test("A receiver that loses power twice resumes without re-fetching journalled blocks")
    func restart() async throws {
        let r = try await run("restart", seed: 16)
        #expect(r.restarts == 2)
        #expect(r.completed.allSatisfy { $0 })
    }

    @Test("Two blocks in memory, the rest spilled: every receiver completes with the right bytes (P-5a)")
    func spill() async throws {
        let r = try await run("spill", seed: 21)
        #expect(r.completed.allSatisfy { $0 })
        #expect(r.receiverStats.repairedPayloadBlocks > 0, "cold blocks were decoded from spilled symbols")
        #expect(r.receiverStats.blocksSpilled > 0, "blocks went cold: the spill path ran")
    }

    @Test("P-5c: with room for one segment, verified segments leave memory and are read back and rechecked; every receiver completes with the right bytes")
    func segmentEviction() async throws {
        // 34 blocks in segments of 2: 17 segments (one 90 KB chain block each, 4.7 KB of it used); the budget holds one.
        let link = LinkModel(loss: .bernoulli(0.1), corruptProbability: 0.002)
        var specs = Array(repeating: ReceiverSpec(downlink: link), count: 6)
        specs.append(ReceiverSpec(downlink: link, powerLossAt: [.milliseconds(30)]))
        var s = Scenario(name: "segment-eviction", seed: 33, receivers: specs)
        s.payloadBytes = 3_000_000
        s.blocksPerSegment = 2
        s.segmentBytesInMemoryMax = 100_000
        s.forgedDataPerSecond = 2000
        // Segments of 2 blocks fill a 90 KB chain block each (Specs/bundle.md §7.3: a span is
        // whole blocks): the chain is half the payload here, sent with full proactive repair.
        s.wireFactorMax = 1.6 + 1.2 + 1.0
        let bundle = try SimulationBundle.make(payloadBytes: s.payloadBytes, seed: 1, blocksPerSegment: 2)
        let r = Simulation(scenario: s, bundle: bundle).run()
        #expect(r.violations.isEmpty && r.completed.allSatisfy { $0 }, "\(r)")
        #expect(r.receiverStats.segmentsEvicted > 0 && r.receiverStats.segmentsReloaded > 0, "\(r.receiverStats)")
        #expect(r.receiverStats.segmentReloadFailures == 0)
        // Without the budget, nothing leaves.
        var all = s
        all.segmentBytesInMemoryMax = nil
        let kept = Simulation(scenario: all, bundle: bundle).run()
        #expect(kept.violations.isEmpty && kept.receiverStats.segmentsEvicted == 0, "\(kept)")
    }

    @Test("Forged, corrupted, duplicated and reordered datagrams: nothing wrong is accepted")
    func attack() async throws {
        let r = try await run("attack", seed: 17)
        #expect(r.receiverStats.drops[.badTag] > 0, "forged payload symbols are dropped on arrival")
        #expect(r.completed.allSatisfy { $0 })
    }

    /// Specs/bundle.md B-13a, issue 15's attack 7: a flood of forged auth-chain symbols
    /// against late joiners. Each forged symbol fails its chain tag on arrival; no segment
    /// fails its hash (the simulator's invariant), and the flood costs the joiners little
    /// time and the sender little wire compared with the same run without it. Format 1
    /// chains failed and re-requested segments here (the invariant fails on that code).
    @Test("B-13a: forged auth-chain symbols are dropped on arrival; no segment fails; time and wire near the clean run's")
    func forgedChainSymbols() async throws {
        let link = LinkModel(loss: .bernoulli(0.05))
        var specs = Array(repeating: ReceiverSpec(downlink: link), count: 3)
        for _ in 0..<3 { specs.append(ReceiverSpec(downlink: link, joinAt: .milliseconds(40))) }
        var clean = Scenario(name: "forged-chain", seed: 41, receivers: specs)
        clean.payloadBytes = 3_000_000
        clean.blocksPerSegment = 2
        clean.rateBytesPerSecond = 20_000_000
        clean.wireFactorMax = 2.8
        let bundle = try await BundleCache.shared.bundle(clean.payloadBytes, blocksPerSegment: 2)
        var attacked = clean
        attacked.forgedDataPerSecond = 3000
        attacked.forgedAuthFraction = 1.0
        let before = Simulation(scenario: clean, bundle: bundle).run()
        let after = Simulation(scenario: attacked, bundle: bundle).run()
        #expect(before.violations.isEmpty && before.completed.allSatisfy { $0 }, "\(before)")
        #expect(after.violations.isEmpty && after.completed.allSatisfy { $0 }, "\(after)")
        #expect(after.receiverStats.drops[.badTag] > 1000, "forged chain symbols fail their tags: \(after.receiverStats)")
        #expect(after.receiverStats.segmentFailures == 0)
        #expect(after.duration.seconds <= 1.5 * before.duration.seconds, "\(after.duration) against \(before.duration) clean")
        #expect(Double(after.dataWireBytes) <= 1.2 * Double(before.dataWireBytes), "\(after.dataWireBytes) against \(before.dataWireBytes) clean")
    }

    @Test("Specs/protocol.md P-31b: forged DATA, POLL and CLOSE against a signed session every receiver requires: all dropped, every receiver completes within the bounds")
    func attackAuthenticated() async throws {
        let r = try await run("signed-attack", seed: 17)
        #expect(r.receiverStats.drops[.badTag] > 0, "forged payload symbols are dropped on arrival")
        #expect(r.receiverStats.drops[.unauthenticatedControl] > 0, "forged POLLs and CLOSEs are dropped")
        #expect(r.receiverStats.sessionRecords > 0)
        #expect(r.completed.allSatisfy { $0 })
    }

    @Test("A replayed older session (validly signed, rolled back) is refused; the real one completes")
    func replay() async throws {
        let old = try ScenarioCatalog.recordedOldSession()
        let r = try await run("replay", seed: 18, old: old)
        #expect(r.receiverStats.offersDeclined[.rollback] > 0)
        #expect(r.completed.allSatisfy { $0 })
    }

    @Test("Carousel: no feedback at all, every receiver completes by the deadline")
    func carousel() async throws {
        let r = try await run("carousel", seed: 19)
        #expect(r.feedbackWireBytes == 0)
        #expect(r.completed.allSatisfy { $0 })
    }

    @Test("Seeded sweep over random fault mixes", arguments: [0, 1, 2, 3])
    func sweep(shard: Int) async throws {
        // 4 shards x 40 seeds in CI; `fleetcast simulate --scenario sweep --count 5000` is the long sweep.
        var failures: [String] = []
        for seed in UInt64(1000 + shard * 40)..<UInt64(1000 + (shard + 1) * 40) {
            let scenario = ScenarioCatalog.sweep(seed: seed)
            let result = Simulation(scenario: scenario, bundle: try await BundleCache.shared.bundle(scenario.payloadBytes, profile: scenario.profile,
                                                                                                 blocksPerSegment: scenario.blocksPerSegment)).run()
            if !result.violations.isEmpty { failures.append(result.description) }
        }
        #expect(failures.isEmpty, "\(failures.count) failing seeds:\n\(failures.joined(separator: "\n"))")
    }

    @Test("A run is a pure function of its seed")
    func determinism() async throws {
        let a = try await run("attack", seed: 21)
        let b = try await run("attack", seed: 21)
        #expect(a.dataWireBytes == b.dataWireBytes && a.feedbackWireBytes == b.feedbackWireBytes)
        #expect(a.completionTimes.map { $0?.microseconds } == b.completionTimes.map { $0?.microseconds })
        #expect(a.receiverStats == b.receiverStats && a.traceDigest == b.traceDigest)
    }
}
