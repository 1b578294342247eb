import ErasureCoding
import SeededRandom
import Testing

typealias SeededGenerator = SeededRandom

/// Scalar reference: GF(2^8) with polynomial x^8+x^4+x^3+x^2+1 (0x11D), by
/// shift-and-add, and the code of Specs/bundle.md §7.2 written from the spec.
enum Reference {
    static func mul(_ a: UInt8, _ b: UInt8) -> UInt8 {
        var a = UInt16(a), b = b, p: UInt16 = 0
        while b != 0 {
            if b & 1 != 0 { p ^= a }
            a <<= 1
            if a & 0x100 != 0 { a ^= 0x11D }
            b >>= 1
        }
        return UInt8(p)
    }
    static func inv(_ a: UInt8) -> UInt8 {
        precondition(a != 0)
        for x in 1...255 where mul(a, UInt8(x)) == 1 { return UInt8(x) }
        fatalError("no inverse")
    }
    static func coefficient(_ i: Int, _ j: Int) -> UInt8 { i < 256 && j < i ? inv(UInt8(i ^ j)) : 0 }

    /// Symbol `index` of a block, computed byte by byte.
    static func symbol(_ index: Int, sources: [[UInt8]]) -> [UInt8] {
        if index < sources.count { return sources[index] }
        var out = [UInt8](repeating: 0, count: sources[0].count)
        for (j, s) in sources.enumerated() {
            let c = coefficient(index, j)
            for b in 0..<out.count { out[b] ^= mul(c, s[b]) }
        }
        return out
    }
}

func randomSources(k: Int, size: Int, rng: inout SeededGenerator) -> [[UInt8]] {
    (0..<k).map { _ in (0..<size).map { _ in UInt8.random(in: 0...255, using: &rng) } }
}

func isalRepairs(_ codec: ReedSolomonCodec, sources: [[UInt8]], range: Range<Int>) throws -> [[UInt8]] {
    let size = sources[0].count
    let block = sources.flatMap { $0 }
    var out = [UInt8](repeating: 0, count: range.count * size)
    try block.withUnsafeBytes { b in
        try out.withUnsafeMutableBytes { o in try codec.encode(block: b, symbolSize: size, repairIndices: range, into: o) }
    }
    return (0..<range.count).map { Array(out[$0 * size..<($0 + 1) * size]) }
}

/// Decodes from the given symbol indices; returns the rebuilt sources.
func decode(_ codec: ReedSolomonCodec, sources: [[UInt8]], using indices: [Int]) throws -> [[UInt8]] {
    let k = sources.count, size = sources[0].count
    var block = [UInt8](repeating: 0xEE, count: k * size)
    var present = [Bool](repeating: false, count: k)
    var repairs: [[UInt8]] = []
    var repairIndices: [Int] = []
    for i in indices {
        if i < k {
            present[i] = true
            block.replaceSubrange(i * size..<(i + 1) * size, with: sources[i])
        } else {
            repairs.append(Reference.symbol(i, sources: sources))
            repairIndices.append(i)
        }
    }
    try block.withUnsafeMutableBytes { b in
        let pointers = repairs.map { r in r.withUnsafeBytes { UnsafeRawBufferPointer(start: UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 16).initializeMemory(as: UInt8.self, from: Array($0), count: size), count: size) } }
        defer { pointers.forEach { $0.deallocate() } }
        let list = zip(repairIndices, pointers).map { (index: $0, bytes: $1) }
        try codec.reconstruct(block: b, symbolSize: size, presentSources: present, repairs: list)
    }
    return (0..<k).map { Array(block[$0 * size..<($0 + 1) * size]) }
}

@Suite("Reed-Solomon on ISA-L against the scalar reference")
struct ReedSolomonTests {
    @Test("Coefficients are 1/(i XOR j) in GF(2^8)/0x11D")
    func coefficients() {
        for (i, j) in [(1, 0), (64, 0), (64, 63), (100, 7), (255, 254), (255, 0)] {
            #expect(ReedSolomonCodec.coefficient(repair: i, source: j) == Reference.coefficient(i, j))
        }
    }

    @Test("Repair symbols equal the reference", arguments: [(1, 1, 16), (4, 3, 17), (64, 16, 1400), (128, 32, 1400), (200, 56, 33)])
    func encodeMatchesReference(k: Int, r: Int, size: Int) throws {
        var rng = SeededGenerator(seed: UInt64(k * 1000 + r))
        let sources = randomSources(k: k, size: size, rng: &rng)
        let codec = try ReedSolomonCodec(sourceCount: k)
        let repairs = try isalRepairs(codec, sources: sources, range: k..<(k + r))
        for (n, repair) in repairs.enumerated() { #expect(repair == Reference.symbol(k + n, sources: sources), "repair \(k + n)") }
        // A sub-range gives the same symbols (tables for another range).
        let tail = try isalRepairs(codec, sources: sources, range: (k + r - 1)..<(k + r))
        #expect(tail[0] == repairs.last)
    }

    @Test("Every 3-subset of 8 symbols decodes (k = 3, R = 5): the code is MDS")
    func exhaustiveSmall() throws {
        var rng = SeededGenerator(seed: 7)
        let sources = randomSources(k: 3, size: 16, rng: &rng)
        let codec = try ReedSolomonCodec(sourceCount: 3)
        for a in 0..<8 { for b in (a + 1)..<8 { for c in (b + 1)..<8 {
            #expect(try decode(codec, sources: sources, using: [a, b, c]) == sources, "subset \([a, b, c])")
        } } }
    }

    @Test("Random loss patterns decode, seeded", arguments: [(64, 16), (128, 32), (10, 245)])
    func randomLoss(k: Int, r: Int) throws {
        let seed = UInt64(0xF1EE7 + k)
        var rng = SeededGenerator(seed: seed)
        let sources = randomSources(k: k, size: 64, rng: &rng)
        let codec = try ReedSolomonCodec(sourceCount: k)
        for trial in 0..<25 {
            let all = Array(0..<(k + r)).shuffled(using: &rng)
            let chosen = Array(all.prefix(k))
            #expect(try decode(codec, sources: sources, using: chosen) == sources, "seed \(seed) trial \(trial)")
        }
    }

    @Test("Too few symbols and bad parameters are errors with reasons")
    func errors() throws {
        #expect(throws: ErasureCodingError(.invalidParameters, "")) { try ReedSolomonCodec(sourceCount: 0) }
        #expect(throws: ErasureCodingError(.invalidParameters, "")) { try ReedSolomonCodec(sourceCount: 256) }
        var rng = SeededGenerator(seed: 3)
        let sources = randomSources(k: 4, size: 16, rng: &rng)
        let codec = try ReedSolomonCodec(sourceCount: 4)
        #expect(throws: ErasureCodingError(.notEnoughSymbols, "")) { try decode(codec, sources: sources, using: [0, 1, 5]) }
        #expect(throws: ErasureCodingError(.invalidParameters, "")) { try isalRepairs(codec, sources: sources, range: 250..<257) }
    }
}
