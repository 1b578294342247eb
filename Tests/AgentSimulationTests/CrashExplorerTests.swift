import AgentSimulation
import DeviceAgent
import Testing

@Suite("Specs/agent.md: every crash point of an install, activation, confirm and rollback")
struct CrashExplorerTests {
    @Test("A power cut at every operation (and a second one during each recovery): I1-I5 hold")
    func everyCrashPoint() {
        // The first cut every way; the second, during the recovery, losing unsynced data (the
        // debug build's time: `fleetcast agent explore` runs the second every way too).
        var explorer = CrashExplorer()
        explorer.secondCutModes = [.loseVolatile]
        let report = explorer.explore()
        print(report)
        #expect(report.violations.count == 0, "\(report)")
        #expect(report.singleCuts > 0 && report.doubleCuts > 0)
    }

    @Test("The explorer catches an install that marks a side bootable without making its image durable")
    func catchesMissingSync() {
        var explorer = CrashExplorer()
        explorer.depth = 1
        explorer.skipsSlotSync = true
        let report = explorer.explore()
        #expect(report.violations.contains { $0.contains("I2") }, "\(report)")
    }
}
