import AgentSimulation
import DeviceAgent
import Testing

@Suite("Specs/agent.md §8: the model check of the slot state machine, power cuts at every step")
struct ModelCheckTests {
    @Test("Every reachable state, four releases offered in any order, unbounded power cuts: I1-I5 hold",
          arguments: [(UInt8(1), true), (UInt8(2), true), (UInt8(3), true), (UInt8(2), false)])
    func exhaustive(trialAttempts: UInt8, automatic: Bool) {
        var checker = SlotModelChecker()
        checker.trialAttempts = trialAttempts
        checker.activatesAutomatically = automatic
        let report = checker.check()
        print(report)
        #expect(report.violations.isEmpty, "\(report)")
        #expect(report.states > 1000 && report.crashTransitions > 0)
    }

    /// Found by the model check (its first run: I4 violated from 241 states): a rollback
    /// whose reboot command failed left the agent idle on the side it had left, and the
    /// next offer was written into that side, the one running.
    @Test("A rollback whose reboot fails: no update is written to the running side, and the reboot is tried again (Specs/agent.md A-5b)")
    func rollbackRebootFails() {
        let old = Release(bundleID: [0], version: "1", sequence: 1)
        let new = Release(bundleID: [1], version: "2", sequence: 2)
        var record = AgentRecord(deviceID: "t", installed: old, installedSide: .a)
        record.pending = .init(release: new, side: .b, phase: .trial)
        var boot = BootState.initial(current: .a)
        boot[.b] = .init(bootable: true, confirmed: false, attempts: 2)
        boot.order = [.b, .a]
        var m = SlotMachine(record: record, boot: boot, booted: .b, trialAttempts: 3, activatesAutomatically: true)
        #expect(m.start() == [.runHealthCheck])
        #expect(m.healthChecked(healthy: false, reason: "sick").last == .reboot)
        // The reboot command fails: the update is rolled back already, nothing to undo...
        #expect(m.rebootFailed(reason: "exit 1") == [])
        // ... and the device runs side B, which is the spare.
        #expect(m.booted == .b && m.spare == .b && m.record.pending == nil)
        #expect(!m.canInstall, "an offer now would be written into the running side")
        #expect(m.needsReboot && m.retryReboot() == [.reboot])
    }

    @Test("The model check catches an install taken as verified without its read-back (I2)")
    func catchesMissingReadBack() {
        var checker = SlotModelChecker()
        checker.releases = [.healthy]
        checker.trustsWritesWithoutReadBack = true
        let report = checker.check()
        #expect(report.violations.contains { $0.hasPrefix("I2") }, "\(report)")
    }

    @Test("The model check catches an offer policy that forgets rolled-back releases (I5)")
    func catchesReinstall() {
        var checker = SlotModelChecker()
        checker.releases = [.unhealthy]
        checker.forgetsRolledBack = true
        let report = checker.check()
        #expect(report.violations.contains { $0.hasPrefix("I5") }, "\(report)")
    }
}
