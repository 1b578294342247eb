import UpdateBundle

/// A directory of small files replaced whole and atomically: what the agent's
/// record and the `statefile` boot state are kept in. `replace` is a temporary,
/// its fsync, a rename and the directory's fsync: four operations, and a crash
/// between any two leaves the old file or the new one (Specs/agent.md A-2). The
/// real one is a `SafeDirectory`; the crash explorer's counts and cuts each step.
public protocol AtomicFiles: AnyObject {
    /// The file's bytes, or nil when it is missing or cannot be read.
    func read(_ name: String, limit: Int) -> [UInt8]?
    func replace(_ name: String, with bytes: [UInt8]) throws(StorageError)
}

extension SafeDirectory: AtomicFiles {
    public func read(_ name: String, limit: Int) -> [UInt8]? { readWhole(name, limit: limit) }
    public func replace(_ name: String, with bytes: [UInt8]) throws(StorageError) {
        do { try writeAtomically(bytes, to: name) } catch { throw StorageError(error.reason) }
    }
}

/// What the agent asks of the bootloader's side (Specs/agent.md §3): read and
/// write the boot state. Backends: `statefile` (here), `grub` (DeviceBackends),
/// `uboot` later.
public protocol BootControl: AnyObject {
    /// The valid boot state, or an error when there is none (the agent stops: A-1).
    func read() throws(StorageError) -> BootState
    func write(_ state: BootState) throws(StorageError)
    /// A fresh device's boot state (`current` bootable and confirmed), when none is valid yet.
    func initialize(current: Side) throws(StorageError)
}

/// The `statefile` backend (Specs/agent.md §3.1): two generations, `boot.0` and
/// `boot.1`; a write replaces the older one, a read takes the valid one with the
/// higher generation.
public final class StateFileBootControl: BootControl {
    public let files: AtomicFiles
    static let names = ["boot.0", "boot.1"]

    public init(files: AtomicFiles) { self.files = files }

    /// Both generations as they decode (nil: missing, torn or corrupt).
    public func generations() -> [BootState?] {
        Self.names.map { files.read($0, limit: BootState.encodedByteCount).flatMap { BootState(decoding: $0) } }
    }

    public func read() throws(StorageError) -> BootState {
        guard let best = generations().compactMap({ $0 }).max(by: { $0.generation < $1.generation }) else {
            throw StorageError("no valid boot state in boot.0 or boot.1")
        }
        return best
    }

    /// Writes `state` over the older (or invalid) generation; `state.generation` must
    /// exceed the one it replaces as the newest.
    public func write(_ state: BootState) throws(StorageError) {
        let current = generations()
        let newest = current.compactMap { $0?.generation }.max() ?? 0
        precondition(state.generation > newest, "a boot state is written with a higher generation (\(state.generation) after \(newest))")
        // The slot not holding the newest valid generation.
        let target = current[0].map { $0.generation == newest } == true ? 1 : 0
        try files.replace(Self.names[target], with: state.encoded())
    }

    /// A fresh device's boot state, when none is valid yet.
    public func initialize(current: Side) throws(StorageError) {
        if (try? read()) != nil { return }
        try files.replace(Self.names[0], with: BootState.initial(current: current).encoded())
    }
}

/// The agent's record in `agent.state` (Specs/agent.md §4).
public final class RecordStore {
    public let files: AtomicFiles
    static let name = "agent.state"
    public init(files: AtomicFiles) { self.files = files }

    /// The record; nil when there is none yet; an error when one is there but is not valid.
    public func read() throws(StorageError) -> AgentRecord? {
        guard let bytes = files.read(Self.name, limit: AgentRecord.encodedByteCountMax) else { return nil }
        guard let record = AgentRecord(decoding: bytes) else { throw StorageError("\(Self.name) is corrupt (checksum or fields)") }
        return record
    }

    public func write(_ record: AgentRecord) throws(StorageError) { try files.replace(Self.name, with: record.encoded()) }
}

/// One side's slot for one install target: a file or a block device, written from
/// offset 0 (Specs/agent.md A-4).
public protocol SlotDevice: AnyObject {
    /// Bytes the slot holds at most.
    var capacity: UInt64 { get }
    func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws(StorageError)
    func sync() throws(StorageError)
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(StorageError)
}
