import DeliveryCore
import DeviceAgent
import FleetCrypto

/// The exhaustive crash exploration of an install, activation, confirm and
/// rollback (Specs/agent.md I1-I5), in the manner of MCUboot's simulator: the
/// whole update runs once to count its operations (every write, fsync, rename
/// and boot-state write, the bootloader's included); then, for every operation
/// and every way a power cut can treat unsynced data, it runs again with the
/// power cut there, restarts the device (bootloader, then agent) and runs it
/// to the end, checking the invariants after every operation. With `depth` 2
/// it also cuts the power at every operation of each recovery.
public struct CrashExplorer {
    /// How the new release behaves once booted.
    public enum Behaviour: CaseIterable, Sendable, CustomStringConvertible {
        /// The health check passes: the update is confirmed.
        case healthy
        /// The health check fails: the agent rolls back by itself.
        case unhealthy
        /// It never comes up (a kernel that panics): the bootloader falls back after its attempts.
        case neverComesUp
        /// Healthy, but the first reboot into it fails to start (the command fails): the
        /// activation is undone and reported failed (A-5a); the update is offered again.
        case rebootFailsOnce
        public var description: String {
            switch self {
            case .healthy: "healthy"
            case .unhealthy: "unhealthy"
            case .neverComesUp: "never comes up"
            case .rebootFailsOnce: "reboot fails once"
            }
        }
    }

    /// The boot-control backend the device runs, modelled operation for operation
    /// (Specs/agent.md §3.1, §3.3, §3.4), with the bootloader's own writes.
    public enum Backend: String, CaseIterable, Sendable {
        case statefile, grub, uboot
    }

    public struct Report: Sendable, CustomStringConvertible {
        public var backend = Backend.statefile
        /// Operations of the update's run without a cut, per behaviour and trigger.
        public var operations: [String: Int] = [:]
        /// Runs with one cut, and with a second cut during the recovery.
        public var singleCuts = 0
        public var doubleCuts = 0
        public var violations: [String] = []
        public var description: String {
            let ops = operations.sorted { $0.key < $1.key }.map { "\($0.key): \($0.value)" }.joined(separator: ", ")
            return "crash explorer (\(backend.rawValue) backend): \(singleCuts) runs with one power cut and \(doubleCuts) with a second cut during recovery, "
                + "at every operation of the update (\(ops)), each cut losing unsynced data, keeping it, or tearing the write; "
                + (violations.isEmpty ? "every invariant (I1-I5) held" : "\(violations.count) VIOLATIONS:\n  " + violations.prefix(20).joined(separator: "\n  "))
        }
    }

    public var trialAttempts: UInt8 = 3
    /// 1: one cut per run; 2: also a second cut at every operation of the recovery.
    public var depth = 2
    /// How the second cut may treat unsynced data (the first is tried every way).
    public var secondCutModes: [SimulatedDiskCutMode] = SimulatedDiskCutMode.allCases
    /// A deliberately broken install that skips the slot's fsync before the read-back:
    /// the explorer must catch it (its tests show it can fail).
    public var skipsSlotSync = false
    public var backend = Backend.statefile
    /// A deliberately broken grub backend that runs grub-editenv on the live block
    /// (truncate and rewrite in place) instead of A-3a's new block and rename: the
    /// explorer must catch it.
    public var grubWritesInPlace = false
    /// A deliberately broken uboot environment with one copy, rewritten in place
    /// (no redundant copy to fall back on): the explorer must catch it.
    public var ubootSingleCopy = false
    public init() {}

    /// Whether this run's backend is its broken variant.
    private var broken: Bool {
        switch backend {
        case .statefile: false
        case .grub: grubWritesInPlace
        case .uboot: ubootSingleCopy
        }
    }

    public func explore() -> Report {
        var report = Report()
        report.backend = backend
        for behaviour in Behaviour.allCases {
            for manual in [false, true] {
                let label = "\(behaviour)\(manual ? ", manual" : "")"
                let clean = Run(behaviour: behaviour, manual: manual, trialAttempts: trialAttempts, cuts: [], skipsSlotSync: skipsSlotSync, backend: backend, broken: broken).execute()
                report.violations += clean.violations.map { "[\(label), no cut] \($0)" }
                report.operations[label] = clean.operations
                for first in 0..<clean.operations {
                    for mode in SimulatedDisk.CutMode.allCases {
                        let once = Run(behaviour: behaviour, manual: manual, trialAttempts: trialAttempts, cuts: [(first, mode)],
                                       skipsSlotSync: skipsSlotSync, backend: backend, broken: broken).execute()
                        report.singleCuts += 1
                        report.violations += once.violations.map { "[\(label), cut at \(first) (\(mode))] \($0)" }
                        guard depth >= 2 else { continue }
                        // Every operation after the first cut, once more.
                        for second in (first + 1)..<max(first + 1, once.operations) where mode == .loseVolatile {
                            for mode2 in secondCutModes.map(\.mode) {
                                let twice = Run(behaviour: behaviour, manual: manual, trialAttempts: trialAttempts,
                                                cuts: [(first, mode), (second, mode2)], skipsSlotSync: skipsSlotSync, backend: backend, broken: broken).execute()
                                report.doubleCuts += 1
                                report.violations += twice.violations.map { "[\(label), cuts at \(first), \(second) (\(mode2))] \($0)" }
                            }
                        }
                    }
                }
            }
        }
        return report
    }
}

/// How a power cut treats what was not made durable (public face of the disk's modes).
public enum SimulatedDiskCutMode: CaseIterable, Sendable {
    case loseVolatile, keepVolatile, tearLastWrite
    var mode: SimulatedDisk.CutMode {
        switch self {
        case .loseVolatile: .loseVolatile
        case .keepVolatile: .keepVolatile
        case .tearLastWrite: .tearLastWrite
        }
    }
}

/// One run of the update on a fresh simulated device, with power cuts at the named operations.
private final class Run {
    let behaviour: CrashExplorer.Behaviour
    let manual: Bool
    let trialAttempts: UInt8
    var cuts: [(Int, SimulatedDisk.CutMode)]
    let disk = SimulatedDisk()
    var violations: [String] = []

    /// The shipped image (side A) and the update's (for side B), 1 KiB each, written in 4 chunks.
    static let oldImage = [UInt8](repeating: 0x0A, count: 1024)
    static let newImage = (0..<1024).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
    static let verifiedDigests: Set<[UInt8]> = [SHA256.hash(oldImage), SHA256.hash(newImage)]
    var oldImage: [UInt8] { Self.oldImage }
    var newImage: [UInt8] { Self.newImage }
    let old = Release(bundleID: [], version: "1.0", sequence: 1)
    let new = Release(bundleID: [9, 9], version: "2.0", sequence: 2)
    /// Whether `image` is one that was verified (its digest matched a signed one).
    func isVerified(_ image: [UInt8]) -> Bool { image.count == Self.oldImage.count && Self.verifiedDigests.contains(SHA256.hash(image)) }

    /// The highest sequence the durable record has held (I3); the shipped release's at first.
    var sequenceSeen: UInt64 = 1
    var finished: Outcome.Kind?
    /// `rebootFailsOnce`: the failure happened, and its `failed` outcome was reported.
    var rebootFailed = false
    /// No power cut in this run.
    let uncut: Bool
    var failureReported = false
    var reboots = 0
    static let rebootsMax = 24

    let skipsSlotSync: Bool
    let backend: CrashExplorer.Backend
    /// The backend's deliberately broken variant.
    let broken: Bool

    init(behaviour: CrashExplorer.Behaviour, manual: Bool, trialAttempts: UInt8, cuts: [(Int, SimulatedDisk.CutMode)], skipsSlotSync: Bool,
         backend: CrashExplorer.Backend, broken: Bool) {
        self.behaviour = behaviour; self.manual = manual; self.trialAttempts = trialAttempts; self.cuts = cuts; self.skipsSlotSync = skipsSlotSync
        self.backend = backend
        self.broken = broken
        uncut = cuts.isEmpty
        disk.device("slot-a", initial: Self.oldImage)
        disk.device("slot-b", initial: [])
        // U-Boot's environment exists before the agent (the agent never creates one, §3.4).
        if backend == .uboot { SimulatedUBootEnv.ship(on: disk, singleCopy: broken) }
        // The shipped boot state, durable before the run starts (not counted as the update's).
        try? makeBoot().initialize(current: .a)
        disk.sync()
        armNextCut()
        disk.afterOperation = { [unowned self] in self.checkDurable() }
    }

    var operations: Int { disk.operations }

    /// The backend on this run's disk.
    func makeBoot() -> BootControl {
        switch backend {
        case .statefile: StateFileBootControl(files: SimulatedFiles(disk, "boot"))
        case .grub: SimulatedGrubEnv(disk, writesInPlace: broken)
        case .uboot: SimulatedUBootEnv(disk, singleCopy: broken)
        }
    }

    /// The boot state a power cut now would leave, as the bootloader would read it.
    func durableBootState() -> BootState? {
        switch backend {
        case .statefile: StateFileBootControl(files: DurableView(disk: disk)).generations().compactMap { $0 }.max { $0.generation < $1.generation }
        case .grub: SimulatedGrubEnv.state(SimulatedGrubEnv(disk).variables(durable: true))
        case .uboot: SimulatedUBootEnv.state(SimulatedUBootEnv(disk, singleCopy: broken).current(durable: true)?.vars)
        }
    }

    private func armNextCut() {
        if let (at, mode) = cuts.first { disk.cutAt = at; disk.cutMode = mode } else { disk.cutAt = nil }
    }

    func execute() -> (operations: Int, violations: [String]) {
        while reboots < Self.rebootsMax {
            do {
                try powerOnAndRun()
                break  // settled
            } catch let cut as SimulatedDisk.PowerCut {
                _ = cut
                cuts.removeFirst()
                armNextCut()
                reboots += 1
            } catch let e as StorageError where e.isPowerCut {
                cuts.removeFirst()
                armNextCut()
                reboots += 1
            } catch is Rebooting {
                disk.sync()
                reboots += 1
            } catch is Settled {
                break
            } catch {
                violations.append("unexpected error: \(error)")
                break
            }
        }
        if reboots >= Self.rebootsMax { violations.append("I4: no settled state after \(Self.rebootsMax) restarts") }
        checkSettled()
        return (disk.operations, violations)
    }

    struct Rebooting: Error {}

    /// The bootloader (Specs/agent.md §3.2), then the agent, to the end or the next reboot.
    private func powerOnAndRun() throws {
        let bootControl = makeBoot()
        let state: BootState
        do { state = try bootControl.read() } catch { violations.append("I1: no valid boot state at power-on"); throw Settled() }
        guard let (side, spent) = BootLogic.boot(state) else { violations.append("I1: nothing to boot: \(state)"); throw Settled() }
        if let spent {
            // GRUB saves the spent attempt in place (§3.3), U-Boot into the other copy (§3.4);
            // the statefile's bootloader writes as the agent does.
            switch bootControl {
            case let grub as SimulatedGrubEnv: try grub.spendInPlace(spent)
            case let uboot as SimulatedUBootEnv: try uboot.spend(spent)
            default: try bootControl.write(spent)
            }
        }
        let image = disk.contents(device: slotName(side), durable: false)
        if !isVerified(image) { violations.append("I1/I2: booted side \(side) holding no verified image (\(state))"); throw Settled() }
        // The new release that never comes up: a watchdog reset, no agent.
        if behaviour == .neverComesUp && image == newImage { throw Rebooting() }
        try runAgent(booted: side)
    }

    struct Settled: Error {}

    private func runAgent(booted: Side) throws {
        let records = RecordStore(files: SimulatedFiles(disk, "state"))
        let driver = try SlotDriver(records: records, boot: makeBoot(), booted: booted,
                                    trialAttempts: trialAttempts, activatesAutomatically: !manual,
                                    initial: { AgentRecord(deviceID: "sim", installed: old, installedSide: booted) },
                                    health: { [behaviour] in behaviour == .healthy || behaviour == .rebootFailsOnce ? .healthy : .unhealthy("the service did not answer") },
                                    reboot: { [unowned self] () throws(StorageError) -> String? in
                                        if behaviour == .rebootFailsOnce && !rebootFailed {
                                            rebootFailed = true
                                            return "the reboot command failed (exit 1)"
                                        }
                                        throw StorageError.rebootRequested
                                    },
                                    report: { [unowned self] outcome, _ in self.reported(outcome); return true })
        do throws(StorageError) {
            try driver.start()
            // The update is offered while nothing is pending and it is neither confirmed nor rolled back.
            if manual, case .installed = driver.machine.standing {
                try driver.activate()  // `fleetcast agent install`
            }
            // The update is offered again after a failure (a failed reboot undid its activation).
            var offers = 0
            while !driver.isRebooting && driver.machine.canInstall && driver.machine.record.installed != new
                    && !driver.machine.hasRolledBack(new.bundleID) && finished == nil && offers < 2 {
                offers += 1
                try install(driver)
            }
        } catch {
            if error.reason == StorageError.rebootRequested.reason { throw Rebooting() }
            throw error
        }
        if driver.machine.record.pending != nil { violations.append("I4: the agent stopped with an update pending: \(driver.machine.standing)") }
    }

    /// Step 3 for the update: begin (A-3), the image in chunks, fsync, read back (A-4).
    private func install(_ driver: SlotDriver) throws(StorageError) {
        if finished == .confirmed || finished == .rolledBack { violations.append("I5: an update already \(finished!) is installed again") }
        try driver.beginInstall(new, reportTo: nil)
        let side = driver.machine.spare
        let slot = SimulatedSlot(disk, slotName(side), capacity: 1 << 20)
        let chunk = newImage.count / 4
        for i in 0..<4 {
            try Array(newImage[(i * chunk)..<((i + 1) * chunk)]).withUnsafeBytes { b in
                Result { () throws(StorageError) in try slot.write(b, at: UInt64(i * chunk)) }
            }.get()
        }
        if !skipsSlotSync { try slot.sync() }
        let ok = try SlotReadBack.matches(slot, size: UInt64(newImage.count), sha256: SHA256.hash(newImage))
        try driver.installFinished(verified: ok, reason: ok ? "" : "read-back hash differs")
        if manual { try driver.activate() }
    }

    private func reported(_ o: Outcome) {
        guard o.release == new else { return }
        switch o.kind {
        case .confirmed, .rolledBack: finished = o.kind
        case .failed: if rebootFailed { failureReported = true }  // interrupted, or the reboot failed: offered again
        }
    }

    private func slotName(_ side: Side) -> String { side == .a ? "slot-a" : "slot-b" }

    // MARK: Invariants

    /// After every operation, on what a power cut would leave.
    private func checkDurable() {
        let files = DurableView(disk: disk)
        guard let boot = durableBootState() else {
            violations.append("I1: no valid boot state on disk (op \(disk.operations))")
            return
        }
        if backend == .uboot, let vars = SimulatedUBootEnv(disk, singleCopy: broken).current(durable: true)?.vars,
           SimulatedUBootEnv.shippedVariables.contains(where: { vars[$0.key] != $0.value }) {
            violations.append("I1: U-Boot's own variables lost from its environment (op \(disk.operations))")
        }
        for side in Side.allCases where boot[side].bootable {
            let image = disk.contents(device: slotName(side), durable: true)
            if !isVerified(image) { violations.append("I2: side \(side) bootable without a verified image (op \(disk.operations), \(boot))") }
        }
        if let c = boot.confirmedSide {
            if !isVerified(disk.contents(device: slotName(c), durable: true)) { violations.append("I1: the confirmed side \(c) holds no verified image") }
        } else {
            violations.append("I1: no bootable confirmed side (op \(disk.operations), \(boot))")
        }
        if let bytes = files.read(RecordStoreName.name, limit: AgentRecord.encodedByteCountMax), let record = AgentRecord(decoding: bytes) {
            if record.sequence < sequenceSeen { violations.append("I3: the stored sequence fell from \(sequenceSeen) to \(record.sequence)") }
            if record.sequence > sequenceSeen {
                if record.installed != new || record.sequence != new.sequence || boot[record.installedSide].confirmed == false {
                    violations.append("I3: the stored sequence rose to \(record.sequence) outside a confirm (\(boot))")
                }
                sequenceSeen = record.sequence
            }
        }
    }

    /// At the end: settled where the behaviour says (I4), the outcome known (I5).
    private func checkSettled() {
        let files = DurableView(disk: disk)
        guard let bytes = files.read(RecordStoreName.name, limit: AgentRecord.encodedByteCountMax), let record = AgentRecord(decoding: bytes),
              let boot = durableBootState() else {
            violations.append("I4: no record or boot state at the end")
            return
        }
        if record.pending != nil { violations.append("I4: still pending at the end: \(record.pending!.phase)") }
        switch behaviour {
        case .healthy, .rebootFailsOnce:
            if record.installed != new || !boot[record.installedSide].confirmed { violations.append("I4: healthy update not confirmed at the end (\(boot))") }
            if finished != .confirmed { violations.append("I5: the confirm was not reported") }
            // With a cut, the failure may not have become durable before it: the activation then stands and its reboot is tried again.
            if behaviour == .rebootFailsOnce && uncut && !failureReported { violations.append("I5: the failed reboot was not reported") }
        case .unhealthy, .neverComesUp:
            if record.installed != old || boot.canBoot(record.installedSide.other) {
                violations.append("I4: bad update not rolled back at the end (installed \(record.installed.version), \(boot))")
            }
            if finished != .rolledBack { violations.append("I5: the rollback was not reported") }
        }
    }
}

private enum RecordStoreName { static let name = "agent.state" }

/// The durable layer of the simulated disk as `AtomicFiles`, read-only: what a
/// power cut now would leave.
private final class DurableView: AtomicFiles {
    let disk: SimulatedDisk
    init(disk: SimulatedDisk) { self.disk = disk }
    func read(_ name: String, limit: Int) -> [UInt8]? {
        let dir = name.hasPrefix("boot.") ? "boot" : "state"
        return disk.readDurable(dir, name).flatMap { $0.count <= limit ? $0 : nil }
    }
    func replace(_ name: String, with bytes: [UInt8]) throws(StorageError) { preconditionFailure("read-only") }
}
