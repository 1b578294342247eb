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

    @Test("Each bootloader model can fail: grub-editenv run on the live grubenv (its truncate, then a cut), a uboot environment without its redundant copy (a torn rewrite): the boot state is lost (I1)",
          arguments: [CrashExplorer.Backend.grub, .uboot])
    func catchesBrokenBackend(backend: CrashExplorer.Backend) {
        var explorer = CrashExplorer()
        explorer.backend = backend
        explorer.depth = 1
        explorer.grubWritesInPlace = backend == .grub
        explorer.ubootSingleCopy = backend == .uboot
        let report = explorer.explore()
        #expect(report.violations.contains { $0.contains("I1") }, "\(report)")
    }
}
