import DeliveryCore
import FleetCrypto
import UpdateBundle
import WireFormat

/// Carries out the slot state machine's actions on a device's storage, in order,
/// each one durable before the next (Specs/agent.md §5). Effects outside storage
/// (the health check, the reboot, the report) are the caller's closures: the
/// real agent runs commands and sends datagrams, the crash explorer simulates
/// them. Between any two actions the process may die; a new driver made from
/// what is on disk then goes on (`start()`).
public final class SlotDriver {
    public enum HealthResult: Sendable, Equatable {
        case healthy
        case unhealthy(String)
        /// The check runs on (a command, a wait); its answer comes by `mark(healthy:reason:)`.
        case pending
    }

    public private(set) var machine: SlotMachine
    public let records: RecordStore
    public let boot: BootControl
    private let health: () -> HealthResult
    private let reboot: () throws(StorageError) -> String?
    private let report: (Outcome, ReportTarget?) -> Bool

    /// A reboot was started: nothing more is carried out (the process waits to be
    /// stopped, or exits for the simulated reboot).
    public private(set) var isRebooting = false

    /// `initial` makes the record of a device that has none yet (its first start):
    /// the release it shipped with, on the side that booted. `report` returns
    /// whether the outcome reached its sender (or was logged for good: true); false
    /// keeps it in the record, and `outcomeDelivered()` forgets it later. `reboot`
    /// starts the reboot and returns nil, or why it could not.
    public init(records: RecordStore, boot: BootControl, booted: Side, trialAttempts: UInt8, activatesAutomatically: Bool,
                initial: () -> AgentRecord, health: @escaping () -> HealthResult,
                reboot: @escaping () throws(StorageError) -> String?, report: @escaping (Outcome, ReportTarget?) -> Bool) throws(StorageError) {
        self.records = records
        self.boot = boot
        self.health = health
        self.reboot = reboot
        self.report = report
        var record = try records.read()
        if record == nil {
            let fresh = initial()
            try records.write(fresh)
            record = fresh
        }
        machine = SlotMachine(record: record!, boot: try boot.read(), booted: booted, trialAttempts: trialAttempts,
                              activatesAutomatically: activatesAutomatically)
    }

    /// Specs/agent.md A-6: reconcile, and go on with what was under way.
    public func start() throws(StorageError) { try run(machine.start()) }

    /// the spare made not bootable, then the record says `installing`.
    public func beginInstall(_ release: Release, reportTo: ReportTarget?) throws(StorageError) {
        try run(machine.beginInstall(release, reportTo: reportTo))
    }

    /// every component written and read back (`verified`), or not.
    public func installFinished(verified: Bool, reason: String = "") throws(StorageError) {
        try run(machine.installFinished(verified: verified, reason: reason))
    }

    /// The install cannot go on; `code` is what the sender hears (Specs/protocol.md §3.7).
    public func installFailed(reason: String, code: Status.Reason) throws(StorageError) { try run(machine.installFailed(reason: reason, code: code)) }

    /// A-5, for the manual trigger (`fleetcast agent install`).
    public func activate() throws(StorageError) { try run(machine.activate()) }

    /// `agent mark-good` / `mark-bad` on a side on trial: the health check's answer by hand.
    public func mark(healthy: Bool, reason: String) throws(StorageError) {
        try run(machine.healthChecked(healthy: healthy, reason: reason))
    }

    /// A-5b: the reboot back to the installed side, tried again after it failed.
    public func retryReboot() throws(StorageError) { try run(machine.retryReboot()) }

    /// The outcome the `report` closure could not deliver at once has reached its sender.
    public func outcomeDelivered() throws(StorageError) { try run(machine.outcomeReported()) }

    private func run(_ actions: [SlotMachine.Action]) throws(StorageError) {
        for action in actions {
            if isRebooting { return }
            switch action {
            case .writeBootState(let state): try boot.write(state)
            case .writeRecord(let record): try records.write(record)
            case .runHealthCheck:
                let result = health()
                switch result {
                case .healthy: try run(machine.healthChecked(healthy: true))
                case .unhealthy(let why): try run(machine.healthChecked(healthy: false, reason: why))
                case .pending: break
                }
            case .reboot:
                // A-5a: a reboot command that fails undoes the activation.
                if let failure = try reboot() { try run(machine.rebootFailed(reason: failure)) } else { isRebooting = true }
            case .report(let outcome, let to):
                if report(outcome, to) { try run(machine.outcomeReported()) }
            }
        }
    }
}

/// Specs/agent.md A-4: what was written to a slot is read back and hashed; only a
/// match lets the side boot.
public enum SlotReadBack {
    /// Bytes read per step.
    static let chunkByteCount = 1 << 20

    /// Whether the first `size` bytes of `slot` hash to `sha256`.
    public static func matches(_ slot: SlotDevice, size: UInt64, sha256: [UInt8]) throws(StorageError) -> Bool {
        var hash = SHA256()
        var buffer = [UInt8](repeating: 0, count: Int(min(UInt64(Self.chunkByteCount), max(size, 1))))
        var offset: UInt64 = 0
        while offset < size {
            let n = Int(min(UInt64(buffer.count), size - offset))
            try buffer.withUnsafeMutableBytes { b in
                Result { () throws(StorageError) in try slot.read(into: UnsafeMutableRawBufferPointer(rebasing: b[0..<n]), at: offset) }
            }.get()
            buffer.withUnsafeBytes { hash.update(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
            offset += UInt64(n)
        }
        return hash.finalize() == sha256
    }
}
