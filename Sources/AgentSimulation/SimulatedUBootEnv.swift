import DeviceAgent
import DeviceBackends

/// The `uboot` backend on the simulated disk (Specs/agent.md §3.4), operation for
/// operation as libubootenv's `fw_setenv` and U-Boot's `saveenv` write a
/// redundant environment, so that the crash explorer cuts the power inside
/// each of their steps. The environment is one device holding two copies of
/// `copyByteCount`; a write (the agent's `fw_setenv -s`, or U-Boot saving a
/// spent attempt) goes over the copy that is not current, with libubootenv's
/// incrementing flag one higher (file-backed, eMMC, NAND environments), erased
/// first as flash needs: erase, write, sync, three operations, the first two
/// tearable. A file is written without the erase; what a cut can leave there is
/// a subset of this. (U-Boot on NOR flash flags copies active/obsolete and marks
/// the old one with a second write, which is not modelled.)
///
/// Copies are real U-Boot environment copies (`UBootEnvImage`, CRC-32 and
/// flag), so a torn one is judged as U-Boot and libubootenv would judge it.
final class SimulatedUBootEnv: BootControl {
    let disk: SimulatedDisk
    /// The broken variant the explorer must catch: an environment without a
    /// redundant copy, rewritten in place.
    let singleCopy: Bool
    static let device = "ubootenv"
    /// Small, to keep the explorer quick; what matters is that a torn write fails its CRC.
    static let copyByteCount = 512
    /// A variable of U-Boot's own, which every write must keep.
    static let shippedVariables = ["bootcmd": "run fleetcast_boot", "bootdelay": "0"]

    init(_ disk: SimulatedDisk, singleCopy: Bool = false) { self.disk = disk; self.singleCopy = singleCopy }

    /// The environment as shipped (made by mkenvimage), before the agent's first start.
    static func ship(on disk: SimulatedDisk, singleCopy: Bool) {
        let copy = UBootEnvImage.encode(shippedVariables, flag: singleCopy ? nil : 1, size: copyByteCount)!
        disk.device(device, initial: singleCopy ? copy : copy + UBootEnvImage.encode(shippedVariables, flag: 0, size: copyByteCount)!)
    }

    /// The current copy: its index, flag and variables, as the process sees the
    /// environment or as a power cut now would leave it.
    func current(durable: Bool) -> (index: Int, flag: UInt8?, vars: [String: String])? {
        let bytes = disk.contents(device: Self.device, durable: durable)
        let n = Self.copyByteCount
        if singleCopy {
            return UBootEnvImage.decode(Array(bytes.prefix(n)), redundant: false).map { (0, nil, $0.vars) }
        }
        guard bytes.count >= 2 * n else { return nil }
        let copies = [Array(bytes[0..<n]), Array(bytes[n..<(2 * n)])].map { UBootEnvImage.decode($0, redundant: true) }
        guard let i = UBootEnvImage.current((copies[0]?.flag, copies[1]?.flag)) else { return nil }
        return (i, copies[i]!.flag, copies[i]!.vars)
    }

    static func state(_ vars: [String: String]?) -> BootState? {
        vars.flatMap { try? UBootBootControl.decode($0, path: device) }
    }

    func read() throws(StorageError) -> BootState {
        guard let s = Self.state(current(durable: false)?.vars) else { throw StorageError("\(Self.device): no valid boot state") }
        return s
    }

    func write(_ state: BootState) throws(StorageError) {
        try save(UBootBootControl.encode(state))
    }

    func initialize(current: Side) throws(StorageError) {
        if (try? read()) != nil { return }
        guard self.current(durable: false) != nil else { throw StorageError("\(Self.device): no valid environment") }
        try write(BootState.initial(current: current))
    }

    /// U-Boot's own write of a spent attempt (the script's `setexpr` and `saveenv`);
    /// the generation it leaves as it was.
    func spend(_ spent: BootState) throws(StorageError) {
        try save(UBootBootControl.encodeAttempts(spent))
    }

    /// `fw_setenv -s` or `saveenv`: the current variables with `changes`, written
    /// over the copy that is not current (the only copy, when there is one).
    private func save(_ changes: [String: String]) throws(StorageError) {
        guard let now = current(durable: false) else { throw StorageError("\(Self.device): no valid environment to save into") }
        let vars = now.vars.merging(changes) { $1 }
        let target = singleCopy ? 0 : 1 - now.index
        let copy = UBootEnvImage.encode(vars, flag: singleCopy ? nil : (now.flag ?? 0) &+ 1, size: Self.copyByteCount)!
        do {
            try disk.write(device: Self.device, [UInt8](repeating: 0xFF, count: Self.copyByteCount), at: target * Self.copyByteCount)
            try disk.write(device: Self.device, copy, at: target * Self.copyByteCount)
            try disk.sync(device: Self.device)
        } catch { throw StorageError.powerCut }
    }
}
