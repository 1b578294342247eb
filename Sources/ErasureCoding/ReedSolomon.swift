import CISAL

/// Why a block could not be encoded or decoded.
public struct ErasureCodingError: Error, Hashable, CustomStringConvertible, Sendable {
    public enum Code: String, Sendable { case invalidParameters, notEnoughSymbols, singularMatrix }
    public let code: Code
    public let reason: String
    public init(_ code: Code, _ reason: String) { self.code = code; self.reason = reason }
    public static func == (a: Self, b: Self) -> Bool { a.code == b.code }
    public func hash(into h: inout Hasher) { h.combine(code) }
    public var description: String { "\(code.rawValue): \(reason)" }
}

/// Systematic Reed-Solomon over GF(2^8) (polynomial 0x11D), on Intel ISA-L.
///
/// Symbol `i < k` of a block is source symbol `i` itself. Symbol `i >= k` is
/// the repair symbol `sum_j c(i, j) * source_j` with the Cauchy coefficient
/// `c(i, j) = 1 / (i XOR j)` (Specs/bundle.md §7.2). This is exactly the lower
/// part of ISA-L's `gf_gen_cauchy1_matrix`; every square submatrix of a Cauchy
/// matrix is invertible, so *any* k distinct symbols of the 256 decode the
/// block (the code is MDS for every k + R <= 256).
///
/// Decoding inverts only the e x e submatrix that maps the e lost source
/// symbols to the e repair symbols used (never the whole k x k matrix), then
/// lets ISA-L's SIMD dot products rebuild the lost symbols. Encode tables are
/// cached per repair range; decode tables per loss pattern, in a bounded cache.
///
/// Not thread-safe: one codec per thread (tables are mutable caches).
public final class ReedSolomonCodec {
    /// Symbol indices are one byte on the wire and in the matrix: k + R <= 256.
    public static let symbolIndexCountMax = 256
    /// ISA-L's vector kernels need at least 16 bytes per symbol.
    public static let symbolByteCountMin = 16
    /// Decode tables kept for repeated loss patterns (a carousel repeats them), at most
    /// this many and this many bytes: a table is 32·k·e bytes, up to 358 KB for k = 200
    /// and e = 56, and random loss rarely repeats a pattern.
    public static let decodeCacheEntryCountMax = 32
    public static let decodeCacheByteCountMax = 1 << 20

    public let sourceCount: Int
    private var encodeTables: [Range<Int>: [UInt8]] = [:]
    private var decodeCache: [DecodeKey: [UInt8]] = [:]
    private var decodeCacheOrder: [DecodeKey] = []
    private var decodeCacheBytes = 0

    private struct DecodeKey: Hashable {
        var lost: [UInt8]
        var repairs: [UInt8]
    }

    public init(sourceCount: Int) throws(ErasureCodingError) {
        guard sourceCount >= 1, sourceCount < Self.symbolIndexCountMax else {
            throw ErasureCodingError(.invalidParameters, "source symbols per block must be 1...255, got \(sourceCount)")
        }
        self.sourceCount = sourceCount
    }

    /// The coefficient of source symbol `source` in repair symbol `repair`.
    @inline(__always)
    public static func coefficient(repair: Int, source: Int) -> UInt8 {
        precondition(repair < symbolIndexCountMax && source < repair)
        return inverses[repair ^ source]
    }

    /// 1/x in GF(2^8), from ISA-L's own arithmetic (index 0 unused).
    static let inverses: [UInt8] = (0..<256).map { $0 == 0 ? 0 : gf_inv(UInt8($0)) }
    /// a * b at [a << 8 | b]: 64 KiB, so building a decode matrix costs table
    /// lookups instead of a C call per term.
    static let products: [UInt8] = {
        var table = [UInt8](repeating: 0, count: 65536)
        for a in 0..<256 { for b in 0..<256 { table[a << 8 | b] = gf_mul(UInt8(a), UInt8(b)) } }
        return table
    }()

    /// Computes the repair symbols `repairIndices` of one block.
    ///
    /// - `block`: the k source symbols back to back, `k * symbolSize` bytes.
    /// - `output`: room for `repairIndices.count * symbolSize` bytes.
    public func encode(block: UnsafeRawBufferPointer, symbolSize: Int, repairIndices: Range<Int>,
                       into output: UnsafeMutableRawBufferPointer) throws(ErasureCodingError) {
        let k = sourceCount
        guard symbolSize >= Self.symbolByteCountMin else {
            throw ErasureCodingError(.invalidParameters, "symbol size \(symbolSize) below \(Self.symbolByteCountMin)")
        }
        guard repairIndices.lowerBound >= k, repairIndices.upperBound <= Self.symbolIndexCountMax else {
            throw ErasureCodingError(.invalidParameters, "repair indices \(repairIndices) outside \(k)..<256")
        }
        precondition(block.count == k * symbolSize, "block must hold exactly k symbols")
        precondition(output.count >= repairIndices.count * symbolSize, "output too small")
        guard !repairIndices.isEmpty else { return }
        let tables = encodeTables[repairIndices] ?? {
            var matrix = [UInt8]()
            matrix.reserveCapacity(repairIndices.count * k)
            for i in repairIndices { for j in 0..<k { matrix.append(Self.coefficient(repair: i, source: j)) } }
            let t = Self.tables(k: k, rows: repairIndices.count, matrix: &matrix)
            encodeTables[repairIndices] = t
            return t
        }()
        let sources = (0..<k).map { UnsafeMutablePointer(mutating: block.baseAddress!.assumingMemoryBound(to: UInt8.self) + $0 * symbolSize) as UnsafeMutablePointer<UInt8>? }
        let outputs = (0..<repairIndices.count).map { output.baseAddress!.assumingMemoryBound(to: UInt8.self) + $0 * symbolSize as UnsafeMutablePointer<UInt8>? }
        Self.run(tables: tables, length: symbolSize, k: k, inputs: sources, outputs: outputs)
    }

    /// Rebuilds the lost source symbols of one block in place.
    ///
    /// - `block`: `k * symbolSize` bytes; the symbols flagged in
    ///   `presentSources` hold their data, the others are overwritten.
    /// - `repairs`: received repair symbols (index >= k, distinct). The first
    ///   e of them are used, where e is the number of lost source symbols.
    public func reconstruct(block: UnsafeMutableRawBufferPointer, symbolSize: Int, presentSources: [Bool],
                            repairs: [(index: Int, bytes: UnsafeRawBufferPointer)]) throws(ErasureCodingError) {
        let k = sourceCount
        precondition(presentSources.count == k && block.count == k * symbolSize)
        let lost = (0..<k).filter { !presentSources[$0] }
        guard !lost.isEmpty else { return }
        guard repairs.count >= lost.count else {
            throw ErasureCodingError(.notEnoughSymbols, "\(lost.count) source symbols lost, \(repairs.count) repair symbols held")
        }
        let used = Array(repairs.prefix(lost.count))
        var seen = Set<Int>()
        for r in used {
            guard r.index >= k, r.index < Self.symbolIndexCountMax, seen.insert(r.index).inserted else {
                throw ErasureCodingError(.invalidParameters, "repair index \(r.index) invalid or repeated")
            }
            precondition(r.bytes.count == symbolSize)
        }
        let present = (0..<k).filter { presentSources[$0] }
        let key = DecodeKey(lost: lost.map(UInt8.init), repairs: used.map { UInt8($0.index) })
        let tables: [UInt8]
        if let cached = decodeCache[key] {
            tables = cached
        } else {
            tables = try decodeTables(lost: lost, present: present, repairIndices: used.map(\.index), key: key)
        }

        let base = block.baseAddress!.assumingMemoryBound(to: UInt8.self)
        var inputs = present.map { base + $0 * symbolSize as UnsafeMutablePointer<UInt8>? }
        inputs += used.map { UnsafeMutablePointer(mutating: $0.bytes.baseAddress!.assumingMemoryBound(to: UInt8.self)) as UnsafeMutablePointer<UInt8>? }
        let outputs = lost.map { base + $0 * symbolSize as UnsafeMutablePointer<UInt8>? }
        Self.run(tables: tables, length: symbolSize, k: k, inputs: inputs, outputs: outputs)
    }

    /// Builds the e x k decode matrix: lost = Cinv * (repairs - C_present * present).
    private func decodeTables(lost: [Int], present: [Int], repairIndices: [Int], key: DecodeKey) throws(ErasureCodingError) -> [UInt8] {
        let e = lost.count
        var c = [UInt8](repeating: 0, count: e * e)
        for r in 0..<e { for l in 0..<e { c[r * e + l] = Self.coefficient(repair: repairIndices[r], source: lost[l]) } }
        var inverse = [UInt8](repeating: 0, count: e * e)
        guard gf_invert_matrix(&c, &inverse, Int32(e)) == 0 else {
            throw ErasureCodingError(.singularMatrix, "Cauchy submatrix not invertible (cannot happen for distinct indices)")
        }
        // Columns: present sources first, then the e repairs (the input order of `reconstruct`).
        // Row l over the present sources is sum_r Cinv[l][r] * C[r][present]: accumulate
        // whole rows of C, scaled by one table row per (l, r).
        let p = present.count
        var presentRows = [UInt8](repeating: 0, count: e * p)
        for r in 0..<e { for (column, s) in present.enumerated() { presentRows[r * p + column] = Self.coefficient(repair: repairIndices[r], source: s) } }
        var matrix = [UInt8](repeating: 0, count: e * sourceCount)
        Self.products.withUnsafeBufferPointer { mul in
            presentRows.withUnsafeBufferPointer { rows in
                matrix.withUnsafeMutableBufferPointer { out in
                    for l in 0..<e {
                        let row = out.baseAddress! + l * sourceCount
                        for r in 0..<e {
                            let scale = mul.baseAddress! + Int(inverse[l * e + r]) << 8
                            let source = rows.baseAddress! + r * p
                            for column in 0..<p { row[column] ^= scale[Int(source[column])] }
                            row[p + r] = inverse[l * e + r]
                        }
                    }
                }
            }
        }
        let tables = Self.tables(k: sourceCount, rows: e, matrix: &matrix)
        guard tables.count <= Self.decodeCacheByteCountMax else { return tables }
        while decodeCacheOrder.count == Self.decodeCacheEntryCountMax || decodeCacheBytes + tables.count > Self.decodeCacheByteCountMax {
            decodeCacheBytes -= decodeCache.removeValue(forKey: decodeCacheOrder.removeFirst())?.count ?? 0
        }
        decodeCache[key] = tables
        decodeCacheOrder.append(key)
        decodeCacheBytes += tables.count
        return tables
    }

    private static func tables(k: Int, rows: Int, matrix: inout [UInt8]) -> [UInt8] {
        var tables = [UInt8](repeating: 0, count: 32 * k * rows)
        ec_init_tables(Int32(k), Int32(rows), &matrix, &tables)
        return tables
    }

    private static func run(tables: [UInt8], length: Int, k: Int,
                            inputs: [UnsafeMutablePointer<UInt8>?], outputs: [UnsafeMutablePointer<UInt8>?]) {
        var tables = tables
        var inputs = inputs
        var outputs = outputs
        ec_encode_data(Int32(length), Int32(k), Int32(outputs.count), &tables, &inputs, &outputs)
    }
}
