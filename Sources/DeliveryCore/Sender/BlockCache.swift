import BundleFormat
import ErasureCoding
import WireFormat

/// Where the sender reads the bytes of the two objects. A file-backed source
/// serves the real tool; an in-memory one serves the simulator.
public protocol ObjectSource {
    func read(object: ObjectID, range: Range<UInt64>) -> [UInt8]
}

/// Both objects held in memory.
public struct InMemoryObjects: ObjectSource, Sendable {
    public let authChain: [UInt8]
    public let payload: [UInt8]
    public init(authChain: [UInt8], payload: [UInt8]) { self.authChain = authChain; self.payload = payload }
    public func read(object: ObjectID, range: Range<UInt64>) -> [UInt8] {
        let bytes = object == .payload ? payload : authChain
        return Array(bytes[Int(range.lowerBound)..<Int(range.upperBound)])
    }
}

/// The blocks the sender has read and, once repair is asked of them, encoded
/// (Specs/protocol.md P-8): source symbols are read once per cache lifetime of
/// a block; repair symbols are encoded `repairRowsPerEncode` at a time as they
/// are first needed, so a pass without repair costs no encoding. Bounded in
/// blocks, oldest out first.
struct BlockCache {
    private struct Entry {
        let k: Int
        let source: [UInt8]
        /// R x T bytes, allocated on the first request for a repair symbol of the block;
        /// rows below `repairRowsEncoded` hold their symbols.
        var repairs: [UInt8] = []
        var repairRowsEncoded = 0
    }

    /// Repair symbols are encoded this many at a time, as they are first asked for:
    /// the first pass's proactive repair (10 of the default profile's 56) and a typical
    /// round's needs then cost a fraction of encoding all R.
    static let repairRowsPerEncode = 16

    private let source: any ObjectSource
    private let profile: TransportProfile
    /// Blocks held: `blockCacheBytesMax` over a block's k + R symbols, and at least two
    /// interleave windows so that the first pass never reads a block twice.
    private let blocksMax: Int
    private var entries: [BlockKey: Entry] = [:]
    private var order: [BlockKey] = []
    private var codecs: [Int: ReedSolomonCodec] = [:]

    init(source: any ObjectSource, profile t: TransportProfile, config: SenderConfig) {
        self.source = source
        profile = t
        blocksMax = max(2 * config.interleaveWindow,
                        config.blockCacheBytesMax / ((t.sourceSymbolsPerBlock + t.repairSymbolsPerBlock) * t.symbolSize))
    }

    /// Symbol `index` of block b of `layout`'s object.
    mutating func symbol(_ layout: ObjectLayout, block b: Int, index: Int) -> [UInt8] {
        let key = BlockKey(object: layout.object, block: b)
        let t = profile.symbolSize
        let k = layout.sourceSymbols(b), r = profile.repairSymbolsPerBlock
        if entries[key] == nil { load(layout, key: key, k: k) }
        if index < k { return Array(entries[key]!.source[(index * t)..<((index + 1) * t)]) }
        precondition(index < k + r, "repair index \(index) beyond the ceiling")
        let row = index - k
        if entries[key]!.repairRowsEncoded <= row { encode(key, upTo: row, k: k) }
        return Array(entries[key]!.repairs[(row * t)..<((row + 1) * t)])
    }

    private mutating func load(_ layout: ObjectLayout, key: BlockKey, k: Int) {
        let range = layout.geometry.byteRange(ofBlock: key.block)
        var padded = source.read(object: layout.object, range: range)
        padded += [UInt8](repeating: 0, count: k * profile.symbolSize - padded.count)
        if order.count >= blocksMax { entries[order.removeFirst()] = nil }
        entries[key] = Entry(k: k, source: padded)
        order.append(key)
    }

    private mutating func encode(_ key: BlockKey, upTo row: Int, k: Int) {
        let t = profile.symbolSize, r = profile.repairSymbolsPerBlock
        let codec = codecs[k] ?? (try! ReedSolomonCodec(sourceCount: k))
        codecs[k] = codec
        var block = entries[key]!
        entries[key] = nil  // mutate outside the dictionary: no copy of the buffers
        if block.repairs.isEmpty { block.repairs = [UInt8](repeating: 0, count: r * t) }
        while block.repairRowsEncoded <= row {
            let rows = block.repairRowsEncoded..<min(block.repairRowsEncoded + Self.repairRowsPerEncode, r)
            block.source.withUnsafeBytes { p in
                block.repairs.withUnsafeMutableBytes { out in
                    let slice = UnsafeMutableRawBufferPointer(rebasing: out[(rows.lowerBound * t)..<(rows.upperBound * t)])
                    try! codec.encode(block: p, symbolSize: t, repairIndices: (k + rows.lowerBound)..<(k + rows.upperBound), into: slice)
                }
            }
            block.repairRowsEncoded = rows.upperBound
        }
        entries[key] = block
    }
}
