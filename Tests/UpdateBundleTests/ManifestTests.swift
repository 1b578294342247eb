import CBOR
import Foundation
import FleetCrypto
import Testing
@testable import UpdateBundle

/// Manifest-level rejections, each under a valid signature so that only the
/// manifest's content is at fault.
@Suite("Manifest fields")
struct ManifestTests {
    let f = Fixture()

    func baseManifest() throws -> Manifest {
        let path = try f.pack()
        let (bytes, _) = try COSE.parseEnvelope(try UnverifiedBundle(path: path).envelope)
        return try Manifest(decoding: bytes)
    }

    /// Signs arbitrary manifest CBOR and runs the manifest verifier on it.
    func verify(cbor: CBOR) -> BundleError.Code? {
        failure {
            let envelope = try COSE.envelope(manifest: cbor.encoded(), keys: [f.signer])
            _ = try ManifestVerifier.verify(envelope: envelope, trust: f.trust, device: f.devicePolicy)
        }
    }

    func edit(_ m: Manifest, _ change: (inout [CBOR.Entry]) -> Void) -> CBOR {
        var entries = m.cbor().mapValue!
        change(&entries)
        return .map(entries)
    }

    @Test("The encoding round-trips and is canonical")
    func roundTrip() throws {
        let m = try baseManifest()
        #expect(try Manifest(decoding: m.encoded()) == m)
        #expect(verify(cbor: m.cbor()) == nil)
    }

    @Test("Unknown critical (non-negative) keys are refused; negative extension keys are ignored")
    func criticality() throws {
        let m = try baseManifest()
        #expect(verify(cbor: edit(m) { $0.append(.init(.int(99), .text("future"))) }) == .unknownCriticalField)
        #expect(verify(cbor: edit(m) { $0.append(.init(.int(-7), .text("vendor note"))) }) == nil)
        // Nested: an unknown key inside a component.
        #expect(verify(cbor: edit(m) { entries in
            let i = entries.firstIndex { $0.key == .int(8) }!
            var component = entries[i].value.arrayValue![0].mapValue!
            component.append(.init(.int(9), .bool(true)))
            entries[i].value = .array([.map(component)])
        }) == .unknownCriticalField)
    }

    @Test("Every required field, when missing, is refused", arguments: 1...15)
    func missing(key: Int) throws {
        let m = try baseManifest()
        let code = verify(cbor: edit(m) { $0.removeAll { $0.key == .int(key) } })
        #expect(code == .malformed, "without key \(key)")
    }

    @Test("Oversized, mistyped and inconsistent fields are refused")
    func oversized() throws {
        let m = try baseManifest()
        func set(_ key: Int, _ value: CBOR) -> CBOR {
            edit(m) { entries in entries[entries.firstIndex { $0.key == .int(key) }!].value = value }
        }
        #expect(verify(cbor: set(2, .text(String(repeating: "x", count: 257)))) == .malformed)
        #expect(verify(cbor: set(3, .array((0...64).map { .text("hw\($0)") }))) == .malformed)
        #expect(verify(cbor: set(3, .array([]))) == .malformed)
        #expect(verify(cbor: set(5, .text("7"))) == .malformed)
        #expect(verify(cbor: set(5, .int(-1))) == .malformed)
        #expect(verify(cbor: set(7, .unsigned(m.createdAt))) == .malformed)
        #expect(verify(cbor: set(13, .bytes([1, 2, 3]))) == .malformed)
        #expect(verify(cbor: set(15, .int(2))) == .malformed)  // threshold above the signer count
        var bigger = m
        bigger.components[0].size += 1  // sizes no longer add up
        #expect(verify(cbor: bigger.cbor()) == .malformed)
        var profile = m
        profile.payload.size += 1
        #expect(verify(cbor: profile.cbor()) == .malformed)
        var segments = m
        segments.authentication.segmentCount += 1
        #expect(verify(cbor: segments.cbor()) == .malformed)
        var unsafeName = m
        unsafeName.components[0].name = "../etc/passwd"
        #expect(verify(cbor: unsafeName.cbor()) == .malformed)
        #expect(verify(cbor: .array([])) == .malformed)
        #expect(failure { _ = try COSE.parseEnvelope([UInt8](repeating: 0x40, count: BundleLimits.envelopeByteCountMax + 1)) } == .malformed)
    }

    /// Issue 15, item 11: a signed manifest whose sizes were each within range implied
    /// 2^30 blocks, and a receiver allocated per-block arrays at join.
    @Test("A manifest whose size and profile imply more than blockCountMax blocks is refused (Specs/bundle.md B-6b)")
    func derivedBlockCountCapped() throws {
        let m = try baseManifest()
        func absurd(payloadBytes: UInt64) throws -> Manifest {
            var a = m
            a.encryption = nil
            a.payload.compression = .none
            a.payload.size = payloadBytes
            a.payload.compressedSize = payloadBytes
            a.payload.uncompressedSize = payloadBytes
            a.components = [a.components[0]]
            a.components[0].size = payloadBytes
            a.transport = try TransportProfile(symbolSize: 64, sourceSymbolsPerBlock: 1, repairSymbolsPerBlock: 1)
            let layout = AuthChainLayout(geometry: BlockGeometry(payloadSize: payloadBytes, profile: a.transport), blocksPerSegment: 1024)
            a.authentication.blocksPerSegment = 1024
            a.authentication.segmentCount = layout.segmentCount
            a.authentication.size = layout.totalSize
            a.authentication.firstTags = [UInt8](repeating: 0, count: layout.authSymbolCount(inSegment: 0) * BundleLimits.symbolTagByteCount)
            return a
        }
        // Consistent in every other way: at the limit it is accepted, one block over it is not.
        #expect(verify(cbor: try absurd(payloadBytes: UInt64(BundleLimits.blockCountMax) * 64).cbor()) == nil)
        #expect(verify(cbor: try absurd(payloadBytes: UInt64(BundleLimits.blockCountMax) * 64 + 1).cbor()) == .malformed)
        #expect(verify(cbor: try absurd(payloadBytes: BundleLimits.payloadByteCountMax).cbor()) == .malformed)
        let e = #expect(throws: BundleError.self) { _ = try Manifest(decoding: try absurd(payloadBytes: UInt64(BundleLimits.blockCountMax) * 64 + 1).encoded()) }
        #expect(e?.description.contains("blockCountMax") == true, "\(String(describing: e))")
    }

    @Test("Pack refuses a stored payload over blockCountMax blocks before reading it (Specs/bundle.md B-6b)")
    func packRefusesTooManyBlocks() throws {
        // Sparse: the refusal needs only the size.
        let big = f.dir.file("big.img")
        _ = FileManager.default.createFile(atPath: big, contents: nil)
        let handle = try #require(FileHandle(forWritingAtPath: big))
        try handle.truncate(atOffset: UInt64(BundleLimits.blockCountMax) * 64 + 1)
        try handle.close()
        let e = #expect(throws: BundleError.self) {
            _ = try f.pack {
                $0.components = [.init(name: "rootfs", path: big, installTarget: "rootfs")]
                $0.compression = .none
                $0.recipients = []
                $0.groupKeys = []
                $0.transport = try! TransportProfile(symbolSize: 64, sourceSymbolsPerBlock: 1, repairSymbolsPerBlock: 1)
            }
        }
        #expect(e?.code == .invalidInput && e?.description.contains("blockCountMax") == true, "\(String(describing: e))")
    }

    @Test("Transport profile limits")
    func profile() {
        #expect(failure { _ = try TransportProfile(symbolSize: 63, sourceSymbolsPerBlock: 8, repairSymbolsPerBlock: 0) } == .malformed)
        #expect(failure { _ = try TransportProfile(symbolSize: 1400, sourceSymbolsPerBlock: 200, repairSymbolsPerBlock: 57) } == .malformed)
        #expect(failure { _ = try TransportProfile(symbolSize: 1400, sourceSymbolsPerBlock: 0, repairSymbolsPerBlock: 1) } == .malformed)
        #expect(failure { _ = try TransportProfile(symbolSize: 1400, sourceSymbolsPerBlock: 200, repairSymbolsPerBlock: 56) } == nil)
        // B-13b: a block's tags fill at most half of it (64-byte symbols, k = 1: R = 1 fits, R = 2 does not).
        #expect(failure { _ = try TransportProfile(symbolSize: 64, sourceSymbolsPerBlock: 1, repairSymbolsPerBlock: 1) } == nil)
        #expect(failure { _ = try TransportProfile(symbolSize: 64, sourceSymbolsPerBlock: 1, repairSymbolsPerBlock: 2) } == .malformed)
    }

    /// Specs/bundle.md §7.3, B-13a: every span but the last is whole chain blocks, with less
    /// than a block of padding; each chain block lies in one span; segment j+1's chain tags
    /// are counted in segment j's content.
    @Test("Chain layout, format 2: spans on block boundaries, each chain block in one segment, tight padding")
    func spans() throws {
        for (t, k, r) in [(100, 10, 5), (64, 1, 1), (64, 2, 1), (1400, 64, 32), (1400, 200, 56)] {
            let profile = try TransportProfile(symbolSize: t, sourceSymbolsPerBlock: k, repairSymbolsPerBlock: r)
            for payload in [UInt64(1), 999, 1000, 1001, 12_345, 400_000, 3_000_000] {
                for perSegment in [1, 3, AuthChainLayout.defaultBlocksPerSegment(profile)] {
                    let layout = AuthChainLayout(geometry: BlockGeometry(payloadSize: payload, profile: profile), blocksPerSegment: perSegment)
                    let blockBytes = profile.blockByteCount, last = layout.segmentCount - 1
                    var nextBlock = 0
                    for j in 0...last {
                        let blocks = layout.authBlocks(inSegment: j)
                        #expect(blocks.lowerBound == nextBlock && !blocks.isEmpty)
                        #expect(layout.segmentOffset(j) == UInt64(blocks.lowerBound * blockBytes))
                        for m in [blocks.lowerBound, blocks.upperBound - 1] { #expect(layout.segment(ofAuthBlock: m) == j) }
                        let content = layout.contentSize(j), span = layout.segmentSize(j)
                        #expect(content <= span && (j == last ? content == span : span - content < blockBytes), "\(profile) \(payload) \(perSegment) segment \(j)")
                        let records = layout.blocks(inSegment: j).reduce(0) { $0 + layout.recordSize(ofBlock: $1) }
                        let tags = j == last ? 0 : layout.authSymbolCount(inSegment: j + 1) * BundleLimits.symbolTagByteCount
                        #expect(content == 16 + records + 32 + tags)
                        nextBlock = blocks.upperBound
                    }
                    #expect(nextBlock == layout.authGeometry.blockCount && layout.segmentOffset(last + 1) == layout.totalSize)
                }
            }
        }
        // The packer's default: one chain block a segment for the named profiles.
        #expect(AuthChainLayout.defaultBlocksPerSegment(.default) == 66)
        #expect(AuthChainLayout.defaultBlocksPerSegment(try TransportProfile(symbolSize: 1400, sourceSymbolsPerBlock: 64, repairSymbolsPerBlock: 32)) == 56)
    }

    @Test("Chain layout: offsets and sizes agree for short last blocks and segments")
    func layout() throws {
        let profile = try TransportProfile(symbolSize: 100, sourceSymbolsPerBlock: 10, repairSymbolsPerBlock: 5)
        for payload in [UInt64(1), 999, 1000, 1001, 12_345, 40_000] {
            let layout = AuthChainLayout(geometry: BlockGeometry(payloadSize: payload, profile: profile), blocksPerSegment: 3)
            var offset: UInt64 = 0
            for j in 0..<layout.segmentCount {
                #expect(layout.segmentOffset(j) == offset, "payload \(payload) segment \(j)")
                offset += UInt64(layout.segmentSize(j))
            }
            #expect(offset == layout.totalSize)
            let g = layout.geometry
            #expect((0..<g.blockCount).reduce(UInt64(0)) { $0 + UInt64(g.byteRange(ofBlock: $1).count) } == payload)
        }
    }

    /// Specs/bundle.md B-6a: `x.partial` is the temporary of `x`; a component of that
    /// name could be clobbered by it or taken for it.
    @Test("A component name that collides with a temporary (x beside x.partial) is refused by pack and by decoding")
    func temporaryNameCollision() throws {
        #expect(failure { _ = try f.pack { $0.components.append(.init(name: "rootfs.img.partial", path: f.imagePath, installTarget: "data")) } } == .invalidInput)
        #expect(failure { _ = try f.pack { $0.components[0].name = "boot.partial" } } == .invalidInput)
        let m = try baseManifest()
        #expect(verify(cbor: edit(m) { entries in
            let i = entries.firstIndex { $0.key == .int(8) }!
            var component = entries[i].value.arrayValue![0].mapValue!
            let n = component.firstIndex { $0.key == .int(1) }!
            component[n].value = .text("rootfs.img.partial")
            entries[i].value = .array([.map(component)])
        }) == .malformed)
        #expect(Manifest.isSafeComponentName("rootfs.partial.img") && !Manifest.isSafeComponentName(".partial"))
    }
}
