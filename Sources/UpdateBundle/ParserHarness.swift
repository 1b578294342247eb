import CBOR
import FleetCrypto

/// Feeds untrusted bytes to every parser of the bundle format. Used by the
/// libFuzzer target (Sources/FuzzBundle) and by the regression test that
/// replays every kept crasher and seed. It returns normally on any input:
/// a crash, hang or failed invariant here is a bug.
public enum ParserHarness {
    /// A fixed trusted key (Ed25519 seed 0x01...), so that envelopes signed
    /// by `seedEnvelope()` reach the manifest decoder through the verifier.
    public static let trustedKey = try! PrivateKey(raw: [UInt8](repeating: 1, count: 32), algorithm: .ed25519)

    public static func exercise(_ bytes: [UInt8]) {
        // 1. Strict CBOR: whatever is accepted is canonical.
        if let item = try? CBOR(decoding: bytes) {
            precondition(item.encoded() == bytes, "accepted non-canonical CBOR")
            if let sign1 = try? COSE.Sign1(item) { _ = sign1.verify(with: trustedKey.publicKey) }
        }
        // 2. Manifest: whatever is accepted round-trips to an equal manifest.
        if let manifest = try? Manifest(decoding: bytes) {
            precondition((try? Manifest(decoding: manifest.encoded())) == manifest, "manifest does not round-trip")
        }
        // 3. Envelope through the verifier with a fixed trusted key and device.
        _ = try? ManifestVerifier.verify(envelope: bytes, trust: TrustPolicy(trustedKeys: [trustedKey.publicKey]),
                                         device: DevicePolicy(now: 1_000, hardwareID: "hw", installedSequence: 0))
        // 4. Bundle header.
        if let header = try? BundleHeader(parsing: bytes) {
            precondition(header.encoded() == Array(bytes.prefix(BundleHeader.byteCount)), "header does not round-trip")
        }
        // 5. An authentication segment 0, under a layout chosen by the first bytes; with its
        // chain tags of segment 1's auth-chain blocks when there is a segment 1.
        if let layout = segmentLayout(bytes), let segment = try? AuthSegment(parsing: Array(bytes.dropFirst(4)), index: 0, layout: layout) {
            for b in segment.blocks {
                _ = segment.blockHash(b)
                _ = segment.tag(block: b, symbol: layout.geometry.symbolCount(inBlock: b) - 1)
            }
            if layout.segmentCount > 1 {
                let tags = ChainTags(segment: 1, tags: segment.nextTags, layout: layout)
                for m in layout.authBlocks(inSegment: 1) { _ = tags.tag(authBlock: m, symbol: layout.authGeometry.symbolCount(inBlock: m) - 1) }
            }
        }
    }

    /// The layout the first four bytes of a segment input choose: T, k, R, and the
    /// block count with the segment length.
    static func segmentLayout(_ bytes: [UInt8]) -> AuthChainLayout? {
        guard bytes.count >= 4, let profile = try? TransportProfile(symbolSize: 64 + Int(bytes[0] % 64), sourceSymbolsPerBlock: 1 + Int(bytes[1] % 16),
                                                                    repairSymbolsPerBlock: Int(bytes[2] % 8)) else { return nil }
        let blocks = 1 + Int(bytes[3] % 8)
        let geometry = BlockGeometry(payloadSize: UInt64(blocks * profile.blockByteCount - Int(bytes[3] / 8)), profile: profile)
        return AuthChainLayout(geometry: geometry, blocksPerSegment: 1 + Int(bytes[3] % 3))
    }

    /// Valid inputs to start fuzzing from: a signed envelope, its manifest,
    /// a bundle header and a segment, all made with fixed keys.
    public static func seeds() throws -> [String: [UInt8]] {
        let profile = try TransportProfile(symbolSize: 64, sourceSymbolsPerBlock: 2, repairSymbolsPerBlock: 1)
        let payloadLayout = AuthChainLayout(geometry: BlockGeometry(payloadSize: 100, profile: profile), blocksPerSegment: 1)
        let firstTags = [UInt8](repeating: 6, count: payloadLayout.authSymbolCount(inSegment: 0) * BundleLimits.symbolTagByteCount)
        let manifest = Manifest(
            productID: "p", hardwareIDs: ["hw"], version: "1", sequence: 1, createdAt: 1, expiresAt: 2_000,
            components: [.init(name: "a.img", size: 100, sha256: [UInt8](repeating: 7, count: 32), installTarget: "a")],
            payload: .init(compression: .zlib, size: 100, sha256: [UInt8](repeating: 8, count: 32), compressedSize: 100, uncompressedSize: 100),
            transport: profile,
            authentication: AuthChainInfo(blocksPerSegment: 1, segmentCount: 1, head: [UInt8](repeating: 9, count: 32), tagLength: 16,
                                          size: payloadLayout.totalSize, firstTags: firstTags),
            encryption: nil, bundleID: [UInt8](repeating: 3, count: 16), signerKeyIDs: [trustedKey.publicKey.keyID], signatureThreshold: 1)
        let manifestBytes = manifest.encoded()
        let envelope = try COSE.envelope(manifest: manifestBytes, keys: [trustedKey])
        // T = 64, k = 2, R = 1; 5 blocks, 2 a segment: segment 0 of three, carrying segment 1's tags.
        let prefix: [UInt8] = [0, 1, 1, 4]
        let layout = segmentLayout(prefix)!
        precondition(layout.segmentCount == 3)
        let records = [UInt8](repeating: 5, count: layout.blocks(inSegment: 0).reduce(0) { $0 + layout.recordSize(ofBlock: $1) })
        let nextTags = [UInt8](repeating: 4, count: layout.authSymbolCount(inSegment: 1) * BundleLimits.symbolTagByteCount)
        let segment = prefix + AuthSegment.serialize(index: 0, layout: layout, records: records, nextHash: [UInt8](repeating: 0, count: 32), nextTags: nextTags)
        return [
            "manifest.cbor": manifestBytes,
            "envelope.cbor": envelope,
            "header.bin": BundleHeader(envelopeLength: envelope.count, payloadLength: 100, authLength: payloadLayout.totalSize).encoded(),
            "segment.bin": segment,
        ]
    }
}
