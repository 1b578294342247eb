import CBOR
import Testing

private func hex(_ s: String) -> [UInt8] {
    var out: [UInt8] = []
    var chars = Array(s.filter { !$0.isWhitespace })
    while !chars.isEmpty { out.append(UInt8(String(chars.prefix(2)), radix: 16)!); chars.removeFirst(2) }
    return out
}

@Suite("Deterministic CBOR")
struct CBORTests {
    /// RFC 8949 Appendix A examples that are in deterministic form.
    static let vectors: [(CBOR, String)] = [
        (.unsigned(0), "00"), (.unsigned(23), "17"), (.unsigned(24), "1818"), (.unsigned(100), "1864"),
        (.unsigned(1000), "1903e8"), (.unsigned(1_000_000), "1a000f4240"),
        (.unsigned(1_000_000_000_000), "1b000000e8d4a51000"), (.unsigned(UInt64.max), "1bffffffffffffffff"),
        (.int(-1), "20"), (.int(-10), "29"), (.int(-100), "3863"), (.int(-1000), "3903e7"),
        (.negative(UInt64.max), "3bffffffffffffffff"),
        (.bool(false), "f4"), (.bool(true), "f5"), (.null, "f6"),
        (.bytes([]), "40"), (.bytes([1, 2, 3, 4]), "4401020304"),
        (.text(""), "60"), (.text("a"), "6161"), (.text("IETF"), "6449455446"), (.text("ü"), "62c3bc"),
        (.text("水"), "63e6b0b4"),
        (.array([]), "80"), (.array([.int(1), .int(2), .int(3)]), "83010203"),
        (.array([.int(1), .array([.int(2), .int(3)]), .array([.int(4), .int(5)])]), "8301820203820405"),
        (.map([]), "a0"), (.intMap([(1, .int(2)), (3, .int(4))]), "a201020304"),
        (.map([.init(.text("a"), .int(1)), .init(.text("b"), .array([.int(2), .int(3)]))]), "a26161016162820203"),
        (.tagged(1, .unsigned(1_363_896_240)), "c11a514b67b0"),
        (.tagged(18, .array([.bytes([]), .map([]), .null, .bytes([0xAA])])), "d28440a0f641aa"),
    ]

    @Test("RFC 8949 Appendix A vectors encode and decode exactly")
    func vectorsRoundTrip() throws {
        for (item, encoding) in Self.vectors {
            #expect(item.encoded() == hex(encoding), "encode \(item)")
            #expect(try CBOR(decoding: hex(encoding)) == item, "decode \(encoding)")
        }
    }

    @Test("Map keys are sorted bytewise by the encoder (RFC 8949 §4.2.1)")
    func sorting() throws {
        let unsorted = CBOR.map([.init(.text("aa"), .int(0)), .init(.int(-1), .int(1)), .init(.int(10), .int(2)), .init(.int(100), .int(3)), .init(.text("b"), .int(4))])
        // 0a < 1864 < 20 < 6162 < 626161
        #expect(unsorted.encoded() == hex("a5 0a02 186403 2001 616204 62616100"))
    }

    @Test("Non-deterministic and unsupported encodings are rejected", arguments: [
        ("1817", CBORError.Code.notDeterministic),   // 23 in two bytes
        ("190017", .notDeterministic),               // non-shortest
        ("5f4101ff", .notDeterministic),             // indefinite byte string
        ("9fff", .notDeterministic),                 // indefinite array
        ("a201010101", .duplicateKey),               // {1:1, 1:1}
        ("a202010102", .notDeterministic),           // keys 2 then 1
        ("f93c00", .unsupported),                    // half float 1.0
        ("fb3ff199999999999a", .unsupported),        // double
        ("f7", .unsupported),                        // undefined
        ("1c", .unsupported),                        // reserved info 28
        ("62c328", .invalidUTF8),
        ("0000", .trailingBytes),
        ("", .truncated), ("18", .truncated), ("44010203", .truncated), ("828100", .truncated),
        ("8201", .tooLarge),                         // claims more items than bytes left
        ("9a7fffffff", .tooLarge),                   // huge array claim, tiny input
        ("5b00000001000000004142", .truncated),      // huge string claim
    ])
    func rejections(encoding: String, code: CBORError.Code) {
        #expect(throws: CBORError(code, at: 0, "")) { try CBOR(decoding: hex(encoding)) }
    }

    @Test("Nesting beyond the depth limit is rejected, not a stack overflow")
    func depth() {
        let deep = [UInt8](repeating: 0x81, count: 100_000) + [0x00]
        #expect(throws: CBORError(.tooDeep, at: 0, "")) { try CBOR(decoding: deep) }
        let ok = [UInt8](repeating: 0x81, count: 16) + [0x00]
        #expect(throws: Never.self) { try CBOR(decoding: ok) }
    }

    @Test("Random mutations of a valid item never crash", arguments: [1, 2, 3])
    func mutationsDoNotCrash(seed: UInt64) {
        var state = seed
        func next() -> UInt64 { state = state &* 6364136223846793005 &+ 1442695040888963407; return state >> 33 }
        let base = CBOR.intMap([(1, .text("fleetcast")), (2, .array([.bytes([1, 2, 3]), .int(-500)])), (3, .tagged(18, .null))]).encoded()
        for _ in 0..<5000 {
            var m = base
            for _ in 0..<(1 + Int(next() % 3)) { m[Int(next()) % m.count] = UInt8(truncatingIfNeeded: next()) }
            if next() % 4 == 0 { m.removeLast(Int(next()) % m.count) }
            if let item = try? CBOR(decoding: m) { #expect(item.encoded() == m, "accepted bytes must be canonical") }
        }
    }
}
