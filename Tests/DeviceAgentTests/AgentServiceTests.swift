import DeliveryCore
import DeviceAgent
import Foundation
import Testing
import UpdateBundle

/// Effects a test steers: a health check that answers at once, a reboot command
/// that fails a given number of times.
final class ScriptedEffects: AgentEffects {
    var healthy: Bool
    var rebootFailures: Int
    private(set) var rebootCalls = 0
    init(healthy: Bool, rebootFailures: Int) { self.healthy = healthy; self.rebootFailures = rebootFailures }
    func startHealthCheck(at now: Instant) {}
    func pollHealthCheck(at now: Instant) -> SlotDriver.HealthResult { healthy ? .healthy : .unhealthy("the service did not answer") }
    func runHook(_ hook: AgentHook, update: Release, side: Side) -> String? { nil }
    func reboot() -> String? {
        rebootCalls += 1
        guard rebootFailures > 0 else { return nil }
        rebootFailures -= 1
        return "exit 1"
    }
}

@Suite("The agent service around the slot machine (Specs/agent.md §7)")
struct AgentServiceTests {
    /// The model check's finding (Specs/agent.md A-5b), in the service: a rollback
    /// whose reboot command fails is not left there; the reboot is tried again every
    /// `rebootRetryInterval`, and no update is accepted meanwhile.
    @Test("A rollback whose reboot command fails retries the reboot every rebootRetryInterval (A-5b)")
    func rollbackRebootRetried() throws {
        let f = AgentFixture()
        let state = try SafeDirectory(path: f.scratch.file("state"), create: 0o700, requirePrivate: true)
        let bootDir = try SafeDirectory(path: f.scratch.file("boot"), create: 0o700, requirePrivate: true)
        let records = RecordStore(files: state)
        let boot = StateFileBootControl(files: bootDir)
        // On trial on side B, booted B: the state an activation leaves after its reboot.
        let old = Release(bundleID: [0], version: "1.0", sequence: 1), new = Release(bundleID: [1], version: "2.0", sequence: 2)
        var record = AgentRecord(deviceID: "dev-test", installed: old, installedSide: .a)
        record.pending = .init(release: new, side: .b, phase: .trial)
        try records.write(record)
        var b = BootState.initial(current: .a)
        b[.b] = .init(bootable: true, confirmed: false, attempts: 2)
        b.order = [.b, .a]
        try boot.write(b)
        for side in ["a", "b"] { FileManager.default.createFile(atPath: f.scratch.file("rootfs.\(side)"), contents: Data(count: 1 << 20)) }
        var settings = AgentSettings(slots: ["rootfs": SlotPair(a: f.scratch.file("rootfs.a"), b: f.scratch.file("rootfs.b"))], booted: .b, shipped: old)
        settings.rebootRetryInterval = .seconds(30)
        let effects = ScriptedEffects(healthy: false, rebootFailures: 2)
        let agent = try AgentService(settings: settings, receiver: f.configuration(output: nil), records: records, boot: boot,
                                     effects: effects, unixTime: { AgentFixture.createdAt })
        var now = Instant(microseconds: 1_000_000)
        agent.start(at: now)
        agent.handleTimeout(at: now)  // the health check answers: unhealthy, roll back, reboot (fails)
        #expect(effects.rebootCalls == 1)
        #expect(agent.driver.machine.record.pending == nil && agent.driver.machine.record.rolledBack == [[1]])
        #expect(!agent.driver.machine.canInstall && agent.driver.machine.needsReboot && !agent.driver.isRebooting)
        // Nothing before the interval; then a retry, which fails again; then one that starts.
        #expect(agent.nextDeadline.map { $0 <= now + .seconds(30) } == true)
        agent.handleTimeout(at: now + .seconds(29))
        #expect(effects.rebootCalls == 1)
        now = now + .seconds(30)
        agent.handleTimeout(at: now)
        #expect(effects.rebootCalls == 2 && !agent.driver.isRebooting)
        now = now + .seconds(30)
        agent.handleTimeout(at: now)
        #expect(effects.rebootCalls == 3 && agent.driver.isRebooting)
        // The boot state lets only side A boot: the rollback stands whatever happens next.
        let after = try boot.read()
        #expect(after[.b].bootable == false && after.confirmedSide == .a && BootLogic.boot(after)?.side == .a)
    }
}
