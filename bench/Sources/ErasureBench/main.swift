// ISA-L Reed-Solomon throughput, through Fleetcast's ErasureCoding API.
//
//   ErasureBench [--seconds S] [--symbol-size T] k:m ...
//
// For each (k, m): encode m repair symbols per block; decode a block that
// lost m source symbols (the worst case) from m repairs, both with a fresh
// random loss pattern per block (matrix inversion each time, as under random
// loss) and with one repeated pattern (cached decode tables). Throughput is
// source bytes per second of wall time on one core, reported as MB/s (1e6).
import ErasureCoding
import SeededRandom
#if canImport(Glibc)
import Glibc
#endif


func seconds() -> Double {
    var t = timespec()
    clock_gettime(CLOCK_MONOTONIC, &t)
    return Double(t.tv_sec) + Double(t.tv_nsec) / 1e9
}

/// Runs `body` repeatedly for at least `budget` seconds; returns calls per second.
func measure(_ budget: Double, _ body: () -> Void) -> Double {
    for _ in 0..<3 { body() }
    var calls = 0
    let start = seconds()
    var elapsed = 0.0
    while elapsed < budget {
        for _ in 0..<16 { body() }
        calls += 16
        elapsed = seconds() - start
    }
    return Double(calls) / elapsed
}

var budget = 1.0
var symbolSize = 1400
var shapes: [(Int, Int)] = []
var args = Array(CommandLine.arguments.dropFirst())
while !args.isEmpty {
    let a = args.removeFirst()
    switch a {
    case "--seconds": budget = Double(args.removeFirst())!
    case "--symbol-size": symbolSize = Int(args.removeFirst())!
    default:
        let parts = a.split(separator: ":").compactMap { Int($0) }
        precondition(parts.count == 2, "shape must be k:m")
        shapes.append((parts[0], parts[1]))
    }
}
if shapes.isEmpty { shapes = [(64, 16), (128, 32)] }

print("| (k, m) | symbol | encode MB/s | decode, m lost, new pattern per block MB/s | decode, m lost, cached pattern MB/s | decode, 5% random loss MB/s |")
print("|---|---|---|---|---|---|")
for (k, m) in shapes {
    var rng = SeededRandom(seed: UInt64(k * 1000 + m))
    let codec = try! ReedSolomonCodec(sourceCount: k)
    let blockBytes = k * symbolSize
    let source = (0..<blockBytes).map { _ in UInt8.random(in: 0...255, using: &rng) }
    var repairs = [UInt8](repeating: 0, count: m * symbolSize)
    source.withUnsafeBytes { s in
        repairs.withUnsafeMutableBytes { r in try! codec.encode(block: s, symbolSize: symbolSize, repairIndices: k..<(k + m), into: r) }
    }
    let encodeRate = measure(budget) {
        source.withUnsafeBytes { s in
            repairs.withUnsafeMutableBytes { r in try! codec.encode(block: s, symbolSize: symbolSize, repairIndices: k..<(k + m), into: r) }
        }
    }
    var block = source
    let repairPointers = (0..<m).map { i in repairs.withUnsafeBytes { UnsafeRawBufferPointer(rebasing: $0[(i * symbolSize)..<((i + 1) * symbolSize)]) } }
    let repairList = repairPointers.enumerated().map { (index: k + $0.offset, bytes: $0.element) }
    func decode(lost: [Int]) {
        var present = [Bool](repeating: true, count: k)
        for l in lost { present[l] = false }
        block.withUnsafeMutableBytes { b in
            try! codec.reconstruct(block: b, symbolSize: symbolSize, presentSources: present, repairs: repairList)
        }
    }
    // Check once that decoding is right before timing it.
    let probe = Array((0..<k).shuffled(using: &rng).prefix(m))
    for l in probe { for i in 0..<symbolSize { block[l * symbolSize + i] = 0 } }
    decode(lost: probe)
    precondition(block == source, "decode is wrong")
    let patterns = (0..<64).map { _ in Array((0..<k).shuffled(using: &rng).prefix(m)).sorted() }
    var p = 0
    let freshRate = measure(budget) { decode(lost: patterns[p % patterns.count]); p += 1 }
    let cachedRate = measure(budget) { decode(lost: patterns[0]) }
    // Typical: each source symbol lost with probability 5% (at most m), new pattern each block.
    let typical = (0..<64).map { _ in Array((0..<k).filter { _ in Double.random(in: 0..<1, using: &rng) < 0.05 }.prefix(m)) }
    let typicalRate = measure(budget) { decode(lost: typical[p % typical.count]); p += 1 }
    // 64 patterns > the 32-entry cache, so "new pattern" always inverts.
    func mb(_ calls: Double) -> String { String(Int((calls * Double(blockBytes) / 1e6).rounded())) }
    print("| (\(k), \(m)) | \(symbolSize) | \(mb(encodeRate)) | \(mb(freshRate)) | \(mb(cachedRate)) | \(mb(typicalRate)) |")
}
