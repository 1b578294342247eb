import ArgumentParser
import DeliveryCore
import DeliverySimulation
import Foundation
import UpdateBundle

struct Simulate: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the delivery protocol in the deterministic network simulator.",
        discussion: """
        One seed decides every loss, delay, duplicate, corruption, forgery and power cut, so a \
        run replays exactly: a failing test prints the command that reproduces it. Scenarios:
        \(ScenarioCatalog.names.joined(separator: ", ")) (P = loss percent, N = receivers).

        Examples:
          fleetcast simulate --scenario loss-10-16 --seed 7
          fleetcast simulate --scenario sweep --seed 1 --count 500     # seeds 1...500

        FLEETCAST_SIM_TRACE=1 prints the event queue every 200,000 events and the \
        counters of the last receiver to complete (for runs that take long). \
        FLEETCAST_SIM_DUMP=1 prints every record that --digests hashes (each delivered \
        datagram and storage event, with its time and node), to find where two runs part.
        """
    )

    @Option(help: "Scenario name (see above).")
    var scenario: String = "loss-5-16"

    @Option(help: "Seed of the (first) run.")
    var seed: UInt64 = 1

    @Option(help: "Number of consecutive seeds to run.")
    var count: Int = 1

    @Flag(help: "Print protocol counters of each run.")
    var counters = false

    @Flag(help: "Print one line per run: the seed and a digest of everything it put on the wire and on disk, to check that a change of the code left behaviour exactly as it was.")
    var digests = false

    @Option(help: "Override the scenario's payload size in bytes.")
    var payloadBytes: Int?

    @Option(help: "Override the transport profile's source symbols per block (k).")
    var symbolsPerBlock: Int?

    @Option(help: "Override the transport profile's repair ceiling per block (R); k + R <= 256.")
    var repair: Int?

    @Flag(help: "Print the benchmark table: wire and NACK bytes per payload byte against receivers and loss (bench/RESULTS.md).")
    var table = false

    @Option(help: "Receiver counts for --table, comma-separated.")
    var tableReceivers: String = "1,16,256,1000"

    func run() throws {
        if table { return try printTable() }
        let old = scenario == "replay" ? try ScenarioCatalog.recordedOldSession() : []
        var failures = 0
        var bundles: [String: SimulationBundle] = [:]
        for seed in self.seed..<(self.seed + UInt64(max(count, 1))) {
            guard var s = ScenarioCatalog.scenario(named: scenario, seed: seed) else {
                throw ValidationError("unknown scenario '\(scenario)'; known: \(ScenarioCatalog.names.joined(separator: ", "))")
            }
            if let payloadBytes { s.payloadBytes = payloadBytes }
            s.profile = try profile(overriding: s.profile)
            let key = "\(s.payloadBytes) \(s.profile) \(s.blocksPerSegment ?? 0)"
            let bundle = try bundles[key] ?? SimulationBundle.make(payloadBytes: s.payloadBytes, seed: 1, profile: s.profile,
                                                                   blocksPerSegment: s.blocksPerSegment)
            bundles[key] = bundle
            let result = Simulation(scenario: s, bundle: bundle, oldSession: old).run()
            if digests { print("seed \(seed) \(result.traceDigest) \(String(format: "%.6f", result.duration.seconds)) s data \(result.dataWireBytes) feedback \(result.feedbackWireBytes)") }
            if (count == 1 && !digests) || !result.violations.isEmpty { print(result) }
            if counters { print("  sender:   \(result.senderStats)\n  receivers: \(result.receiverStats)") }
            if !result.violations.isEmpty { failures += 1 }
        }
        if count > 1 { print("\(count - failures) passed, \(failures) failed") }
        if failures > 0 { throw ExitCode.failure }
    }

    /// Wire bytes / payload and NACK bytes / payload for 1, 16, 256, 1000 receivers
    /// at 0-30% independent loss, next to the ideal 1 / (1 - p).
    private func printTable() throws {
        let size = payloadBytes ?? 2_000_000
        let profile = try profile(overriding: .default)
        let bundle = try SimulationBundle.make(payloadBytes: size, seed: 1, profile: profile)
        print("| receivers | loss | ideal 1/(1-p) | wire bytes / payload | wire / ideal | NACK bytes / payload | all feedback / payload | rounds | all complete |")
        print("|---|---|---|---|---|---|---|---|---|")
        for n in tableReceivers.split(separator: ",").compactMap({ Int($0) }) {
            for p in [0, 1, 5, 10, 20, 30] {
                var s = ScenarioCatalog.scenario(named: "loss-\(p)-\(n)", seed: seed)!
                s.payloadBytes = size
                s.profile = profile
                let r = Simulation(scenario: s, bundle: bundle).run()
                let ideal = 1 / (1 - Double(p) / 100)
                let rounds = r.senderStats.rounds
                print("| \(n) | \(p)% | \(f(ideal)) | \(f(r.wireRatio)) | \(f(r.wireRatio / ideal)) | \(f(r.nackRatio, 5)) | \(f(Double(r.feedbackWireBytes) / Double(r.payloadBytes), 4)) | \(rounds) | \(r.completed.allSatisfy { $0 } ? "yes" : "NO") |")
            }
        }
    }

    /// The scenario's profile with `--symbols-per-block` and `--repair` applied.
    private func profile(overriding base: TransportProfile) throws -> TransportProfile {
        do {
            return try TransportProfile(symbolSize: base.symbolSize,
                                        sourceSymbolsPerBlock: symbolsPerBlock ?? base.sourceSymbolsPerBlock,
                                        repairSymbolsPerBlock: repair ?? base.repairSymbolsPerBlock)
        } catch {
            throw ValidationError("--symbols-per-block/--repair: \(error)")
        }
    }

    private func f(_ x: Double, _ digits: Int = 3) -> String { String(format: "%.\(digits)f", x) }
}
