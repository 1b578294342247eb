import DeliveryCore
import WireFormat

/// The slot state machine (Specs/agent.md §5): what the agent does to install,
/// activate, confirm and roll back, as pure logic. Events come in as method
/// calls; out come actions, which the driver carries out in order, each one
/// durable before the next (every write is a crash point). After a crash the
/// driver makes a new machine from what is on disk (the record, the boot state)
/// and the side that booted, and calls `start()`: every decision is made again
/// from durable state (Specs/agent.md A-6).
///
/// The same machine runs under the crash explorer (`AgentSimulation`), which
/// cuts power at every one of its writes, and in the real agent.
public struct SlotMachine: Sendable {
    /// What the driver carries out, in order.
    public enum Action: Equatable, Sendable {
        /// Through the boot-control backend (atomic, Specs/agent.md A-2).
        case writeBootState(BootState)
        /// The agent's record, atomically (Specs/agent.md §4).
        case writeRecord(AgentRecord)
        /// Run the health check, then `healthChecked`.
        case runHealthCheck
        /// Restart the device (the bootloader then follows the boot state).
        case reboot
        /// Tell the sender (and the log) this outcome, then `outcomeReported`.
        case report(Outcome, to: ReportTarget?)
    }

    /// How the agent stands, for `agent status` and the sender.
    public enum Standing: Equatable, Sendable {
        case idle
        case installing(Release)
        /// Written and verified; waiting for activation (manual trigger: for `agent install`).
        case installed(Release)
        case trial(Release)
        case rollingBack(Release, String)
    }

    public private(set) var record: AgentRecord
    public private(set) var boot: BootState
    /// The side that booted this time.
    public let booted: Side
    /// Trial boots given to a new side (Specs/agent.md A-5).
    public let trialAttempts: UInt8
    /// Activation right after a verified install (false: wait for `activate`).
    public let activatesAutomatically: Bool

    public init(record: AgentRecord, boot: BootState, booted: Side, trialAttempts: UInt8, activatesAutomatically: Bool) {
        precondition(trialAttempts >= 1, "a trial needs at least one boot")
        self.record = record
        self.boot = boot
        self.booted = booted
        self.trialAttempts = trialAttempts
        self.activatesAutomatically = activatesAutomatically
    }

    public var standing: Standing {
        guard let p = record.pending else { return .idle }
        switch p.phase {
        case .installing: return .installing(p.release)
        case .installed: return .installed(p.release)
        case .trial: return .trial(p.release)
        case .rollingBack: return .rollingBack(p.release, p.reason)
        }
    }

    /// The side an update goes to.
    public var spare: Side { record.installedSide.other }
    /// Whether an update may start now: nothing pending, and the device runs its
    /// installed side. After a rollback whose reboot failed it runs the side it left,
    /// which is the spare: nothing may be written there before it reboots back (A-5b).
    public var canInstall: Bool { record.pending == nil && booted == record.installedSide }

    /// Specs/agent.md A-5b: nothing pending, running a side that is neither the
    /// installed one nor confirmed (a rollback, or an undone activation, whose reboot
    /// failed or was cut): the device must reboot back, and tries again until it does.
    public var needsReboot: Bool { record.pending == nil && booted != record.installedSide && !boot[booted].confirmed }

    /// A-5b: the reboot back, tried again.
    public func retryReboot() -> [Action] { needsReboot ? [.reboot] : [] }

    // MARK: Start (Specs/agent.md A-6)

    public mutating func start() -> [Action] {
        var actions = reportIfDue()
        guard let p = record.pending else {
            // Running an unconfirmed side with nothing pending: a rollback whose reboot was
            // cut, or an activation undone after its reboot failed (`rebootFailed`) whose
            // boot-state write was cut. That side may not boot again; go back.
            if needsReboot {
                if let write = retire(booted) { actions.append(write) }
                actions.append(.reboot)
            }
            return actions
        }
        switch p.phase {
        case .installing:
            // The install did not finish: report it; the spare stays not bootable.
            actions += fail(p, reason: "interrupted before the install was verified", code: .interrupted)
        case .installed:
            if activatesAutomatically { actions += activate() }
        case .trial:
            actions += resumeTrial(p)
        case .rollingBack:
            actions += finishRollback(p)
        }
        return actions
    }

    private mutating func resumeTrial(_ p: AgentRecord.Pending) -> [Action] {
        if booted == p.side {
            // A crash between the boot state's confirm and the record's: finish it.
            if boot[p.side].bootable && boot[p.side].confirmed { return confirmInRecord(p) }
            return [.runHealthCheck]
        }
        // On the old side.
        if !boot[p.side].bootable {
            // The activation's boot-state write did not happen: do it again.
            return writeActivation(p)
        }
        if boot.canBoot(p.side) {
            // Activated, the reboot did not happen yet.
            return [.reboot]
        }
        // Its attempts are spent and the bootloader fell back by itself.
        return rollBack(p, reason: "the new side did not come up (the bootloader fell back after \(trialAttempts) attempt(s))", code: .didNotBoot)
    }

    // MARK: Install

    /// An accepted update is about to be written to the spare: the spare is made not
    /// bootable first, then the record says `installing` (Specs/agent.md A-3).
    public mutating func beginInstall(_ release: Release, reportTo: ReportTarget?) -> [Action] {
        precondition(record.pending == nil, "one update at a time")
        var actions: [Action] = []
        let side = spare
        if let write = retire(side) { actions.append(write) }
        record.pending = .init(release: release, side: side, phase: .installing, reportTo: reportTo)
        record.outcome = nil
        actions.append(.writeRecord(record))
        return actions
    }

    /// The spare's components were written, fsynced and read back: `verified` if
    /// every hash matched (Specs/agent.md A-4). Only then may the side ever boot.
    public mutating func installFinished(verified: Bool, reason: String = "") -> [Action] {
        guard let p = record.pending, p.phase == .installing else { return [] }
        guard verified else { return fail(p, reason: reason, code: .slot) }
        record.pending!.phase = .installed
        var actions: [Action] = [.writeRecord(record)]
        if activatesAutomatically { actions += activate() }
        return actions
    }

    /// The install cannot go on (download failed, disk full, a hash differs).
    public mutating func installFailed(reason: String, code: Status.Reason) -> [Action] {
        guard let p = record.pending, p.phase == .installing || p.phase == .installed else { return [] }
        return fail(p, reason: reason, code: code)
    }

    private mutating func fail(_ p: AgentRecord.Pending, reason: String, code: Status.Reason) -> [Action] {
        record.pending = nil
        record.outcome = Outcome(.failed, p.release, reason: reason, code: code)
        record.outcomeReportTo = p.reportTo
        return [.writeRecord(record), .report(record.outcome!, to: p.reportTo)]
    }

    // MARK: Activate

    /// Activation by reboot: the record says `trial`, the boot state puts the spare
    /// first on trial with `trialAttempts` boots, then the device reboots.
    public mutating func activate() -> [Action] {
        guard let p = record.pending, p.phase == .installed else { return [] }
        record.pending!.phase = .trial
        return [.writeRecord(record)] + writeActivation(record.pending!)
    }

    private mutating func writeActivation(_ p: AgentRecord.Pending) -> [Action] {
        boot[p.side] = .init(bootable: true, confirmed: false, attempts: trialAttempts)
        boot.order = [p.side, p.side.other]
        boot.generation += 1
        return [.writeBootState(boot), .reboot]
    }

    /// The reboot into an activated update could not be started (the reboot command
    /// failed): the activation is undone, record first, and the update reported
    /// failed; the device goes on running the confirmed side (Specs/agent.md A-5a).
    public mutating func rebootFailed(reason: String) -> [Action] {
        guard let p = record.pending, p.phase == .trial, booted != p.side else { return [] }
        var actions = fail(p, reason: reason, code: .rebootFailed)
        if let write = retire(p.side) { actions.insert(write, at: 1) }
        return actions
    }

    // MARK: Health, confirm, roll back

    /// The health check's result on a side on trial.
    public mutating func healthChecked(healthy: Bool, reason: String = "") -> [Action] {
        guard let p = record.pending, p.phase == .trial, booted == p.side, !boot[p.side].confirmed else { return [] }
        if !healthy { return rollBack(p, reason: reason.isEmpty ? "the health check failed" : reason, code: .unhealthy) }
        // Confirm in the boot state first, then in the record.
        boot[p.side] = .init(bootable: true, confirmed: true)
        boot.generation += 1
        return [.writeBootState(boot)] + confirmInRecord(p)
    }

    /// Specs/agent.md A-7: the stored sequence is raised here and only here.
    private mutating func confirmInRecord(_ p: AgentRecord.Pending) -> [Action] {
        record.installed = p.release
        record.installedSide = p.side
        record.sequence = max(record.sequence, p.release.sequence)
        record.pending = nil
        record.outcome = Outcome(.confirmed, p.release)
        record.outcomeReportTo = p.reportTo
        return [.writeRecord(record), .report(record.outcome!, to: p.reportTo)]
    }

    /// The record says `rollingBack` first, so that a crash cannot leave a rollback
    /// half done that looks like an activation not yet written.
    private mutating func rollBack(_ p: AgentRecord.Pending, reason: String, code: Status.Reason) -> [Action] {
        record.pending!.phase = .rollingBack
        record.pending!.reason = reason
        record.pending!.code = code
        return [.writeRecord(record)] + finishRollback(record.pending!)
    }

    private mutating func finishRollback(_ p: AgentRecord.Pending) -> [Action] {
        var actions: [Action] = []
        if let write = retire(p.side) { actions.append(write) }
        record.pending = nil
        record.outcome = Outcome(.rolledBack, p.release, reason: p.reason, code: p.code)
        record.outcomeReportTo = p.reportTo
        record.rememberRolledBack(p.release.bundleID)
        actions += [.writeRecord(record), .report(record.outcome!, to: p.reportTo)]
        if booted == p.side { actions.append(.reboot) }
        return actions
    }

    /// `side` made not bootable and last in the order, the other first; the boot-state
    /// write that says so, or nil when it says so already.
    private mutating func retire(_ side: Side) -> Action? {
        guard boot[side].bootable || boot[side].confirmed else { return nil }
        boot[side] = .init(bootable: false, confirmed: false)
        boot.order = [side.other, side]
        boot.generation += 1
        return .writeBootState(boot)
    }

    // MARK: Reports

    private func reportIfDue() -> [Action] {
        guard let o = record.outcome else { return [] }
        return [.report(o, to: record.outcomeReportTo)]
    }

    /// The outcome reached the sender (or the log, with no sender): forget it.
    public mutating func outcomeReported() -> [Action] {
        guard record.outcome != nil else { return [] }
        record.outcome = nil
        record.outcomeReportTo = nil
        return [.writeRecord(record)]
    }

    /// Whether the agent must refuse this bundle: one that rolled back before (I5).
    public func hasRolledBack(_ bundleID: [UInt8]) -> Bool { record.rolledBack.contains(bundleID) }
}
