import DeviceAgent
import DeviceBackends

/// The `grub` backend on the simulated disk (Specs/agent.md §3.3), operation for
/// operation as the real one drives grub-editenv, so that the crash explorer
/// cuts the power inside each of its steps:
///
/// - the agent's write (A-3a): `grub-editenv F.new create` (a new 1024-byte
///   block, fsynced by the tool), `grub-editenv F.new set ...` (truncated and
///   rewritten in place, fsynced), the rename of F.new over F, the directory's
///   fsync: seven operations;
/// - GRUB's spent attempt at power-on: `save_env` rewrites F in place (and its
///   disk layer writes through): two operations, the rewrite tearable.
///
/// Blocks are real GRUB environment blocks (`GrubEnvBlock`), so a torn one is
/// judged as GRUB and the agent would judge it.
final class SimulatedGrubEnv: BootControl {
    let disk: SimulatedDisk
    /// The broken variant the explorer must catch: grub-editenv run on the live block.
    let writesInPlace: Bool
    static let dir = "boot", name = "grubenv"
    init(_ disk: SimulatedDisk, writesInPlace: Bool = false) { self.disk = disk; self.writesInPlace = writesInPlace }

    /// The block's variables as the process sees them, or as a power cut now would leave them.
    func variables(durable: Bool) -> [String: String]? {
        (durable ? disk.readDurable(Self.dir, Self.name) : disk.read(Self.dir, Self.name)).flatMap(GrubEnvBlock.decode)
    }

    static func state(_ vars: [String: String]?) -> BootState? {
        vars.flatMap { try? GrubBootControl.decode($0, path: name) }
    }

    func read() throws(StorageError) -> BootState {
        guard let s = Self.state(variables(durable: false)) else { throw StorageError("\(Self.name): no valid boot state") }
        return s
    }

    func write(_ state: BootState) throws(StorageError) {
        let others = (variables(durable: false) ?? [:]).filter { !GrubBootControl.owned.contains($0.key) }
        let block = GrubEnvBlock.encode(others.merging(GrubBootControl.encode(state)) { $1 })!
        let temporary = Self.name + ".new"
        if writesInPlace, disk.read(Self.dir, Self.name) != nil {
            do { try editenvSet(Self.name, block) } catch { throw StorageError.powerCut }
            return
        }
        do {
            let id = try disk.create(Self.dir, temporary, GrubEnvBlock.encode([:])!)
            try disk.fsync(inode: id)
            try editenvSet(temporary, block)
            try disk.rename(Self.dir, temporary, Self.name)
            try disk.fsync(directory: Self.dir)
        } catch { throw StorageError.powerCut }
    }

    /// `grub-editenv FILE set ...` as strace shows it: open with O_TRUNC (the file is
    /// empty now), one write of the block, fsync: three operations.
    private func editenvSet(_ file: String, _ block: [UInt8]) throws(SimulatedDisk.PowerCut) {
        try disk.overwrite(Self.dir, file, [])
        try disk.overwrite(Self.dir, file, block)
        try disk.fsync(Self.dir, file)
    }

    func initialize(current: Side) throws(StorageError) {
        if (try? read()) != nil { return }
        try write(BootState.initial(current: current))
    }

    /// GRUB's own write of a spent attempt (the fragment's `save_env --file F <S>_LEFT`):
    /// in place. The generation GRUB leaves as it was (it does not write it).
    func spendInPlace(_ spent: BootState) throws(StorageError) {
        guard var vars = variables(durable: false) else { throw StorageError("\(Self.name): no block to save into") }
        vars.merge(GrubBootControl.encodeAttempts(spent)) { $1 }
        do {
            try disk.overwrite(Self.dir, Self.name, GrubEnvBlock.encode(vars)!)
            try disk.fsync(Self.dir, Self.name)
        } catch { throw StorageError.powerCut }
    }
}
