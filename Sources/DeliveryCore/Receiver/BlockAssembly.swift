import BundleFormat
import ErasureCoding
import WireFormat

/// A storage operation of the driver failed; the receiver ends the session with
/// reason `storage` and this text.
public struct StorageError: Error, Sendable, CustomStringConvertible {
    public let reason: String
    public init(_ reason: String) { self.reason = reason }
    public var description: String { reason }
}

/// Where a receiver keeps the authenticated symbols of incomplete blocks it
/// no longer holds in memory (Specs/protocol.md P-5a): the real driver uses
/// a sparse scratch file, the simulator memory. Symbols of one block occupy
/// consecutive slots by index, so a run of symbols moves in one call.
/// Contents need not survive a restart: the journal lists only whole
/// verified blocks.
public protocol SymbolSpill: AnyObject {
    /// Stores `bytes` (a whole number of symbols) in the slots from `index` on.
    func write(object: ObjectID, block: Int, index: Int, symbolSize: Int, bytes: UnsafeRawBufferPointer) throws(StorageError)
    /// Reads the slots from `index` on; slots never written read as zeros.
    func read(object: ObjectID, block: Int, index: Int, symbolSize: Int, into buffer: UnsafeMutableRawBufferPointer) throws(StorageError)
    /// The block's slots are needed no more (it was read back to decode): their
    /// room may go back (Specs/protocol.md P-5a). Best effort.
    func release(object: ObjectID, block: Int, symbolSize: Int)
}

/// A spill in memory: for the simulator and tests, where the eviction logic
/// runs unchanged but bytes are only moved, not bounded.
public final class MemorySpill: SymbolSpill {
    private var symbols: [SymbolKey: [UInt8]] = [:]
    struct SymbolKey: Hashable { var object: ObjectID; var block: Int; var index: Int }
    public init() {}
    public func write(object: ObjectID, block: Int, index: Int, symbolSize: Int, bytes: UnsafeRawBufferPointer) {
        precondition(bytes.count % symbolSize == 0)
        for n in 0..<(bytes.count / symbolSize) {
            symbols[SymbolKey(object: object, block: block, index: index + n)] = Array(bytes[(n * symbolSize)..<((n + 1) * symbolSize)])
        }
    }
    public func read(object: ObjectID, block: Int, index: Int, symbolSize: Int, into buffer: UnsafeMutableRawBufferPointer) {
        precondition(buffer.count % symbolSize == 0)
        for n in 0..<(buffer.count / symbolSize) {
            let slot = UnsafeMutableRawBufferPointer(rebasing: buffer[(n * symbolSize)..<((n + 1) * symbolSize)])
            if let bytes = symbols.removeValue(forKey: SymbolKey(object: object, block: block, index: index + n)) {
                bytes.withUnsafeBytes { slot.copyMemory(from: $0) }
            } else {
                slot.initializeMemory(as: UInt8.self, repeating: 0)
            }
        }
    }
    public func release(object: ObjectID, block: Int, symbolSize: Int) {
        for i in 0..<BundleLimits.symbolIndexCountMax { symbols[SymbolKey(object: object, block: block, index: i)] = nil }
    }
}

enum AcceptOutcome {
    case blockDone, tooManyBlocks, duplicate, held
    case decodable(PartialBlock)
}

/// An incomplete block (Specs/protocol.md P-14): which symbols arrived, and
/// their bytes while the block is *hot* (held in memory). A *cold* block keeps
/// only its bitmaps; its symbols live in the receiver's `SymbolSpill` until it
/// decodes (Specs/protocol.md P-5a).
struct PartialBlock {
    let k: Int
    let symbolSize: Int
    var source: [UInt8]
    var seen: [Bool]
    var presentSources: [Bool]
    var repairs: [(index: Int, bytes: [UInt8])] = []
    private(set) var count = 0
    private(set) var isCold = false

    init(k: Int, symbolCount: Int, symbolSize: Int) {
        self.k = k
        self.symbolSize = symbolSize
        source = [UInt8](repeating: 0, count: k * symbolSize)
        seen = [Bool](repeating: false, count: symbolCount)
        presentSources = [Bool](repeating: false, count: k)
    }

    var isDecodable: Bool { count >= k }

    /// Adds a symbol; false if it was already held. A cold block's symbols go straight to the spill.
    mutating func add(index: Int, symbol: ArraySlice<UInt8>, spill: SymbolSpill, object: ObjectID, block: Int) throws(StorageError) -> Bool {
        precondition(symbol.count == symbolSize, "symbols are checked against the profile before they reach a block")
        guard !seen[index] else { return false }
        seen[index] = true
        count += 1
        if index < k { presentSources[index] = true }
        if isCold {
            try symbol.withUnsafeBytes { p in Result { () throws(StorageError) in try spill.write(object: object, block: block, index: index, symbolSize: symbolSize, bytes: p) } }.get()
            if index >= k { repairs.append((index, [])) }
        } else if index < k {
            source.withUnsafeMutableBytes { s in symbol.withUnsafeBytes { s.baseAddress!.advanced(by: index * symbolSize).copyMemory(from: $0.baseAddress!, byteCount: symbolSize) } }
        } else {
            repairs.append((index, Array(symbol)))
        }
        return true
    }

    /// Moves the held bytes to the spill and frees them (the block turns cold).
    mutating func evict(to spill: SymbolSpill, object: ObjectID, block: Int) throws(StorageError) {
        guard !isCold else { return }
        // One write for the k source slots (missing ones are zeros, overwritten if they arrive).
        try source.withUnsafeBytes { p in Result { () throws(StorageError) in try spill.write(object: object, block: block, index: 0, symbolSize: symbolSize, bytes: p) } }.get()
        for r in repairs {
            try r.bytes.withUnsafeBytes { p in Result { () throws(StorageError) in try spill.write(object: object, block: block, index: r.index, symbolSize: symbolSize, bytes: p) } }.get()
        }
        source = []
        repairs = repairs.map { ($0.index, []) }
        isCold = true
    }

    /// Brings a cold block's symbols back from the spill before decoding.
    mutating func reload(from spill: SymbolSpill, object: ObjectID, block: Int) throws(StorageError) {
        guard isCold else { return }
        var buffer = [UInt8](repeating: 0, count: k * symbolSize)
        // One read for the k source slots; the decoder ignores the missing ones.
        try buffer.withUnsafeMutableBytes { p in Result { () throws(StorageError) in try spill.read(object: object, block: block, index: 0, symbolSize: symbolSize, into: p) } }.get()
        source = buffer
        let lost = presentSources.filter { !$0 }.count
        var reloaded: [(index: Int, bytes: [UInt8])] = []
        for r in repairs.prefix(lost) {
            var bytes = [UInt8](repeating: 0, count: symbolSize)
            try bytes.withUnsafeMutableBytes { p in Result { () throws(StorageError) in try spill.read(object: object, block: block, index: r.index, symbolSize: symbolSize, into: p) } }.get()
            reloaded.append((r.index, bytes))
        }
        repairs = reloaded
        isCold = false
    }

    /// The k padded source symbols, rebuilding the lost ones.
    func decode(codec: ReedSolomonCodec) -> [UInt8] {
        precondition(!isCold, "reload a cold block before decoding it")
        precondition(isDecodable && source.count == k * symbolSize, "a block decodes from k symbols")
        guard presentSources.contains(false) else { return source }
        var block = source
        let lost = presentSources.filter { !$0 }.count
        let used = Array(repairs.prefix(lost))
        precondition(used.count == lost, "one repair symbol per lost source symbol")
        var packed = [UInt8]()
        packed.reserveCapacity(used.count * symbolSize)
        for r in used { packed += r.bytes }
        packed.withUnsafeBytes { p in
            let list = used.enumerated().map { (index: $0.element.index, bytes: UnsafeRawBufferPointer(rebasing: p[($0.offset * symbolSize)..<(($0.offset + 1) * symbolSize)])) }
            block.withUnsafeMutableBytes { b in
                try! codec.reconstruct(block: b, symbolSize: symbolSize, presentSources: presentSources, repairs: list)
            }
        }
        precondition(block.count == k * symbolSize, "decoding keeps the block's size")
        return block
    }
}

/// One object's blocks: which are done, and the incomplete ones, hot or cold.
struct ObjectState {
    let layout: ObjectLayout
    var done: [Bool]
    private(set) var doneCount = 0
    var partial: [Int: PartialBlock] = [:]
    /// Hot blocks in the order they were opened; the oldest is evicted first.
    /// Entries of blocks that decoded or went cold are skipped when reached.
    private var hotOrder: [Int] = []
    private var hotHead = 0
    private var hotCount = 0

    init(layout: ObjectLayout) {
        self.layout = layout
        done = [Bool](repeating: false, count: layout.blockCount)
    }

    /// Adds a symbol to its block's partial state, in place.
    mutating func add(block b: Int, index i: Int, symbol: ArraySlice<UInt8>, limit: Int, hotMax: Int, spill: SymbolSpill,
                      stats: inout ReceiverStats) throws(StorageError) -> AcceptOutcome {
        guard !done[b] else { return .blockDone }
        if partial[b] == nil {
            guard partial.count < limit else { return .tooManyBlocks }
            partial[b] = PartialBlock(k: layout.sourceSymbols(b), symbolCount: layout.symbolCount(b), symbolSize: layout.profile.symbolSize)
            hotOrder.append(b)
            hotCount += 1
            try evictIfNeeded(hotMax: hotMax, spill: spill, stats: &stats)
        }
        guard try partial[b]!.add(index: i, symbol: symbol, spill: spill, object: layout.object, block: b) else { return .duplicate }
        guard partial[b]!.isDecodable else { return .held }
        var p = partial.removeValue(forKey: b)!
        if p.isCold {
            try p.reload(from: spill, object: layout.object, block: b)
            spill.release(object: layout.object, block: b, symbolSize: layout.profile.symbolSize)
        } else { hotCount -= 1 }
        return .decodable(p)
    }

    mutating func markDone(_ b: Int) {
        guard !done[b] else { return }
        done[b] = true
        doneCount += 1
        dropPartial(b)
    }

    mutating func clear(_ b: Int) {
        if done[b] { done[b] = false; doneCount -= 1 }
        dropPartial(b)
    }

    private mutating func dropPartial(_ b: Int) {
        if let p = partial.removeValue(forKey: b), !p.isCold { hotCount -= 1 }
    }

    /// Specs/protocol.md P-5a: at most `hotMax` blocks hold their bytes in memory.
    private mutating func evictIfNeeded(hotMax: Int, spill: SymbolSpill, stats: inout ReceiverStats) throws(StorageError) {
        while hotCount > hotMax && hotHead < hotOrder.count {
            let b = hotOrder[hotHead]
            hotHead += 1
            guard var p = partial[b], !p.isCold else { continue }
            partial[b] = nil  // mutate outside the dictionary: no copy of the buffers
            try p.evict(to: spill, object: layout.object, block: b)
            partial[b] = p
            hotCount -= 1
            stats.blocksSpilled += 1
        }
        if hotHead > 4096 && hotHead * 2 > hotOrder.count {
            hotOrder.removeFirst(hotHead)
            hotHead = 0
        }
    }
}
