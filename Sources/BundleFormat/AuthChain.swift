import ErasureCoding
import FleetCrypto

/// How the payload is cut for transport (Specs/bundle.md §7.1), committed to
/// by the manifest so that every symbol can be authenticated on arrival.
public struct TransportProfile: Hashable, Sendable {
    public static let `default` = try! TransportProfile(symbolSize: 1400, sourceSymbolsPerBlock: 200, repairSymbolsPerBlock: 56)

    /// Bytes per symbol (one symbol per data datagram).
    public let symbolSize: Int
    /// k: source symbols per full block.
    public let sourceSymbolsPerBlock: Int
    /// R: the repair ceiling, repair symbols the sender may send per block.
    public let repairSymbolsPerBlock: Int

    public init(symbolSize: Int, sourceSymbolsPerBlock: Int, repairSymbolsPerBlock: Int) throws(BundleError) {
        guard (BundleLimits.symbolByteCountMin...BundleLimits.symbolByteCountMax).contains(symbolSize) else {
            throw BundleError(.malformed, "symbol size \(symbolSize) outside \(BundleLimits.symbolByteCountMin)...\(BundleLimits.symbolByteCountMax)")
        }
        guard sourceSymbolsPerBlock >= 1, repairSymbolsPerBlock >= 0,
              sourceSymbolsPerBlock + repairSymbolsPerBlock <= BundleLimits.symbolIndexCountMax else {
            throw BundleError(.malformed, "k = \(sourceSymbolsPerBlock), R = \(repairSymbolsPerBlock): need k >= 1, R >= 0, k + R <= 256")
        }
        // Specs/bundle.md B-13b: a block's k + R tags fill at most half of its k·T bytes, so
        // that carrying each segment's tags in the one before converges (AuthChainLayout).
        guard 2 * BundleLimits.symbolTagByteCount * (sourceSymbolsPerBlock + repairSymbolsPerBlock) <= symbolSize * sourceSymbolsPerBlock else {
            throw BundleError(.malformed, "T = \(symbolSize), k = \(sourceSymbolsPerBlock), R = \(repairSymbolsPerBlock): the \(sourceSymbolsPerBlock + repairSymbolsPerBlock) tags of a block (16 bytes each) must fill at most half of its \(symbolSize * sourceSymbolsPerBlock) bytes")
        }
        self.symbolSize = symbolSize
        self.sourceSymbolsPerBlock = sourceSymbolsPerBlock
        self.repairSymbolsPerBlock = repairSymbolsPerBlock
    }

    public var blockByteCount: Int { symbolSize * sourceSymbolsPerBlock }
}

/// Where the blocks of a payload lie. Every block holds k symbols except the
/// last, which holds `ceil(rest / symbolSize)`; its last symbol is zero-padded.
public struct BlockGeometry: Hashable, Sendable {
    public let payloadSize: UInt64
    public let profile: TransportProfile
    public let blockCount: Int

    public init(payloadSize: UInt64, profile: TransportProfile) {
        self.payloadSize = payloadSize
        self.profile = profile
        let blockBytes = UInt64(profile.blockByteCount)
        blockCount = Int((payloadSize + blockBytes - 1) / blockBytes)
    }

    /// Payload bytes of block `b` (before padding).
    public func byteRange(ofBlock b: Int) -> Range<UInt64> {
        precondition(b >= 0 && b < blockCount)
        let start = UInt64(b) * UInt64(profile.blockByteCount)
        return start..<min(start + UInt64(profile.blockByteCount), payloadSize)
    }

    /// k_b: source symbols in block `b`.
    public func sourceSymbols(inBlock b: Int) -> Int {
        let count = byteRange(ofBlock: b).count
        return (count + profile.symbolSize - 1) / profile.symbolSize
    }

    /// k_b + R: symbols the sender may ever send for block `b`.
    public func symbolCount(inBlock b: Int) -> Int { sourceSymbols(inBlock: b) + profile.repairSymbolsPerBlock }
}

/// What the manifest says of the authentication chain.
public struct AuthChainInfo: Hashable, Sendable {
    public var blocksPerSegment: Int
    public var segmentCount: Int
    /// SHA-256 of segment 0's span: the chain head the signature covers.
    public var head: [UInt8]
    public var tagLength: Int
    /// Bytes of all segment spans together (the auth-chain object).
    public var size: UInt64
    /// The tags of every symbol of segment 0's auth-chain blocks (Specs/bundle.md §7.3,
    /// B-13a): what authenticates the chain's first symbols on arrival.
    public var firstTags: [UInt8]
    public init(blocksPerSegment: Int, segmentCount: Int, head: [UInt8], tagLength: Int, size: UInt64, firstTags: [UInt8]) {
        self.blocksPerSegment = blocksPerSegment; self.segmentCount = segmentCount; self.head = head
        self.tagLength = tagLength; self.size = size; self.firstTags = firstTags
    }
}

/// The byte layout of the authentication chain, format 2 (Specs/bundle.md §7.3):
///
/// ```
/// segment j (its span: a whole number of auth-chain blocks, but for the last segment):
///   +--------+---------------+-------------+-------------+----------+
///   | "FLCS" | segment j u32 | first block | block count | reserved |
///   | 4      | 4             | u32         | u16         | u16 = 0  |
///   +--------+---------------+-------------+-------------+----------+
///   | record(first block) ... record(first block + count - 1)       |
///   +---------------------------------------------------------------+
///   | SHA-256 of segment j+1's span (32 bytes; zero in the last)    |
///   +---------------------------------------------------------------+
///   | chaintag of every symbol of segment j+1's auth-chain blocks   |
///   | (16 bytes each; none in the last segment)                     |
///   +---------------------------------------------------------------+
///   | zero padding to the end of the span (none in the last)        |
///   +---------------------------------------------------------------+
/// record(b) = block hash (32) || tag(b, 0) || ... || tag(b, k_b + R - 1), 16 bytes each
/// ```
///
/// A segment's span starts an auth-chain block, so each auth-chain block lies in one
/// segment and its symbols' tags can be carried by the segment before (B-13a). The
/// spans are computed from the last segment back: segment j's size depends on how
/// many blocks segment j+1 takes. The profile bounds the tags of a block to half of
/// it (`TransportProfile`), so the sizes settle after a segment or two.
public struct AuthChainLayout: Hashable, Sendable {
    public static let segmentHeaderByteCount = 16
    public static let segmentLinkByteCount = 32
    public static let blockHashByteCount = 32
    static let segmentMagic: [UInt8] = Array("FLCS".utf8)

    public let geometry: BlockGeometry
    public let blocksPerSegment: Int
    /// The first auth-chain block of each segment's span, and the block count after the last.
    private let spanStarts: [UInt32]
    /// Bytes of the last segment (its span is not padded).
    private let lastSegmentSize: Int
    /// Bytes of all spans: the auth-chain object's size.
    public let totalSize: UInt64

    public init(geometry: BlockGeometry, blocksPerSegment: Int) {
        precondition(blocksPerSegment >= 1)
        self.geometry = geometry
        self.blocksPerSegment = blocksPerSegment
        let profile = geometry.profile
        let blockBytes = profile.blockByteCount, symbolsPerBlock = profile.sourceSymbolsPerBlock + profile.repairSymbolsPerBlock
        let segmentCount = (geometry.blockCount + blocksPerSegment - 1) / blocksPerSegment
        guard segmentCount > 0 else { spanStarts = [0]; lastSegmentSize = 0; totalSize = 0; return }
        func recordBytes(_ j: Int) -> Int {
            let blocks = (j * blocksPerSegment)..<min((j + 1) * blocksPerSegment, geometry.blockCount)
            return blocks.reduce(0) { $0 + Self.blockHashByteCount + geometry.symbolCount(inBlock: $1) * BundleLimits.symbolTagByteCount }
        }
        // From the last segment back: its span's block count, and the symbols of those blocks.
        var spanBlocks = [UInt32](repeating: 0, count: segmentCount)
        let last = segmentCount - 1
        let lastSize = Self.segmentHeaderByteCount + recordBytes(last) + Self.segmentLinkByteCount
        let lastBlocks = (lastSize + blockBytes - 1) / blockBytes
        let lastShortSymbols = (lastSize - (lastBlocks - 1) * blockBytes + profile.symbolSize - 1) / profile.symbolSize
        spanBlocks[last] = UInt32(lastBlocks)
        var nextSymbols = (lastBlocks - 1) * symbolsPerBlock + lastShortSymbols + profile.repairSymbolsPerBlock
        for j in stride(from: last - 1, through: 0, by: -1) {
            let size = Self.segmentHeaderByteCount + recordBytes(j) + Self.segmentLinkByteCount + nextSymbols * BundleLimits.symbolTagByteCount
            let blocks = (size + blockBytes - 1) / blockBytes
            spanBlocks[j] = UInt32(blocks)
            nextSymbols = blocks * symbolsPerBlock
        }
        var starts = [UInt32](repeating: 0, count: segmentCount + 1)
        for j in 0..<segmentCount { starts[j + 1] = starts[j] + spanBlocks[j] }
        spanStarts = starts
        lastSegmentSize = lastSize
        totalSize = UInt64(starts[last]) * UInt64(blockBytes) + UInt64(lastSize)
    }

    public var segmentCount: Int { spanStarts.count - 1 }

    /// The packer's default segment length (Specs/bundle.md §7.4): the most payload
    /// blocks whose records, with the tags of one following block, fill one block of
    /// the chain object, so that a segment is one block and padding stays small
    /// (66 for the default profile, 56 for the compact one). At least 1.
    public static func defaultBlocksPerSegment(_ profile: TransportProfile) -> Int {
        let tags = (profile.sourceSymbolsPerBlock + profile.repairSymbolsPerBlock) * BundleLimits.symbolTagByteCount
        let room = profile.blockByteCount - segmentHeaderByteCount - segmentLinkByteCount - tags
        return min(max(room / (blockHashByteCount + tags), 1), BundleLimits.blocksPerSegmentMax)
    }

    public func recordSize(ofBlock b: Int) -> Int {
        Self.blockHashByteCount + geometry.symbolCount(inBlock: b) * BundleLimits.symbolTagByteCount
    }

    /// The payload blocks whose records segment j holds.
    public func blocks(inSegment j: Int) -> Range<Int> {
        precondition(j >= 0 && j < segmentCount)
        return (j * blocksPerSegment)..<min((j + 1) * blocksPerSegment, geometry.blockCount)
    }

    /// The blocks of the auth-chain object that segment j's span fills.
    public func authBlocks(inSegment j: Int) -> Range<Int> {
        precondition(j >= 0 && j < segmentCount)
        return Int(spanStarts[j])..<Int(spanStarts[j + 1])
    }

    /// The segment whose span holds auth-chain block m.
    public func segment(ofAuthBlock m: Int) -> Int {
        precondition(m >= 0 && m < Int(spanStarts[segmentCount]))
        var lo = 0, hi = segmentCount - 1
        while lo < hi {
            let mid = (lo + hi + 1) / 2
            if Int(spanStarts[mid]) <= m { lo = mid } else { hi = mid - 1 }
        }
        return lo
    }

    /// The auth-chain object's blocks, cut as the payload is (only the last is short).
    public var authGeometry: BlockGeometry { BlockGeometry(payloadSize: totalSize, profile: geometry.profile) }

    /// Symbols of segment j's auth-chain blocks, all sent: the chain tags that
    /// segment j-1 (or the manifest, for j = 0) carries for them.
    public func authSymbolCount(inSegment j: Int) -> Int {
        let auth = authGeometry
        return authBlocks(inSegment: j).reduce(0) { $0 + auth.symbolCount(inBlock: $1) }
    }

    /// Bytes of segment j before its padding: header, records, link, next tags.
    public func contentSize(_ j: Int) -> Int {
        precondition(j >= 0 && j < segmentCount)
        if j == segmentCount - 1 { return lastSegmentSize }
        return Self.segmentHeaderByteCount + blocks(inSegment: j).reduce(0) { $0 + recordSize(ofBlock: $1) }
            + Self.segmentLinkByteCount + authSymbolCount(inSegment: j + 1) * BundleLimits.symbolTagByteCount
    }

    /// Bytes of segment j's span, padding included: what its hash covers.
    public func segmentSize(_ j: Int) -> Int {
        precondition(j >= 0 && j < segmentCount)
        return j == segmentCount - 1 ? lastSegmentSize : authBlocks(inSegment: j).count * geometry.profile.blockByteCount
    }

    /// Offset of segment j's span in the chain.
    public func segmentOffset(_ j: Int) -> UInt64 {
        precondition(j >= 0 && j <= segmentCount)
        return j == segmentCount ? totalSize : UInt64(spanStarts[j]) * UInt64(geometry.profile.blockByteCount)
    }
}

/// The symbol and block authenticators (Specs/bundle.md §7.2, §7.3).
public enum BlockAuthentication {
    /// Which object a tag is over: the domains keep a payload symbol's tag from
    /// ever matching an auth-chain symbol's.
    public enum Domain: Sendable {
        /// "FLCT": payload symbols (§7.2).
        case payload
        /// "FLCA": auth-chain symbols (§7.3, B-13a).
        case authChain
        var prefix: [UInt8] { Array((self == .payload ? "FLCT" : "FLCA").utf8) }
    }
    static let blockDomain: [UInt8] = Array("FLCB".utf8)

    /// tag(b, i) = first 16 bytes of SHA-256(domain || u32 b || u8 i || symbol).
    public static func tag(_ domain: Domain = .payload, block: Int, symbol: Int, bytes: UnsafeRawBufferPointer) -> [UInt8] {
        let prefix = domain.prefix + bigEndian32(UInt32(block)) + [UInt8(symbol)]
        return Array(prefix.withUnsafeBytes { SHA256.hash($0, bytes) }.prefix(BundleLimits.symbolTagByteCount))
    }

    /// SHA-256("FLCB" || u32 b || the k_b padded source symbols).
    public static func blockHash(block: Int, paddedSource: UnsafeRawBufferPointer) -> [UInt8] {
        var h = SHA256()
        h.update(blockDomain)
        h.update(bigEndian32(UInt32(block)))
        h.update(paddedSource)
        return h.finalize()
    }

    /// The tags of all k_b + R symbols of block b, from its zero-padded source
    /// symbols (the repairs are encoded here), appended to `out`.
    public static func appendSymbolTags(_ domain: Domain, block: Int, paddedSource: UnsafeRawBufferPointer, profile: TransportProfile,
                                        codec: ReedSolomonCodec, scratch: inout [UInt8], to out: inout [UInt8]) {
        let size = profile.symbolSize
        let k = paddedSource.count / size
        precondition(k * size == paddedSource.count && codec.sourceCount == k)
        for i in 0..<k {
            out += tag(domain, block: block, symbol: i, bytes: UnsafeRawBufferPointer(rebasing: paddedSource[(i * size)..<((i + 1) * size)]))
        }
        let r = profile.repairSymbolsPerBlock
        guard r > 0 else { return }
        if scratch.count < r * size { scratch = [UInt8](repeating: 0, count: r * size) }
        scratch.withUnsafeMutableBytes { repairs in
            try! codec.encode(block: paddedSource, symbolSize: size, repairIndices: k..<(k + r), into: repairs)
            for n in 0..<r {
                out += tag(domain, block: block, symbol: k + n, bytes: UnsafeRawBufferPointer(rebasing: repairs[(n * size)..<((n + 1) * size)]))
            }
        }
    }

    /// Builds record(b) from the zero-padded source symbols of block b:
    /// the block hash, then the tags of all k_b + R symbols.
    public static func record(block: Int, paddedSource: UnsafeRawBufferPointer, profile: TransportProfile,
                              codec: ReedSolomonCodec, scratch: inout [UInt8]) -> [UInt8] {
        var out = blockHash(block: block, paddedSource: paddedSource)
        appendSymbolTags(.payload, block: block, paddedSource: paddedSource, profile: profile, codec: codec, scratch: &scratch, to: &out)
        return out
    }

    /// The chain tags of every symbol of the auth-chain blocks a span fills (B-13a):
    /// `span` holds whole blocks of the chain object from block `firstBlock` on, the
    /// last of them possibly short (the chain's end). `codecs` caches one per k.
    public static func chainTags(span: UnsafeRawBufferPointer, firstBlock: Int, profile: TransportProfile,
                                 codecs: inout [Int: ReedSolomonCodec], scratch: inout [UInt8]) -> [UInt8] {
        let blockBytes = profile.blockByteCount, size = profile.symbolSize
        var out: [UInt8] = []
        var padded = [UInt8](repeating: 0, count: blockBytes)
        var offset = 0, m = firstBlock
        while offset < span.count {
            let n = min(blockBytes, span.count - offset)
            let k = (n + size - 1) / size
            padded.withUnsafeMutableBytes { p in
                p.baseAddress!.copyMemory(from: span.baseAddress! + offset, byteCount: n)
                if k * size > n { (p.baseAddress! + n).initializeMemory(as: UInt8.self, repeating: 0, count: k * size - n) }
            }
            let codec: ReedSolomonCodec
            if let c = codecs[k] { codec = c } else { codec = try! ReedSolomonCodec(sourceCount: k); codecs[k] = codec }
            padded.withUnsafeBytes { p in
                appendSymbolTags(.authChain, block: m, paddedSource: UnsafeRawBufferPointer(rebasing: p[0..<(k * size)]),
                                 profile: profile, codec: codec, scratch: &scratch, to: &out)
            }
            offset += n
            m += 1
        }
        return out
    }
}

/// One parsed, not yet authenticated, segment of the chain (its whole span).
public struct AuthSegment: Sendable {
    public let index: Int
    public let blocks: Range<Int>
    public let nextHash: [UInt8]
    /// The chain tags of segment j+1's auth-chain symbols (empty in the last segment).
    public let nextTags: ArraySlice<UInt8>
    /// The span's bytes; records are sliced from them.
    public let bytes: [UInt8]
    private let recordOffsets: [Int]

    /// Parses segment `j`'s span and checks it against the layout: the header,
    /// the sizes, and padding that is all zero.
    public init(parsing bytes: [UInt8], index j: Int, layout: AuthChainLayout) throws(BundleError) {
        guard bytes.count == layout.segmentSize(j) else {
            throw BundleError(.sizeMismatch, "auth segment \(j): \(bytes.count) bytes, expected \(layout.segmentSize(j))")
        }
        let blocks = layout.blocks(inSegment: j)
        guard Array(bytes[0..<4]) == AuthChainLayout.segmentMagic,
              readBigEndian32(bytes, 4) == UInt32(j), readBigEndian32(bytes, 8) == UInt32(blocks.lowerBound),
              Int(bytes[12]) << 8 | Int(bytes[13]) == blocks.count, bytes[14] == 0, bytes[15] == 0 else {
            throw BundleError(.malformed, "auth segment \(j): header does not match the manifest's layout")
        }
        var offsets: [Int] = []
        var offset = AuthChainLayout.segmentHeaderByteCount
        for b in blocks { offsets.append(offset); offset += layout.recordSize(ofBlock: b) }
        let linkEnd = offset + AuthChainLayout.segmentLinkByteCount
        let contentEnd = layout.contentSize(j)
        guard bytes[contentEnd...].allSatisfy({ $0 == 0 }) else {
            throw BundleError(.malformed, "auth segment \(j): padding is not zero")
        }
        self.index = j
        self.blocks = blocks
        self.bytes = bytes
        self.recordOffsets = offsets
        self.nextHash = Array(bytes[offset..<linkEnd])
        self.nextTags = bytes[linkEnd..<contentEnd]
    }

    /// SHA-256 of the whole span: what the previous segment (or the manifest) commits to.
    public var hash: [UInt8] { SHA256.hash(bytes) }

    public func blockHash(_ b: Int) -> ArraySlice<UInt8> {
        let o = recordOffsets[b - blocks.lowerBound]
        return bytes[o..<(o + AuthChainLayout.blockHashByteCount)]
    }

    public func tag(block b: Int, symbol i: Int) -> ArraySlice<UInt8> {
        let o = recordOffsets[b - blocks.lowerBound] + AuthChainLayout.blockHashByteCount + i * BundleLimits.symbolTagByteCount
        return bytes[o..<(o + BundleLimits.symbolTagByteCount)]
    }

    /// Serialises segment j's span from its records, the next span's hash and the
    /// chain tags of its symbols, zero-padded to the layout's span size.
    public static func serialize(index j: Int, layout: AuthChainLayout, records: [UInt8], nextHash: [UInt8], nextTags: [UInt8]) -> [UInt8] {
        precondition(nextHash.count == 32)
        let blocks = layout.blocks(inSegment: j)
        var out = AuthChainLayout.segmentMagic + bigEndian32(UInt32(j)) + bigEndian32(UInt32(blocks.lowerBound))
        out += [UInt8(blocks.count >> 8), UInt8(blocks.count & 0xFF), 0, 0]
        out += records
        out += nextHash
        out += nextTags
        precondition(out.count == layout.contentSize(j), "segment \(j): content of \(out.count) bytes, layout says \(layout.contentSize(j))")
        out += [UInt8](repeating: 0, count: layout.segmentSize(j) - out.count)
        return out
    }
}

/// The chain tags of auth-chain block m's symbols within the tags that authenticate
/// its segment's span (`nextTags` of the segment before, or the manifest's `firstTags`).
public struct ChainTags: Sendable {
    public let segment: Int
    private let tags: ArraySlice<UInt8>
    /// Offset in `tags` of each auth-chain block of the segment, from its first.
    private let firstBlock: Int
    private let offsets: [Int]

    public init(segment j: Int, tags: ArraySlice<UInt8>, layout: AuthChainLayout) {
        precondition(tags.count == layout.authSymbolCount(inSegment: j) * BundleLimits.symbolTagByteCount)
        let auth = layout.authGeometry
        var offsets: [Int] = []
        var o = 0
        for m in layout.authBlocks(inSegment: j) { offsets.append(o); o += auth.symbolCount(inBlock: m) * BundleLimits.symbolTagByteCount }
        self.segment = j
        self.tags = tags
        self.firstBlock = layout.authBlocks(inSegment: j).lowerBound
        self.offsets = offsets
    }

    public func tag(authBlock m: Int, symbol i: Int) -> ArraySlice<UInt8> {
        let o = tags.startIndex + offsets[m - firstBlock] + i * BundleLimits.symbolTagByteCount
        return tags[o..<(o + BundleLimits.symbolTagByteCount)]
    }
}

@inline(__always) func bigEndian32(_ v: UInt32) -> [UInt8] {
    [UInt8(v >> 24), UInt8((v >> 16) & 0xFF), UInt8((v >> 8) & 0xFF), UInt8(v & 0xFF)]
}

@inline(__always) func bigEndian64(_ v: UInt64) -> [UInt8] {
    (0..<8).map { UInt8((v >> (56 - 8 * UInt64($0))) & 0xFF) }
}

@inline(__always) func readBigEndian32(_ b: [UInt8], _ o: Int) -> UInt32 {
    UInt32(b[o]) << 24 | UInt32(b[o + 1]) << 16 | UInt32(b[o + 2]) << 8 | UInt32(b[o + 3])
}

@inline(__always) func readBigEndian64(_ b: [UInt8], _ o: Int) -> UInt64 {
    (0..<8).reduce(UInt64(0)) { $0 << 8 | UInt64(b[o + $1]) }
}
