import DeviceAgent
import FleetCrypto

/// A disk that loses what was not made durable when the power is cut (the model
/// of the crash explorer, Specs/agent.md I4): file contents written since their
/// last fsync, and directory entries changed since the directory's last fsync.
/// Every operation is counted; the explorer cuts the power before the one it
/// names, and can tear it (a write that reached the disk only in part) or let
/// everything volatile survive (a disk that wrote back on its own).
final class SimulatedDisk {
    /// How the power cut treats what was not made durable.
    enum CutMode: CaseIterable, CustomStringConvertible {
        /// Everything not fsynced is lost.
        case loseVolatile
        /// Everything written survives, as if the disk had flushed on its own.
        case keepVolatile
        /// The interrupted write reached the disk in part (its first half); the rest is lost.
        case tearLastWrite
        var description: String {
            switch self {
            case .loseVolatile: "lose unsynced"
            case .keepVolatile: "keep unsynced"
            case .tearLastWrite: "tear the write"
            }
        }
    }

    struct Inode {
        var durable: [UInt8] = []
        var volatile: [UInt8] = []
    }

    struct PowerCut: Error {}

    private var inodes: [Int: Inode] = [:]
    private var nextInode = 1
    /// Directory entries ("dir/name" -> inode), as the process sees them and as they are on disk.
    private var volatileEntries: [String: Int] = [:]
    private var durableEntries: [String: Int] = [:]
    /// Operations carried out so far, over the whole run (restarts included).
    private(set) var operations = 0
    /// The power goes before operation `cutAt` (0-based), treated as `cutMode`.
    var cutAt: Int?
    var cutMode = CutMode.loseVolatile
    /// Called after every operation that changed what is durable: the explorer checks
    /// its invariants on it (between such operations it cannot change).
    var afterOperation: (() -> Void)?
    private var durableChanged = false

    /// Counts an operation; cuts the power instead when it is the one named.
    private func operation(tearing inode: Int? = nil, write: (offset: Int, bytes: [UInt8])? = nil) throws(PowerCut) {
        defer { operations += 1 }
        if operations == cutAt {
            if cutMode == .tearLastWrite, let inode, let write, !write.bytes.isEmpty {
                // Half of the write reached the platter.
                var d = inodes[inode]!.durable
                let half = Array(write.bytes.prefix(max(1, write.bytes.count / 2)))
                if d.count < write.offset + half.count { d += [UInt8](repeating: 0, count: write.offset + half.count - d.count) }
                d.replaceSubrange(write.offset..<(write.offset + half.count), with: half)
                inodes[inode]!.durable = d
            }
            powerCut()
            done()
            throw PowerCut()
        }
    }

    /// What a cut leaves: the durable layer (or, keeping volatile, everything).
    func powerCut() {
        if cutMode == .keepVolatile { sync() }
        durableChanged = true
        volatileEntries = durableEntries
        for id in inodes.keys { inodes[id]!.volatile = inodes[id]!.durable }
    }

    /// A clean shutdown (`systemctl reboot` syncs the file systems first).
    func sync() {
        durableChanged = true
        durableEntries = volatileEntries
        for id in inodes.keys { inodes[id]!.durable = inodes[id]!.volatile }
    }

    private func done() {
        guard durableChanged else { return }
        durableChanged = false
        afterOperation?()
    }

    // MARK: Files in directories

    func read(_ dir: String, _ name: String) -> [UInt8]? { volatileEntries["\(dir)/\(name)"].map { inodes[$0]!.volatile } }
    func readDurable(_ dir: String, _ name: String) -> [UInt8]? { durableEntries["\(dir)/\(name)"].map { inodes[$0]!.durable } }

    /// A new file with `bytes` (not durable yet): one operation.
    func create(_ dir: String, _ name: String, _ bytes: [UInt8]) throws(PowerCut) -> Int {
        let id = nextInode
        nextInode += 1
        inodes[id] = Inode()
        try operation(tearing: id, write: (0, bytes))
        inodes[id]!.volatile = bytes
        volatileEntries["\(dir)/\(name)"] = id
        done()
        return id
    }

    /// Rewrites an existing file in place (a truncate and one write, as grub-editenv
    /// and GRUB's save_env do): one operation, tearable, not durable until fsynced.
    func overwrite(_ dir: String, _ name: String, _ bytes: [UInt8]) throws(PowerCut) {
        guard let id = volatileEntries["\(dir)/\(name)"] else { preconditionFailure("overwrite of \(dir)/\(name), which does not exist") }
        try operation(tearing: id, write: (0, bytes))
        inodes[id]!.volatile = bytes
        done()
    }

    func fsync(_ dir: String, _ name: String) throws(PowerCut) {
        guard let id = volatileEntries["\(dir)/\(name)"] else { preconditionFailure("fsync of \(dir)/\(name), which does not exist") }
        try fsync(inode: id)
    }

    func fsync(inode id: Int) throws(PowerCut) {
        try operation()
        inodes[id]!.durable = inodes[id]!.volatile
        durableChanged = true
        done()
    }

    func rename(_ dir: String, _ from: String, _ to: String) throws(PowerCut) {
        try operation()
        if let id = volatileEntries.removeValue(forKey: "\(dir)/\(from)") { volatileEntries["\(dir)/\(to)"] = id }
        done()
    }

    func fsync(directory dir: String) throws(PowerCut) {
        try operation()
        for (k, v) in volatileEntries where k.hasPrefix(dir + "/") { durableEntries[k] = v }
        for k in durableEntries.keys where k.hasPrefix(dir + "/") && volatileEntries[k] == nil { durableEntries[k] = nil }
        durableChanged = true
        done()
    }

    // MARK: Block devices (one inode each, under a fixed name)

    func device(_ name: String, initial: [UInt8]) {
        let id = nextInode
        nextInode += 1
        inodes[id] = Inode(durable: initial, volatile: initial)
        volatileEntries["dev/\(name)"] = id
        durableEntries["dev/\(name)"] = id
    }

    func write(device name: String, _ bytes: [UInt8], at offset: Int) throws(PowerCut) {
        let id = volatileEntries["dev/\(name)"]!
        try operation(tearing: id, write: (offset, bytes))
        var v = inodes[id]!.volatile
        if v.count < offset + bytes.count { v += [UInt8](repeating: 0, count: offset + bytes.count - v.count) }
        v.replaceSubrange(offset..<(offset + bytes.count), with: bytes)
        inodes[id]!.volatile = v
        done()
    }

    func sync(device name: String) throws(PowerCut) { try fsync(inode: volatileEntries["dev/\(name)"]!) }

    func contents(device name: String, durable: Bool) -> [UInt8] {
        let id = durableEntries["dev/\(name)"]!
        return durable ? inodes[id]!.durable : inodes[id]!.volatile
    }
}

/// A directory of the simulated disk, as the agent's `AtomicFiles`: `replace` is
/// four operations (create the temporary, fsync it, rename, fsync the directory).
final class SimulatedFiles: AtomicFiles {
    let disk: SimulatedDisk
    let dir: String
    init(_ disk: SimulatedDisk, _ dir: String) { self.disk = disk; self.dir = dir }

    func read(_ name: String, limit: Int) -> [UInt8]? { disk.read(dir, name).flatMap { $0.count <= limit ? $0 : nil } }

    func replace(_ name: String, with bytes: [UInt8]) throws(StorageError) {
        do {
            let temp = try disk.create(dir, name + ".tmp", bytes)
            try disk.fsync(inode: temp)
            try disk.rename(dir, name + ".tmp", name)
            try disk.fsync(directory: dir)
        } catch { throw StorageError.powerCut }
    }
}

/// A slot on the simulated disk.
final class SimulatedSlot: SlotDevice {
    let disk: SimulatedDisk
    let name: String
    let capacity: UInt64
    init(_ disk: SimulatedDisk, _ name: String, capacity: UInt64) { self.disk = disk; self.name = name; self.capacity = capacity }

    func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws(StorageError) {
        do { try disk.write(device: name, Array(bytes), at: Int(offset)) } catch { throw StorageError.powerCut }
    }
    func sync() throws(StorageError) {
        do { try disk.sync(device: name) } catch { throw StorageError.powerCut }
    }
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(StorageError) {
        let c = disk.contents(device: name, durable: false)
        buffer.initializeMemory(as: UInt8.self, repeating: 0)
        let available = max(0, min(buffer.count, c.count - Int(offset)))
        if available > 0 { c.withUnsafeBytes { buffer.baseAddress!.copyMemory(from: $0.baseAddress! + Int(offset), byteCount: available) } }
    }
}

extension StorageError {
    /// The simulated power cut, carried through the agent's storage errors.
    static let powerCut = StorageError("the power was cut (simulated)")
    var isPowerCut: Bool { reason == StorageError.powerCut.reason }
    /// The agent asked for a reboot (simulated).
    static let rebootRequested = StorageError("reboot requested (simulated)")
}
