import SeededRandom
import Testing
import WireFormat

private func hex(_ s: String) -> [UInt8] {
    var out: [UInt8] = []
    var chars = Array(s.filter { !$0.isWhitespace })
    while !chars.isEmpty { out.append(UInt8(String(chars.prefix(2)), radix: 16)!); chars.removeFirst(2) }
    return out
}

let session = SessionID(0xA1B2_C3D4)
let receiver = ReceiverID(0x0102_0304_0506_0708)
let cookie = FeedbackCookie(Array(0x10...0x1F))
let cookieHex = "101112131415161718191a1b1c1d1e1f"
let chainHex = "202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f"

/// One of each datagram, with the golden bytes that Specs/protocol.md §3 implies,
/// and the byte offsets of its reserved fields.
let samples: [(name: String, datagram: Datagram, golden: String, reserved: [Int])] = [
    ("announce", .announce(Announce(session: session, feedbackFamily: .ipv4, carousel: true, feedbackPort: 0x1F90,
                                    feedbackAddress: [198, 18, 0, 1] + [UInt8](repeating: 0, count: 12), rateKilobytesPerSecond: 125_000,
                                    grttMicroseconds: 10_000, groupSize: 16, interleaveWindow: 8, fragmentIndex: 1, fragmentCount: 2,
                                    envelopeLength: 1027, root: [UInt8](repeating: 0xAB, count: 32), path: [[UInt8](repeating: 0xCD, count: 32)],
                                    fragment: [0xAA, 0xBB, 0xCC])),
     "02010000 a1b2c3d4 04 01 1f90 c6120001 000000000000000000000000 0001e848 00002710 00000010 0008 0001 0002 0000 00000403 "
     + String(repeating: "ab", count: 32) + " 01 " + String(repeating: "cd", count: 32) + " aabbcc",
     [2, 3, 46, 47]),
    ("data", .data(DataSymbol(session: session, object: .payload, block: 0x0102_0304, symbolIndex: 200, pendingRepair: 0x0105, symbol: [1, 2, 3, 4])),
     "02020000 a1b2c3d4 02 c8 0105 01020304 01020304", [2, 3]),
    ("poll", .poll(Poll(session: session, round: 3, sentAtMicroseconds: 0x1122_3344_5566_7788, grttMicroseconds: 2500, groupSize: 1000,
                        chainValue: Array(0x20...0x3F))),
     "02030000 a1b2c3d4 00000003 1122334455667788 000009c4 000003e8 \(chainHex)", [2, 3]),
    ("close", .close(Close(session: session, reason: .idle, round: 4, chainValue: Array(0x20...0x3F))),
     "02040000 a1b2c3d4 02 000000 00000004 \(chainHex)", [2, 3, 9, 10, 11]),
    ("register", .register(Register(session: session, receiver: receiver, cookie: cookie, installedSequence: 41, deviceID: "dev-1", version: "1.0")),
     "02050000 a1b2c3d4 0102030405060708 \(cookieHex) 0000000000000029 05 6465762d31 03 312e30", [2, 3]),
    // A REGISTER asking for a cookie (Specs/protocol.md P-30): the cookie's bytes are zero.
    ("register-no-cookie", .register(Register(session: session, receiver: receiver, installedSequence: 41, deviceID: "", version: "")),
     "02050000 a1b2c3d4 0102030405060708 00000000000000000000000000000000 0000000000000029 00 00", [2, 3]),
    ("nack", .nack(Nack(session: session, receiver: receiver, cookie: cookie, round: 2, echoedSentAtMicroseconds: 99, holdMicroseconds: 1500,
                        entries: [.init(object: .payload, block: 7, needed: 3), .init(object: .authChain, block: 0, needed: 1)])),
     "02060000 a1b2c3d4 0102030405060708 \(cookieHex) 00000002 0000000000000063 000005dc 0002 0000 02 03 0000 00000007 01 01 0000 00000000",
     [2, 3, 50, 51, 54, 55, 62, 63]),
    ("status", .status(Status(session: session, receiver: receiver, cookie: cookie, state: .failed, reason: .rollback, blocksDone: 5, blocksTotal: 9,
                              bytesReceived: 123_456, nacksSent: 4)),
     "02070000 a1b2c3d4 0102030405060708 \(cookieHex) 03 03 0000 00000005 00000009 000000000001e240 00000004", [2, 3, 34, 35]),
    ("ack", .ack(Ack(session: session, receiver: receiver, cookie: cookie, state: .complete)),
     "02080000 a1b2c3d4 0102030405060708 \(cookieHex) 02 000000", [2, 3, 33, 34, 35]),
    // A device agent's final report after its reboot (Specs/protocol.md P-21b).
    ("status-rolled-back", .status(Status(session: session, receiver: receiver, cookie: cookie, state: .rolledBack, reason: .unhealthy, blocksDone: 9,
                                          blocksTotal: 9, bytesReceived: 0, nacksSent: 0)),
     "02070000 a1b2c3d4 0102030405060708 \(cookieHex) 08 0b 0000 00000009 00000009 0000000000000000 00000000", [2, 3, 34, 35]),
    // Specs/protocol.md §3.9: never larger than the smallest REGISTER it answers (42 bytes).
    ("cookie", .cookie(Cookie(session: session, receiver: receiver, cookie: cookie)), "02090000 a1b2c3d4 0102030405060708 \(cookieHex)", [2, 3]),
    // Specs/protocol.md §3.10 (a 3-byte delegation and a 2-byte signature, for brevity).
    ("session", .session(SessionRecord(session: session, number: 7, carousel: false, feedbackFamily: .ipv4, feedbackPort: 0x1F90,
                                       feedbackAddress: [198, 18, 0, 1] + [UInt8](repeating: 0, count: 12), interleaveWindow: 8, envelopeLength: 1027,
                                       envelopeRoot: [UInt8](repeating: 0xEE, count: 32), chainRound: 2, chainValue: Array(0x20...0x3F), chainLastRound: 65536,
                                       delegation: [1, 2, 3], signature: [9, 9])),
     "020a0000 a1b2c3d4 00000007 00 04 1f90 c6120001000000000000000000000000 0008 0000 00000403 "
     + String(repeating: "ee", count: 32) + " 00000002 \(chainHex) 00010000 0003 010203 02 0909", [2, 3, 34, 35]),
]

@Suite("Datagrams (Specs/protocol.md §3)")
struct DatagramTests {
    @Test("Golden bytes and round trip", arguments: samples.map(\.name))
    func golden(name: String) throws {
        let s = samples.first { $0.name == name }!
        #expect(s.datagram.encoded() == hex(s.golden))
        #expect(try Datagram(parsing: hex(s.golden)) == s.datagram)
    }

    @Test("Truncated at every offset is refused", arguments: samples.map(\.name))
    func truncated(name: String) {
        let bytes = samples.first { $0.name == name }!.datagram.encoded()
        for length in 0..<bytes.count {
            // DATA's symbol is "the rest": a DATA cut inside the symbol is a shorter symbol,
            // refused by the receiver against T (P-1); the header must still be whole.
            if name == "data" && length > DataSymbol.headerByteCount { continue }
            #expect(throws: WireFormatError.self, "\(name) cut to \(length)") { try Datagram(parsing: Array(bytes.prefix(length))) }
        }
    }

    @Test("Every reserved bit set is refused", arguments: samples.map(\.name))
    func reservedBits(name: String) {
        let s = samples.first { $0.name == name }!
        let bytes = s.datagram.encoded()
        for offset in s.reserved {
            for bit in 0..<8 {
                var b = bytes
                b[offset] |= 1 << bit
                #expect(throws: WireFormatError(.reservedNotZero, ""), "\(name) byte \(offset) bit \(bit)") { try Datagram(parsing: b) }
            }
        }
    }

    @Test("Trailing bytes, bad version, unknown type", arguments: samples.map(\.name))
    func framing(name: String) {
        let bytes = samples.first { $0.name == name }!.datagram.encoded()
        if name != "data" {
            #expect(throws: WireFormatError.self) { try Datagram(parsing: bytes + [0]) }
        }
        var v = bytes
        v[0] = 1  // version 1 had no cookies
        #expect(throws: WireFormatError(.badVersion, "")) { try Datagram(parsing: v) }
        var t = bytes
        t[1] = 11
        #expect(throws: WireFormatError(.unknownType, "")) { try Datagram(parsing: t) }
    }

    @Test("Invalid fields are refused")
    func invalidFields() {
        func refuses(_ golden: String, _ change: (inout [UInt8]) -> Void) {
            var b = hex(golden)
            change(&b)
            #expect(throws: WireFormatError.self) { try Datagram(parsing: b) }
        }
        let announce = samples[0].golden, nack = samples[6].golden, status = samples[7].golden
        refuses(announce) { $0[8] = 5 }                    // address family
        refuses(announce) { $0[43] = 2 }                   // fragment index 2 of 2
        refuses(announce) { $0[40] = 0; $0[41] = 0 }       // interleave window 0
        refuses(announce) { $0[51] = 0xFF }                // envelope length vs fragment count
        refuses(announce) { $0[84] = 9 }                   // a path longer than 256 fragments need
        refuses(samples[1].golden) { $0[8] = 3 }           // object 3
        refuses(nack) { $0[49] = 0 }                       // zero entries
        refuses(nack) { $0[48] = 0; $0[49] = 129 }         // too many entries
        refuses(nack) { $0[53] = 0 }                       // needs 0 symbols
        refuses(status) { $0[33] = 0 }                     // failed without a reason
        refuses(status) { $0[32] = 8; $0[33] = 0 }         // rolled back without a reason
        refuses(status) { $0[32] = 7 }                     // confirmed with a reason
        refuses(status) { $0[32] = 5 }                     // installed with a reason
        refuses(status) { $0[32] = 9 }                     // state 9
        refuses(status) { $0[33] = 17 }                    // reason 17
        refuses(samples[4].golden) { $0[40] = 65 }         // device ID longer than 64
        refuses(samples[samples.count - 2].golden) { b in for i in 16..<32 { b[i] = 0 } }  // a COOKIE without a cookie
        let record = samples.last!.golden
        refuses(record) { $0[32] = 0; $0[33] = 0 }         // interleave window 0
        refuses(record) { $0[13] = 5 }                     // address family
        refuses(record) { $0[72] = 0xFF }                  // chain round beyond its last
        refuses(record) { $0[12] = 2 }                     // a flag not defined
    }

    @Test("Random bytes never crash the parser; accepted bytes re-encode identically")
    func randomBytes() {
        var rng = SeededRandom(seed: 0xDA7A)
        for _ in 0..<20_000 {
            var b = samples[Int(rng.next() % UInt64(samples.count))].datagram.encoded()
            for _ in 0..<(1 + Int(rng.next() % 4)) { b[Int(rng.next() % UInt64(b.count))] = UInt8(truncatingIfNeeded: rng.next()) }
            if let d = try? Datagram(parsing: b) { #expect(d.encoded() == b, "seed 0xDA7A") }
        }
    }

    @Test("Envelope fragmentation covers the envelope exactly")
    func fragments() throws {
        for length in [1, 1023, 1024, 1025, 3000] {
            let envelope = (0..<length).map { UInt8(truncatingIfNeeded: $0) }
            let parts = Announce.fragments(of: envelope)
            #expect(parts.flatMap(\.bytes) == envelope)
            for p in parts {
                let a = Announce(session: session, rateKilobytesPerSecond: 1, grttMicroseconds: 1, groupSize: 1, interleaveWindow: 1,
                                 fragmentIndex: p.index, fragmentCount: p.count, envelopeLength: UInt32(length), fragment: p.bytes)
                #expect(try Datagram(parsing: Datagram.announce(a).encoded()) == .announce(a))
            }
        }
    }
}
