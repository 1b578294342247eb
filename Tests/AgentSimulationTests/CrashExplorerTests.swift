import AgentSimulation
import DeviceAgent
import Testing

@Suite("Specs/agent.md: every crash point of an install, activation, confirm and rollback")
struct CrashExplorerTests {
    @Test("A power cut at every operation (and a second one during each recovery): I1-I5 hold, for each boot backend",
          arguments: CrashExplorer.Backend.allCases)
    func everyCrashPoint(backend: CrashExplorer.Backend) {
        // The first cut every way; the second, during the recovery, losing unsynced data (the
        // debug build's time: `fleetcast agent explore` runs the second every way too).
        var explorer = CrashExplorer()
        explorer.backend = backend
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

    @Test("The grub model can fail: writing the live grubenv in place, as grub-editenv does when run on it, loses the boot state at a cut")
    func catchesInPlaceGrubWrite() {
        var explorer = CrashExplorer()
        explorer.backend = .grub
        explorer.depth = 1
        explorer.grubWritesInPlace = true
        let report = explorer.explore()
        #expect(report.violations.contains { $0.contains("I1") }, "\(report)")
    }
}
