#if canImport(Glibc)
import Glibc
#endif
import ErasureCoding
import FleetCrypto

/// Everything step A needs to build a software update data set.
public struct PackRequest: Sendable {
    public struct ComponentSource: Sendable {
        public var name: String
        public var path: String
        public var installTarget: String
        public init(name: String, path: String, installTarget: String) {
            self.name = name; self.path = path; self.installTarget = installTarget
        }
    }

    public var productID: String
    public var hardwareIDs: [String]
    public var version: String
    public var sequence: UInt64
    public var createdAt: UInt64
    public var expiresAt: UInt64
    public var components: [ComponentSource]
    public var compression: Manifest.Compression = .zlib
    /// zlib level 1...9; 6 is zlib's default trade-off.
    public var compressionLevel: Int32 = 6
    public var transport: TransportProfile = .default
    /// Payload blocks per auth-chain segment; nil: the most that fit one block of the
    /// chain object with the next segment's tags (Specs/bundle.md §7.4).
    public var blocksPerSegment: Int?
    /// Device public keys (P-256 or X25519) that may decrypt; with group keys, empty means plaintext.
    public var recipients: [PublicKey] = []
    public var groupKeys: [GroupKey] = []
    public var encryptionChunkSize = 64 * 1024
    public var signingKeys: [PrivateKey]
    /// Further authorised signers (keys that will co-sign elsewhere); the signing keys are always listed.
    public var additionalSignerKeyIDs: [[UInt8]] = []
    public var signatureThreshold = 1

    public init(productID: String, hardwareIDs: [String], version: String, sequence: UInt64, createdAt: UInt64,
                expiresAt: UInt64, components: [ComponentSource], signingKeys: [PrivateKey]) {
        self.productID = productID; self.hardwareIDs = hardwareIDs; self.version = version; self.sequence = sequence
        self.createdAt = createdAt; self.expiresAt = expiresAt; self.components = components; self.signingKeys = signingKeys
    }

    public var encrypted: Bool { !recipients.isEmpty || !groupKeys.isEmpty }
}

/// Step A: streams component files through zlib, AES-256-GCM chunks and the
/// block authenticator into one bundle file, in one pass over the input and
/// with memory bounded by a few blocks, whatever the image size.
public enum Packer {
    public static let readChunkByteCount = 1 << 20

    @discardableResult
    public static func pack(_ request: PackRequest, to outputPath: String,
                            random: (Int) throws(CryptoError) -> [UInt8] = SecureRandom.bytes,
                            progress: ((_ done: UInt64, _ total: UInt64) -> Void)? = nil) throws(BundleError) -> Manifest {
        try validate(request)
        let bundleID: [UInt8]
        let contentKey: [UInt8]?
        do {
            bundleID = try random(16)
            contentKey = request.encrypted ? try random(ContentEncryption.contentKeyByteCount) : nil
        } catch { throw BundleError(.invalidInput, "no randomness: \(error)") }

        // Scratch files and the temporary bundle live beside the output, reached under the
        // directory's descriptor: never through a link, never clobbering (B-3).
        let directory = try SafeDirectory(path: Self.directory(of: outputPath))
        let outputName = String(outputPath.split(separator: "/", omittingEmptySubsequences: false).last ?? "")
        guard !outputName.isEmpty, outputName != ".", outputName != ".." else { throw BundleError(.invalidInput, "'\(outputPath)' names a directory, not a bundle file") }
        let payloadFile = try directory.scratch("fleetcast-scratch")
        let recordsFile = try directory.scratch("fleetcast-scratch")
        let transfer = try TransferSink(payload: payloadFile, records: recordsFile, profile: request.transport)
        let sealer: ChunkSealer? = if let contentKey {
            try ChunkSealer(key: contentKey, bundleID: bundleID, chunkSize: request.encryptionChunkSize, next: transfer)
        } else { nil }
        var compressedSize: UInt64 = 0
        let afterCompression = { (bytes: UnsafeRawBufferPointer) throws(BundleError) in
            compressedSize += UInt64(bytes.count)
            if let sealer { try sealer.consume(bytes) } else { try transfer.consume(bytes) }
        }
        let deflater: ZlibStream? = request.compression == .zlib ? try ZlibStream(.deflate(level: request.compressionLevel)) : nil

        // Pass 1: components -> hash -> compress -> encrypt -> blocks and records.
        var components: [Manifest.Component] = []
        var total: UInt64 = 0
        var sizes: [UInt64] = []
        for source in request.components {
            let file = try File.open(reading: source.path)
            let size = try file.size
            sizes.append(size)
            total += size
        }
        // B-6b, before any work: stored (or barely compressible) input must fit the block limit.
        let blockBytes = UInt64(request.transport.blockByteCount)
        if request.compression == .none, (total + blockBytes - 1) / blockBytes > UInt64(BundleLimits.blockCountMax) {
            throw BundleError(.invalidInput, "\(total) bytes make more than \(BundleLimits.blockCountMax) blocks of \(blockBytes) bytes (blockCountMax): use a larger symbol size or more symbols per block")
        }
        var done: UInt64 = 0
        var buffer = [UInt8](repeating: 0, count: readChunkByteCount)
        for (index, source) in request.components.enumerated() {
            let file = try File.open(reading: source.path)
            var hash = SHA256()
            var size: UInt64 = 0
            while true {
                let n = try file.read(into: &buffer, count: readChunkByteCount)
                if n == 0 { break }
                size += UInt64(n)
                let result = buffer.withUnsafeBytes { b in
                    Result { () throws(BundleError) in
                        let piece = UnsafeRawBufferPointer(rebasing: b[0..<n])
                        hash.update(piece)
                        if let deflater { try deflater.process(piece, finish: false, sink: afterCompression) } else { try afterCompression(piece) }
                    }
                }
                try result.get()
                done += UInt64(n)
                progress?(done, total)
            }
            guard size == sizes[index] else { throw BundleError(.io, "\(source.path) changed size while being packed") }
            components.append(Manifest.Component(name: source.name, size: size, sha256: hash.finalize(), installTarget: source.installTarget))
        }
        if let deflater { try deflater.process(UnsafeRawBufferPointer(start: nil, count: 0), finish: true, sink: afterCompression) }
        guard compressedSize > 0 else { throw BundleError(.invalidInput, "nothing to pack: the components are empty") }
        try sealer?.finish()
        try transfer.finish()

        // Pass 2 (over the small records): the chain, hashed from the last segment back.
        let geometry = BlockGeometry(payloadSize: transfer.payloadSize, profile: request.transport)
        precondition(geometry.blockCount == transfer.blockCount)
        guard geometry.blockCount <= BundleLimits.blockCountMax else {
            throw BundleError(.invalidInput, "the payload makes \(geometry.blockCount) blocks of \(blockBytes) bytes, more than \(BundleLimits.blockCountMax) (blockCountMax): use a larger symbol size or more symbols per block")
        }
        let blocksPerSegment = request.blocksPerSegment ?? AuthChainLayout.defaultBlocksPerSegment(request.transport)
        let layout = AuthChainLayout(geometry: geometry, blocksPerSegment: blocksPerSegment)
        // Specs/bundle.md B-13a: segment j carries the hash and the chain tags of segment j+1's
        // span, so the spans are built from the last back; each one's tags are kept (about
        // 4 KB a segment with the default profile) for the segment before and the manifest.
        var segmentHashes = [[UInt8]](repeating: [], count: layout.segmentCount)
        var segmentTags = [[UInt8]](repeating: [], count: layout.segmentCount)
        var codecs: [Int: ReedSolomonCodec] = [:]
        var tagScratch: [UInt8] = []
        for j in stride(from: layout.segmentCount - 1, through: 0, by: -1) {
            let last = j == layout.segmentCount - 1
            let segment = try segmentBytes(j, layout: layout, records: recordsFile,
                                           nextHash: last ? [UInt8](repeating: 0, count: 32) : segmentHashes[j + 1],
                                           nextTags: last ? [] : segmentTags[j + 1])
            segmentHashes[j] = SHA256.hash(segment)
            segmentTags[j] = segment.withUnsafeBytes {
                BlockAuthentication.chainTags(span: $0, firstBlock: layout.authBlocks(inSegment: j).lowerBound, profile: request.transport,
                                              codecs: &codecs, scratch: &tagScratch)
            }
        }
        guard segmentTags[0].count <= BundleLimits.firstTagsByteCountMax else {
            throw BundleError(.invalidInput, "segment 0 of the auth chain fills \(layout.authBlocks(inSegment: 0).count) blocks, whose tags (\(segmentTags[0].count) bytes) exceed the manifest's \(BundleLimits.firstTagsByteCountMax) (firstTagsByteCountMax): use fewer blocks per segment")
        }

        var signerKeyIDs = request.signingKeys.map(\.publicKey.keyID)
        for id in request.additionalSignerKeyIDs where !signerKeyIDs.contains(id) { signerKeyIDs.append(id) }
        var encryption: Manifest.EncryptionInfo?
        if let contentKey {
            var recipients: [Manifest.Recipient] = []
            for device in request.recipients { recipients.append(try ContentEncryption.wrap(contentKey: contentKey, bundleID: bundleID, device: device)) }
            for group in request.groupKeys { recipients.append(try ContentEncryption.wrap(contentKey: contentKey, bundleID: bundleID, group: group)) }
            encryption = Manifest.EncryptionInfo(chunkSize: request.encryptionChunkSize, recipients: recipients)
        }
        let manifest = Manifest(
            productID: request.productID, hardwareIDs: request.hardwareIDs, version: request.version, sequence: request.sequence,
            createdAt: request.createdAt, expiresAt: request.expiresAt, components: components,
            payload: .init(compression: request.compression, size: transfer.payloadSize, sha256: transfer.payloadHash,
                           compressedSize: compressedSize, uncompressedSize: total),
            transport: request.transport,
            authentication: AuthChainInfo(blocksPerSegment: blocksPerSegment, segmentCount: layout.segmentCount,
                                          head: segmentHashes[0], tagLength: BundleLimits.symbolTagByteCount, size: layout.totalSize,
                                          firstTags: segmentTags[0]),
            encryption: encryption, bundleID: bundleID, signerKeyIDs: signerKeyIDs, signatureThreshold: request.signatureThreshold)
        let manifestBytes = manifest.encoded()
        // Pair the assertions: what we sign must be what a verifier decodes.
        precondition((try? Manifest(decoding: manifestBytes)) == manifest, "manifest does not round-trip")
        let envelope = try COSE.envelope(manifest: manifestBytes, keys: request.signingKeys)
        guard envelope.count <= BundleLimits.envelopeByteCountMax else {
            throw BundleError(.invalidInput, "signed manifest of \(envelope.count) bytes exceeds \(BundleLimits.envelopeByteCountMax) (too many recipients?)")
        }

        // Assemble: header, envelope, payload, chain; then rename into place (Specs/bundle.md §3 B-3).
        let temporary = outputName + ".partial"
        let output = try directory.createExclusive(temporary, mode: 0o644)
        do throws(BundleError) {
            try output.write(BundleHeader(envelopeLength: envelope.count, payloadLength: transfer.payloadSize, authLength: layout.totalSize).encoded())
            try output.write(envelope)
            try payloadFile.seek(to: 0)
            var copied: UInt64 = 0
            while copied < transfer.payloadSize {
                let n = try payloadFile.read(into: &buffer, count: readChunkByteCount)
                guard n > 0 else { throw BundleError(.io, "payload scratch file ended early") }
                try buffer.withUnsafeBytes { b in Result { () throws(BundleError) in try output.write(UnsafeRawBufferPointer(rebasing: b[0..<n])) } }.get()
                copied += UInt64(n)
            }
            for j in 0..<layout.segmentCount {
                let last = j == layout.segmentCount - 1
                let segment = try segmentBytes(j, layout: layout, records: recordsFile,
                                               nextHash: last ? [UInt8](repeating: 0, count: 32) : segmentHashes[j + 1],
                                               nextTags: last ? [] : segmentTags[j + 1])
                precondition(SHA256.hash(segment) == segmentHashes[j])
                try output.write(segment)
            }
            try output.sync()
            try directory.rename(temporary, to: outputName)
        } catch {
            directory.remove(temporary)
            throw error
        }
        return manifest
    }

    /// The directory part of a path ("." for a bare name).
    static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }

    private static func segmentBytes(_ j: Int, layout: AuthChainLayout, records: File, nextHash: [UInt8], nextTags: [UInt8]) throws(BundleError) -> [UInt8] {
        let blocks = layout.blocks(inSegment: j)
        let fullRecord = UInt64(layout.recordSize(ofBlock: 0))
        let count = blocks.reduce(0) { $0 + layout.recordSize(ofBlock: $1) }
        let recordBytes = try records.read(at: UInt64(blocks.lowerBound) * fullRecord, count: count)
        return AuthSegment.serialize(index: j, layout: layout, records: recordBytes, nextHash: nextHash, nextTags: nextTags)
    }

    private static func validate(_ r: PackRequest) throws(BundleError) {
        func text(_ s: String, _ what: String) throws(BundleError) {
            guard !s.isEmpty, s.utf8.count <= BundleLimits.textByteCountMax else {
                throw BundleError(.invalidInput, "\(what) must be 1 to \(BundleLimits.textByteCountMax) bytes")
            }
        }
        try text(r.productID, "product ID")
        try text(r.version, "version")
        guard !r.hardwareIDs.isEmpty, r.hardwareIDs.count <= BundleLimits.hardwareIDCountMax else {
            throw BundleError(.invalidInput, "give 1 to \(BundleLimits.hardwareIDCountMax) hardware IDs")
        }
        for h in r.hardwareIDs { try text(h, "hardware ID") }
        guard !r.components.isEmpty, r.components.count <= BundleLimits.componentCountMax else {
            throw BundleError(.invalidInput, "give 1 to \(BundleLimits.componentCountMax) components")
        }
        for c in r.components {
            guard Manifest.isSafeComponentName(c.name) else {
                throw BundleError(.invalidInput, "component name '\(c.name)' must be letters, digits, '.', '_' or '-', not starting with '.' and not ending in '\(Manifest.temporarySuffix)' (the suffix of temporaries, Specs/bundle.md B-6a)")
            }
            try text(c.installTarget, "install target")
        }
        guard Set(r.components.map(\.name)).count == r.components.count else { throw BundleError(.invalidInput, "component names repeat") }
        guard r.expiresAt > r.createdAt else { throw BundleError(.invalidInput, "expiry must be after creation") }
        guard !r.signingKeys.isEmpty, r.signingKeys.count <= BundleLimits.signatureCountMax else {
            throw BundleError(.invalidInput, "give 1 to \(BundleLimits.signatureCountMax) signing keys")
        }
        for key in r.signingKeys where !key.algorithm.canSign {
            throw BundleError(.invalidInput, "\(key.algorithm) keys cannot sign; use Ed25519 or P-256")
        }
        let signers = r.signingKeys.count + r.additionalSignerKeyIDs.count
        guard r.signatureThreshold >= 1, r.signatureThreshold <= min(signers, BundleLimits.signatureCountMax) else {
            throw BundleError(.invalidInput, "threshold \(r.signatureThreshold) must be 1...\(signers) (the authorised signers)")
        }
        guard (1...9).contains(r.compressionLevel) else { throw BundleError(.invalidInput, "compression level must be 1...9") }
        if let perSegment = r.blocksPerSegment, !(1...BundleLimits.blocksPerSegmentMax).contains(perSegment) {
            throw BundleError(.invalidInput, "blocks per segment must be 1...\(BundleLimits.blocksPerSegmentMax)")
        }
        guard (BundleLimits.encryptionChunkByteCountMin...BundleLimits.encryptionChunkByteCountMax).contains(r.encryptionChunkSize) else {
            throw BundleError(.invalidInput, "encryption chunk size outside \(BundleLimits.encryptionChunkByteCountMin)...\(BundleLimits.encryptionChunkByteCountMax)")
        }
        guard r.recipients.count + r.groupKeys.count <= BundleLimits.recipientCountMax else {
            throw BundleError(.invalidInput, "at most \(BundleLimits.recipientCountMax) recipients")
        }
    }
}

/// Seals the compressed stream into AES-256-GCM chunks (Specs/bundle.md §6.3).
/// Holds the last full chunk back until it knows whether more follows.
final class ChunkSealer {
    private let cipher: AES256GCM
    private let bundleID: [UInt8]
    private let chunkSize: Int
    private let next: TransferSink
    private var pending: [UInt8] = []
    private var sealed: [UInt8] = []
    private var index: UInt64 = 0

    init(key: [UInt8], bundleID: [UInt8], chunkSize: Int, next: TransferSink) throws(BundleError) {
        do { cipher = try AES256GCM(key: key) } catch { throw BundleError(.invalidInput, "\(error)") }
        self.bundleID = bundleID
        self.chunkSize = chunkSize
        self.next = next
        pending.reserveCapacity(2 * chunkSize)
    }

    func consume(_ bytes: UnsafeRawBufferPointer) throws(BundleError) {
        pending.append(contentsOf: bytes)
        while pending.count > chunkSize { try seal(count: chunkSize, last: false) }
    }

    func finish() throws(BundleError) {
        precondition(!pending.isEmpty && pending.count <= chunkSize)
        try seal(count: pending.count, last: true)
    }

    private func seal(count: Int, last: Bool) throws(BundleError) {
        sealed.removeAll(keepingCapacity: true)
        let nonce = ContentEncryption.nonce(chunk: index)
        let aad = ContentEncryption.aad(bundleID: bundleID, chunk: index, last: last)
        let result = pending.withUnsafeBytes { p in
            Result { () throws(CryptoError) in try cipher.seal(UnsafeRawBufferPointer(rebasing: p[0..<count]), nonce: nonce, aad: aad, into: &sealed) }
        }
        do { try result.get() } catch { throw BundleError(.invalidInput, "encryption failed: \(error)") }
        pending.removeSubrange(0..<count)
        index += 1
        try sealed.withUnsafeBytes { s in Result { () throws(BundleError) in try next.consume(s) } }.get()
    }
}

/// Receives the payload as transferred: writes it to the scratch file,
/// hashes it, and cuts it into blocks whose records go to the records file.
final class TransferSink {
    private let payload: File
    private let records: File
    private let profile: TransportProfile
    private let codec: ReedSolomonCodec
    private var hash = SHA256()
    private var block: [UInt8]
    private var fill = 0
    private var scratch: [UInt8] = []
    private(set) var blockCount = 0
    private(set) var payloadSize: UInt64 = 0
    private(set) var payloadHash: [UInt8] = []

    init(payload: File, records: File, profile: TransportProfile) throws(BundleError) {
        self.payload = payload
        self.records = records
        self.profile = profile
        do { codec = try ReedSolomonCodec(sourceCount: profile.sourceSymbolsPerBlock) } catch { throw BundleError(.invalidInput, "\(error)") }
        block = [UInt8](repeating: 0, count: profile.blockByteCount)
    }

    func consume(_ bytes: UnsafeRawBufferPointer) throws(BundleError) {
        try payload.write(bytes)
        hash.update(bytes)
        payloadSize += UInt64(bytes.count)
        var offset = 0
        while offset < bytes.count {
            let n = min(bytes.count - offset, block.count - fill)
            block.withUnsafeMutableBytes { b in
                b.baseAddress!.advanced(by: fill).copyMemory(from: bytes.baseAddress! + offset, byteCount: n)
            }
            fill += n
            offset += n
            if fill == block.count { try finishBlock() }
        }
    }

    func finish() throws(BundleError) {
        if fill > 0 { try finishBlock() }
        payloadHash = hash.finalize()
    }

    private func finishBlock() throws(BundleError) {
        let size = profile.symbolSize
        let k = (fill + size - 1) / size
        let padded = k * size
        block.withUnsafeMutableBytes { b in
            if padded > fill { (b.baseAddress! + fill).initializeMemory(as: UInt8.self, repeating: 0, count: padded - fill) }
        }
        let blockCodec: ReedSolomonCodec
        if k == codec.sourceCount { blockCodec = codec } else {
            do { blockCodec = try ReedSolomonCodec(sourceCount: k) } catch { throw BundleError(.invalidInput, "\(error)") }
        }
        let index = blockCount
        let record = block.withUnsafeBytes { b in
            BlockAuthentication.record(block: index, paddedSource: UnsafeRawBufferPointer(rebasing: b[0..<padded]),
                                       profile: profile, codec: blockCodec, scratch: &scratch)
        }
        try records.write(record)
        blockCount += 1
        fill = 0
    }
}
