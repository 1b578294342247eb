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
    /// SHA-256 of segment 0: the chain head the signature covers.
    public var head: [UInt8]
    public var tagLength: Int
    /// Bytes of all segments together.
    public var size: UInt64
    public init(blocksPerSegment: Int, segmentCount: Int, head: [UInt8], tagLength: Int, size: UInt64) {
        self.blocksPerSegment = blocksPerSegment; self.segmentCount = segmentCount; self.head = head
        self.tagLength = tagLength; self.size = size
    }
}

/// The byte layout of the authentication chain (Specs/bundle.md §7.3):
///
/// ```
/// segment j:
///   +--------+---------------+-------------+-------------+----------+
///   | "FLCS" | segment j u32 | first block | block count | reserved |
///   | 4      | 4             | u32         | u16         | u16 = 0  |
///   +--------+---------------+-------------+-------------+----------+
///   | record(first block) ... record(first block + count - 1)       |
///   +---------------------------------------------------------------+
///   | SHA-256 of segment j+1 (32 bytes; zero in the last segment)   |
///   +---------------------------------------------------------------+
/// record(b) = block hash (32) || tag(b, 0) || ... || tag(b, k_b + R - 1), 16 bytes each
/// ```
public struct AuthChainLayout: Hashable, Sendable {
    public static let segmentHeaderByteCount = 16
    public static let segmentTrailerByteCount = 32
    public static let blockHashByteCount = 32
    static let segmentMagic: [UInt8] = Array("FLCS".utf8)

    public let geometry: BlockGeometry
    public let blocksPerSegment: Int

    public init(geometry: BlockGeometry, blocksPerSegment: Int) {
        precondition(blocksPerSegment >= 1)
        self.geometry = geometry
        self.blocksPerSegment = blocksPerSegment
    }

    public var segmentCount: Int { (geometry.blockCount + blocksPerSegment - 1) / blocksPerSegment }

    public func recordSize(ofBlock b: Int) -> Int {
        Self.blockHashByteCount + geometry.symbolCount(inBlock: b) * BundleLimits.symbolTagByteCount
    }

    public func blocks(inSegment j: Int) -> Range<Int> {
        precondition(j >= 0 && j < segmentCount)
        return (j * blocksPerSegment)..<min((j + 1) * blocksPerSegment, geometry.blockCount)
    }

    public func segmentSize(_ j: Int) -> Int {
        Self.segmentHeaderByteCount + blocks(inSegment: j).reduce(0) { $0 + recordSize(ofBlock: $1) } + Self.segmentTrailerByteCount
    }

    /// Offset of segment j in the chain. Only the last block is short, so all
    /// segments but the last have the size of segment 0.
    public func segmentOffset(_ j: Int) -> UInt64 {
        precondition(j >= 0 && j <= segmentCount)
        return j == segmentCount ? totalSize : UInt64(j) * UInt64(segmentSize(0))
    }

    public var totalSize: UInt64 {
        segmentCount == 0 ? 0 : UInt64(segmentCount - 1) * UInt64(segmentSize(0)) + UInt64(segmentSize(segmentCount - 1))
    }
}

/// The symbol and block authenticators (Specs/bundle.md §7.2).
public enum BlockAuthentication {
    static let tagDomain: [UInt8] = Array("FLCT".utf8)
    static let blockDomain: [UInt8] = Array("FLCB".utf8)

    /// tag(b, i) = first 16 bytes of SHA-256("FLCT" || u32 b || u8 i || symbol).
    public static func tag(block: Int, symbol: Int, bytes: UnsafeRawBufferPointer) -> [UInt8] {
        let prefix = tagDomain + bigEndian32(UInt32(block)) + [UInt8(symbol)]
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

    /// Builds record(b) from the zero-padded source symbols of block b:
    /// the block hash, then the tags of all k_b + R symbols (repairs encoded here).
    public static func record(block: Int, paddedSource: UnsafeRawBufferPointer, profile: TransportProfile,
                              codec: ReedSolomonCodec, scratch: inout [UInt8]) -> [UInt8] {
        let size = profile.symbolSize
        let k = paddedSource.count / size
        precondition(k * size == paddedSource.count && codec.sourceCount == k)
        var out = blockHash(block: block, paddedSource: paddedSource)
        for i in 0..<k {
            out += tag(block: block, symbol: i, bytes: UnsafeRawBufferPointer(rebasing: paddedSource[(i * size)..<((i + 1) * size)]))
        }
        let r = profile.repairSymbolsPerBlock
        guard r > 0 else { return out }
        if scratch.count < r * size { scratch = [UInt8](repeating: 0, count: r * size) }
        scratch.withUnsafeMutableBytes { repairs in
            try! codec.encode(block: paddedSource, symbolSize: size, repairIndices: k..<(k + r), into: repairs)
            for n in 0..<r {
                out += tag(block: block, symbol: k + n, bytes: UnsafeRawBufferPointer(rebasing: repairs[(n * size)..<((n + 1) * size)]))
            }
        }
        return out
    }
}

/// One parsed, not yet authenticated, segment of the chain.
public struct AuthSegment: Sendable {
    public let index: Int
    public let blocks: Range<Int>
    public let nextHash: [UInt8]
    /// The segment's bytes; records are sliced from them.
    public let bytes: [UInt8]
    private let recordOffsets: [Int]

    /// Parses segment `j` and checks its header against the layout.
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
        self.index = j
        self.blocks = blocks
        self.bytes = bytes
        self.recordOffsets = offsets
        self.nextHash = Array(bytes[offset...])
    }

    /// SHA-256 of the whole segment: what the previous segment (or the manifest) commits to.
    public var hash: [UInt8] { SHA256.hash(bytes) }

    public func blockHash(_ b: Int) -> ArraySlice<UInt8> {
        let o = recordOffsets[b - blocks.lowerBound]
        return bytes[o..<(o + AuthChainLayout.blockHashByteCount)]
    }

    public func tag(block b: Int, symbol i: Int) -> ArraySlice<UInt8> {
        let o = recordOffsets[b - blocks.lowerBound] + AuthChainLayout.blockHashByteCount + i * BundleLimits.symbolTagByteCount
        return bytes[o..<(o + BundleLimits.symbolTagByteCount)]
    }

    /// Serialises segment j from its records and the next segment's hash.
    public static func serialize(index j: Int, blocks: Range<Int>, records: [UInt8], nextHash: [UInt8]) -> [UInt8] {
        precondition(nextHash.count == 32)
        var out = AuthChainLayout.segmentMagic + bigEndian32(UInt32(j)) + bigEndian32(UInt32(blocks.lowerBound))
        out += [UInt8(blocks.count >> 8), UInt8(blocks.count & 0xFF), 0, 0]
        return out + records + nextHash
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
