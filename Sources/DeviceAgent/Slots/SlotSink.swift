import BundleFormat
import DeliveryCore
import UpdateBundle
#if canImport(Glibc)
import Glibc
#endif

/// A slot on a real device: an existing regular file or block device, written in
/// place from offset 0 (Specs/agent.md §1, A-4). A file slot is made beforehand at
/// its full size (`truncate -s 512M rootfs.b`), as a partition is: its size is its
/// capacity. The path is the configuration's, which root owns; it may be a link
/// (`/dev/disk/by-partlabel/rootfs_b`).
public final class FileSlot: SlotDevice {
    public let path: String
    public let capacity: UInt64
    public let isBlockDevice: Bool
    /// The slot opened for reading and writing (the receiver stages a lone plain
    /// payload here, Specs/protocol.md P-29b).
    let file: File

    public init(path: String) throws(StorageError) {
        do {
            file = try File.open(updating: path)
            (isBlockDevice, capacity) = try file.extent()
        } catch { throw StorageError("slot \(path): \(error.reason)") }
        self.path = path
    }

    public func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws(StorageError) {
        guard offset + UInt64(bytes.count) <= capacity else { throw StorageError("slot \(path): a write ends at \(offset + UInt64(bytes.count)), beyond its \(capacity) bytes") }
        do { try file.write(bytes, at: offset) } catch { throw StorageError(error.reason) }
    }

    public func sync() throws(StorageError) {
        do { try file.syncData() } catch { throw StorageError(error.reason) }
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(StorageError) {
        do { try file.read(into: buffer, at: offset) } catch { throw StorageError(error.reason) }
    }

    func startWriteback(offset: UInt64, length: UInt64) { file.startWriteback(offset: offset, length: length) }
    /// After the fsync: the read-back then reads the device, not the page cache.
    func dropCachedPages() { file.dropCachedPages() }
}

/// Where each install target of one update goes: the spare side's slot of its pair.
public struct SlotPlan {
    public struct Entry {
        public let component: Manifest.Component
        public let slot: SlotDevice
        /// For messages and `ReceivedUpdate.componentPaths`.
        public let path: String
    }
    public let entries: [Entry]

    /// Specs/agent.md A-4: every component has a slot for its install target on
    /// `side`, and fits; refused before any byte is written. `open` opens a slot by
    /// its path.
    public init(_ manifest: Manifest, side: Side, pairs: [String: SlotPair],
                open: (String) throws(StorageError) -> SlotDevice) throws(SlotPlanError) {
        var entries: [Entry] = []
        var used: Set<String> = []
        for c in manifest.components {
            guard let pair = pairs[c.installTarget] else {
                throw SlotPlanError("component '\(c.name)' goes to install target '\(c.installTarget)', which this device has no slot pair for (it has: \(pairs.keys.sorted().joined(separator: ", ")))")
            }
            let path = pair[side]
            guard used.insert(path).inserted else { throw SlotPlanError("two components go to the slot \(path) (install target '\(c.installTarget)')") }
            let slot: SlotDevice
            do { slot = try open(path) } catch { throw SlotPlanError(error.reason) }
            guard c.size <= slot.capacity else {
                throw SlotPlanError("component '\(c.name)' (\(c.size) bytes) does not fit the \(c.installTarget) slot \(path) (\(slot.capacity) bytes)")
            }
            entries.append(Entry(component: c, slot: slot, path: path))
        }
        self.entries = entries
    }
}

public struct SlotPlanError: Error, Sendable, CustomStringConvertible {
    public let reason: String
    public init(_ reason: String) { self.reason = reason }
    public var description: String { reason }
}

/// A slot pair of one install target: a path per side.
public struct SlotPair: Equatable, Sendable {
    public var a: String
    public var b: String
    public init(a: String, b: String) { self.a = a; self.b = b }
    public subscript(side: Side) -> String { side == .a ? a : b }
}

/// Step 2's components written into the spare slots as they are released: install
/// while receiving (Specs/agent.md A-4). Bytes are gathered into large writes; each
/// slot is fsynced when its component ends; `release` reads every slot back and
/// hashes it against the component's signed SHA-256, and only a match lets the
/// update go on to `installed` (I2).
///
/// `writtenInPlace`: the receiver staged the payload in the slot already, as it
/// arrived (Specs/protocol.md P-29b: a lone plain component); the bytes step 2
/// releases are what the slot holds, so they are not written again: the sink
/// makes the slot durable and reads it back.
public final class SlotSink: ComponentSink {
    public let plan: SlotPlan
    public let writtenInPlace: Bool
    private var current: Int?
    private var offset: UInt64 = 0
    private var buffer: [UInt8] = []
    private var writebackStartedUpTo: UInt64 = 0
    /// Bytes per write: large enough that system calls cost nothing next to the copy.
    static let writeByteCount = 1 << 20
    /// Every this many bytes, writeback starts in the background, so that the fsync
    /// at the component's end finds little left (as step 2's component files do).
    static let writebackChunkByteCount: UInt64 = 8 << 20
    /// Bytes written to slots so far (progress).
    public private(set) var bytesWritten: UInt64 = 0
    /// Seconds spent inside the slots' writes and fsyncs, and in the read-back: the
    /// install's own cost, beside the transfer it overlaps (bench/agent compares the
    /// write rate with dd's).
    public private(set) var writeSeconds = 0.0
    public private(set) var readBackSeconds = 0.0

    private static func seconds() -> Double {
        var t = timespec()
        clock_gettime(CLOCK_MONOTONIC, &t)
        return Double(t.tv_sec) + Double(t.tv_nsec) / 1e9
    }

    public init(plan: SlotPlan, writtenInPlace: Bool = false) {
        precondition(!writtenInPlace || plan.entries.count == 1, "only a lone component is staged in its slot (P-29b)")
        self.plan = plan
        self.writtenInPlace = writtenInPlace
        if !writtenInPlace { buffer.reserveCapacity(Self.writeByteCount) }
    }

    public func begin(_ component: Manifest.Component) throws(BundleError) {
        guard let i = plan.entries.firstIndex(where: { $0.component == component }) else {
            throw BundleError(.invalidInput, "component '\(component.name)' has no slot in this install")
        }
        current = i
        offset = 0
        writebackStartedUpTo = 0
    }

    public func write(_ bytes: UnsafeRawBufferPointer) throws(BundleError) {
        if writtenInPlace { return }
        var rest = bytes
        while !rest.isEmpty {
            let n = min(rest.count, Self.writeByteCount - buffer.count)
            buffer.append(contentsOf: UnsafeRawBufferPointer(rebasing: rest[0..<n]))
            rest = UnsafeRawBufferPointer(rebasing: rest[n...])
            if buffer.count == Self.writeByteCount { try flush() }
        }
    }

    private func flush() throws(BundleError) {
        guard let i = current, !buffer.isEmpty else { return }
        let entry = plan.entries[i]
        let started = Self.seconds()
        defer { writeSeconds += Self.seconds() - started }
        let result = buffer.withUnsafeBytes { b in Result { () throws(StorageError) in try entry.slot.write(b, at: offset) } }
        if case .failure(let e) = result { throw BundleError(.io, "writing \(entry.path): \(e.reason)") }
        offset += UInt64(buffer.count)
        bytesWritten += UInt64(buffer.count)
        buffer.removeAll(keepingCapacity: true)
        if let file = entry.slot as? FileSlot, offset - writebackStartedUpTo >= Self.writebackChunkByteCount {
            file.startWriteback(offset: writebackStartedUpTo, length: offset - writebackStartedUpTo)
            writebackStartedUpTo = offset
        }
    }

    public func end(_ component: Manifest.Component) throws(BundleError) {
        try flush()
        guard let i = current else { return }
        let entry = plan.entries[i]
        let started = Self.seconds()
        defer { writeSeconds += Self.seconds() - started }
        do { try entry.slot.sync() } catch { throw BundleError(.io, "fsync of \(entry.path): \(error.reason)") }
        current = nil
    }

    /// Specs/agent.md A-4, I2: every slot read back and hashed.
    public func release() throws(BundleError) -> [String: String] {
        var paths: [String: String] = [:]
        let started = Self.seconds()
        defer { readBackSeconds += Self.seconds() - started }
        for e in plan.entries {
            (e.slot as? FileSlot)?.dropCachedPages()
            let ok: Bool
            do { ok = try SlotReadBack.matches(e.slot, size: e.component.size, sha256: e.component.sha256) }
            catch { throw BundleError(.io, "reading back \(e.path): \(error.reason)") }
            guard ok else { throw BundleError(.hashMismatch, "the read-back of \(e.path) does not hash to component '\(e.component.name)''s signed SHA-256") }
            paths[e.component.name] = e.path
        }
        return paths
    }

    /// Nothing to undo: the spare was made not bootable before the first byte.
    public func discard() {}
}
