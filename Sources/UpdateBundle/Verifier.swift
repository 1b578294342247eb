#if canImport(Glibc)
import Glibc
#endif
import CFileIO
import ErasureCoding
import FleetCrypto

/// A bundle whose every byte was checked against a verified manifest and,
/// if encrypted, decrypted. Only `verifyPayload` makes one: the installer
/// takes nothing else.
public struct VerifiedBundle: Sendable {
    public let manifest: VerifiedManifest
    /// Where each component was written, if an output directory was given.
    public let componentPaths: [String: String]
}

/// A bundle file opened and parsed, nothing trusted yet.
public final class UnverifiedBundle {
    public let path: String
    public let header: BundleHeader
    public let envelope: [UInt8]
    let file: File

    public init(path: String) throws(BundleError) {
        self.path = path
        file = try File.open(reading: path)
        let size = try file.size
        guard size >= UInt64(BundleHeader.byteCount) else { throw BundleError(.malformed, "\(path): \(size) bytes, shorter than a bundle header") }
        header = try BundleHeader(parsing: try file.read(at: 0, count: BundleHeader.byteCount))
        guard size == header.totalSize else {
            throw BundleError(.sizeMismatch, "\(path): file is \(size) bytes, header says \(header.totalSize)")
        }
        envelope = try file.read(at: UInt64(BundleHeader.byteCount), count: header.envelopeLength)
    }

    /// The manifest and signature key IDs as stored, for `inspect`: NOT verified.
    public func unverifiedContents() throws(BundleError) -> (manifest: Manifest, signerKeyIDs: [[UInt8]]) {
        let (bytes, signatures) = try COSE.parseEnvelope(envelope)
        return (try Manifest(decoding: bytes), signatures.map(\.keyID))
    }

    public func verifyManifest(trust: TrustPolicy, device: DevicePolicy) throws(BundleError) -> VerifiedManifest {
        let verified = try ManifestVerifier.verify(envelope: envelope, trust: trust, device: device)
        let m = verified.manifest
        guard header.payloadLength == m.payload.size, header.authLength == m.authentication.size else {
            throw BundleError(.sizeMismatch, "bundle holds \(header.payloadLength) payload and \(header.authLength) chain bytes, manifest says \(m.payload.size) and \(m.authentication.size)")
        }
        return verified
    }

    /// Step 2: checks every byte against the verified manifest in one pass
    /// (payload hash, every block hash and symbol tag along the chain),
    /// decrypts and decompresses, checks each component's size and hash, and
    /// only then moves the components into `outputDirectory`.
    ///
    /// `checkAuthChain: false` skips the chain walk and relies on the payload
    /// hash alone, which the signed manifest binds just as firmly: a receiver
    /// that authenticated every block on arrival (Specs/protocol.md P-9) has
    /// already walked the chain and needs only the hash, decryption and
    /// decompression (Specs/bundle.md §8 step 4).
    public func verifyPayload(_ verified: VerifiedManifest, keys: DecryptionKeys = .init(), outputDirectory: String? = nil,
                              componentMode: mode_t = 0o600, checkAuthChain: Bool = true, sink: ComponentSink? = nil,
                              progress: ((_ done: UInt64, _ total: UInt64) -> Void)? = nil) throws(BundleError) -> VerifiedBundle {
        let m = verified.manifest
        let verification = try PayloadVerification(verified, keys: keys, outputDirectory: outputDirectory, componentMode: componentMode, sink: sink)
        let checker = checkAuthChain ? try ChainChecker(file: file, manifest: m, authOffset: header.authOffset) : nil
        let geometry = BlockGeometry(payloadSize: m.payload.size, profile: m.transport)
        var block = [UInt8](repeating: 0, count: m.transport.blockByteCount)
        try file.seek(to: header.payloadOffset)
        for b in 0..<geometry.blockCount {
            let range = geometry.byteRange(ofBlock: b)
            let n = try file.read(into: &block, count: range.count)
            guard n == range.count else { throw BundleError(.sizeMismatch, "payload ends inside block \(b)") }
            let result = block.withUnsafeBytes { bytes in
                Result { () throws(BundleError) in
                    let data = UnsafeRawBufferPointer(rebasing: bytes[0..<n])
                    try checker?.check(block: b, bytes: data)
                    try verification.consume(block: b, bytes: data)
                }
            }
            try result.get()
            progress?(range.upperBound, m.payload.size)
        }
        return try verification.finish()
    }
}

/// Step 2 fed block by block in payload order (Specs/bundle.md §8 steps 6 and
/// 7): the payload SHA-256, decryption, decompression, and each component's
/// size and SHA-256, written to `.partial` files that only `finish()` releases,
/// once every check has passed. `verifyPayload` feeds it from a bundle file; a
/// receiver feeds it the blocks it stages as they complete in order, so that
/// verification runs during the transfer (Specs/bundle.md B-15b).
public final class PayloadVerification {
    public let verified: VerifiedManifest
    private let geometry: BlockGeometry
    /// The next block `consume` accepts.
    public private(set) var nextBlock = 0
    public var blockCount: Int { geometry.blockCount }
    /// Where block `b` lies in the payload.
    public func byteRange(ofBlock b: Int) -> Range<UInt64> { geometry.byteRange(ofBlock: b) }
    private var hash = SHA256()
    private let output: ComponentWriter
    private let inflater: ZlibStream?
    private var opener: ChunkOpener?
    private var compressedSeen: UInt64 = 0

    /// Specs/bundle.md B-16: a lone component stored plainly, with the payload's size and
    /// digest, is the payload byte for byte.
    public static func componentIsPayload(_ m: Manifest) -> Bool {
        m.encryption == nil && m.payload.compression == .none && m.components.count == 1
            && m.components[0].size == m.payload.size && m.components[0].sha256 == m.payload.sha256
    }

    /// Specs/bundle.md B-16a: where a receiver may stage the payload so that it is the
    /// component file once released (`<output>/<name>.partial`, renamed by `finish()`),
    /// or nil when the component is not the payload.
    public static func stagedComponentPath(_ m: Manifest, outputDirectory: String) -> String? {
        componentIsPayload(m) ? ComponentWriter.partialPath(directory: outputDirectory, component: m.components[0].name) : nil
    }

    /// `componentStaged`: the caller stages the payload at `stagedComponentPath` (B-16a)
    /// and makes it durable; this verification then only hashes it, and `finish()`
    /// releases that file by renaming it. The caller removes it if verification fails.
    /// Components are released with `componentMode` (default 0600).
    ///
    /// `sink`, instead of an output directory, takes the components' bytes as they are
    /// released in order (a device agent writes them into the spare slots: install while
    /// receiving, Specs/agent.md A-4).
    public init(_ verified: VerifiedManifest, keys: DecryptionKeys = .init(), outputDirectory: String? = nil,
                componentStaged: Bool = false, componentMode: mode_t = 0o600, sink: ComponentSink? = nil) throws(BundleError) {
        precondition(sink == nil || (outputDirectory == nil && !componentStaged), "components go to a sink or to a directory")
        self.verified = verified
        let m = verified.manifest
        geometry = BlockGeometry(payloadSize: m.payload.size, profile: m.transport)
        var contentKey: [UInt8]?
        if let encryption = m.encryption {
            contentKey = try ContentEncryption.unwrap(encryption, bundleID: m.bundleID, keys: keys)
        }
        // Specs/bundle.md B-16: when the component is the payload, the payload hash checked
        // in finish() (before any file is released) is its hash too, and is computed once.
        let componentIsPayload = Self.componentIsPayload(m)
        precondition(!componentStaged || (componentIsPayload && outputDirectory != nil), "only a payload-sized plain component can be staged (B-16a)")
        output = try ComponentWriter(components: m.components, directory: outputDirectory, mode: componentMode, hashedAsPayload: componentIsPayload,
                                     stagedByCaller: componentStaged, sink: sink)
        inflater = m.payload.compression == .zlib ? try ZlibStream(.inflate) : nil
        if let contentKey, let encryption = m.encryption {
            opener = try ChunkOpener(key: contentKey, bundleID: m.bundleID, chunkSize: encryption.chunkSize,
                                     compressedSize: m.payload.compressedSize) { [unowned self] (bytes) throws(BundleError) in
                try self.afterDecryption(bytes)
            }
        }
    }

    private func afterDecryption(_ bytes: UnsafeRawBufferPointer) throws(BundleError) {
        compressedSeen += UInt64(bytes.count)
        if let inflater { try inflater.process(bytes, finish: false) { (b) throws(BundleError) in try output.consume(b) } }
        else { try output.consume(bytes) }
    }

    /// Takes block `b`, which must be `nextBlock`, with exactly its bytes.
    public func consume(block b: Int, bytes: UnsafeRawBufferPointer) throws(BundleError) {
        precondition(b == nextBlock && b < geometry.blockCount, "blocks are verified in order")
        let expected = geometry.byteRange(ofBlock: b).count
        guard bytes.count == expected else { throw BundleError(.sizeMismatch, "block \(b) is \(bytes.count) bytes, the geometry says \(expected)") }
        hash.update(bytes)
        if let opener { try opener.consume(bytes) } else { try afterDecryption(bytes) }
        nextBlock += 1
    }

    /// After the last block: the final checks; only then are the components released.
    public func finish() throws(BundleError) -> VerifiedBundle {
        let m = verified.manifest
        guard nextBlock == geometry.blockCount else { throw BundleError(.sizeMismatch, "payload ends inside block \(nextBlock)") }
        guard hash.finalize() == m.payload.sha256 else { throw BundleError(.hashMismatch, "payload SHA-256 differs from the manifest") }
        try opener?.finish()
        guard compressedSeen == m.payload.compressedSize else {
            throw BundleError(.sizeMismatch, "\(compressedSeen) compressed bytes, manifest says \(m.payload.compressedSize)")
        }
        if let inflater, !inflater.finished { throw BundleError(.decryptionFailed, "payload ends inside the zlib stream") }
        let paths = try output.finish()
        return VerifiedBundle(manifest: verified, componentPaths: paths)
    }
}

/// Walks the authentication chain alongside the payload: authenticates each
/// segment by the hash before it, then each block and every symbol tag.
final class ChainChecker {
    let layout: AuthChainLayout
    private let file: File
    private let authOffset: UInt64
    private let profile: TransportProfile
    private var segment: AuthSegment?
    private var expectedHash: [UInt8]
    /// The chain tags segment j's span must have (B-13a): the manifest's, then each segment's next ones.
    private var expectedTags: [UInt8]
    private var codecs: [Int: ReedSolomonCodec] = [:]
    private var padded: [UInt8]
    private var repairs: [UInt8]

    init(file: File, manifest m: Manifest, authOffset: UInt64) throws(BundleError) {
        self.file = file
        self.authOffset = authOffset
        profile = m.transport
        layout = AuthChainLayout(geometry: BlockGeometry(payloadSize: m.payload.size, profile: m.transport),
                                 blocksPerSegment: m.authentication.blocksPerSegment)
        expectedHash = m.authentication.head
        expectedTags = m.authentication.firstTags
        padded = [UInt8](repeating: 0, count: profile.blockByteCount)
        repairs = [UInt8](repeating: 0, count: max(1, profile.repairSymbolsPerBlock) * profile.symbolSize)
    }

    func check(block b: Int, bytes: UnsafeRawBufferPointer) throws(BundleError) {
        if segment == nil || !segment!.blocks.contains(b) {
            let j = b / layout.blocksPerSegment
            let raw = try file.read(at: authOffset + layout.segmentOffset(j), count: layout.segmentSize(j))
            // Specs/bundle.md §7.3 B-13: segment j is authenticated by the hash before it.
            guard SHA256.hash(raw) == expectedHash else {
                throw BundleError(.hashMismatch, "authentication segment \(j) does not match the chain")
            }
            let parsed = try AuthSegment(parsing: raw, index: j, layout: layout)
            if j == layout.segmentCount - 1 {
                guard parsed.nextHash.allSatisfy({ $0 == 0 }) else { throw BundleError(.malformed, "last segment links onward") }
            }
            // B-15: the chain tags a receiver checks the segment's symbols against on arrival
            // (B-13a) must be those of the symbols the sender will send, repairs included.
            let tags = raw.withUnsafeBytes {
                BlockAuthentication.chainTags(span: $0, firstBlock: layout.authBlocks(inSegment: j).lowerBound, profile: profile,
                                              codecs: &codecs, scratch: &repairs)
            }
            guard tags == expectedTags else {
                throw BundleError(.hashMismatch, "authentication segment \(j): its symbols do not match the chain tags \(j == 0 ? "the manifest" : "segment \(j - 1)") holds")
            }
            expectedHash = parsed.nextHash
            expectedTags = Array(parsed.nextTags)
            segment = parsed
        }
        let seg = segment!
        let size = profile.symbolSize
        let k = layout.geometry.sourceSymbols(inBlock: b)
        let paddedCount = k * size
        padded.withUnsafeMutableBytes { p in
            p.baseAddress!.copyMemory(from: bytes.baseAddress!, byteCount: bytes.count)
            if paddedCount > bytes.count { (p.baseAddress! + bytes.count).initializeMemory(as: UInt8.self, repeating: 0, count: paddedCount - bytes.count) }
        }
        let codec: ReedSolomonCodec
        if let c = codecs[k] { codec = c } else {
            do { codec = try ReedSolomonCodec(sourceCount: k) } catch { throw BundleError(.malformed, "\(error)") }
            codecs[k] = codec
        }
        let r = profile.repairSymbolsPerBlock
        let ok: Bool = padded.withUnsafeBytes { p in
            let source = UnsafeRawBufferPointer(rebasing: p[0..<paddedCount])
            guard BlockAuthentication.blockHash(block: b, paddedSource: source)[...] == seg.blockHash(b) else { return false }
            for i in 0..<k where BlockAuthentication.tag(block: b, symbol: i, bytes: UnsafeRawBufferPointer(rebasing: source[(i * size)..<((i + 1) * size)]))[...] != seg.tag(block: b, symbol: i) {
                return false
            }
            guard r > 0 else { return true }
            // Specs/bundle.md §7.3 B-15. Repair tags: a receiver must accept every repair the sender may send.
            return repairs.withUnsafeMutableBytes { out in
                try! codec.encode(block: source, symbolSize: size, repairIndices: k..<(k + r), into: out)
                for n in 0..<r where BlockAuthentication.tag(block: b, symbol: k + n, bytes: UnsafeRawBufferPointer(rebasing: out[(n * size)..<((n + 1) * size)]))[...] != seg.tag(block: b, symbol: k + n) {
                    return false
                }
                return true
            }
        }
        guard ok else { throw BundleError(.hashMismatch, "block \(b) does not match its authentication record") }
    }
}

/// Opens AES-256-GCM chunks in order; the manifest says how many there are.
final class ChunkOpener {
    private let cipher: AES256GCM
    private let bundleID: [UInt8]
    private let chunkSize: Int
    private let chunkCount: UInt64
    private let lastPlainSize: Int
    private let next: (UnsafeRawBufferPointer) throws(BundleError) -> Void
    private var pending: [UInt8] = []
    private var plain: [UInt8] = []
    private var index: UInt64 = 0

    init(key: [UInt8], bundleID: [UInt8], chunkSize: Int, compressedSize: UInt64,
         next: @escaping (UnsafeRawBufferPointer) throws(BundleError) -> Void) throws(BundleError) {
        do { cipher = try AES256GCM(key: key) } catch { throw BundleError(.decryptionFailed, "\(error)") }
        self.bundleID = bundleID
        self.chunkSize = chunkSize
        chunkCount = (compressedSize + UInt64(chunkSize) - 1) / UInt64(chunkSize)
        lastPlainSize = Int(compressedSize - (chunkCount - 1) * UInt64(chunkSize))
        self.next = next
    }

    private var currentSealedSize: Int { (index + 1 == chunkCount ? lastPlainSize : chunkSize) + AES256GCM.tagByteCount }

    func consume(_ bytes: UnsafeRawBufferPointer) throws(BundleError) {
        // Typed buffer: the standard library's memcpy path, fast even in debug builds.
        pending.append(contentsOf: bytes.assumingMemoryBound(to: UInt8.self))
        while index < chunkCount && pending.count >= currentSealedSize {
            let count = currentSealedSize
            let last = index + 1 == chunkCount
            plain.removeAll(keepingCapacity: true)
            let result = pending.withUnsafeBytes { p in
                Result { () throws(CryptoError) in
                    try cipher.open(UnsafeRawBufferPointer(rebasing: p[0..<count]), nonce: ContentEncryption.nonce(chunk: index),
                                    aad: ContentEncryption.aad(bundleID: bundleID, chunk: index, last: last), into: &plain)
                }
            }
            do { try result.get() } catch { throw BundleError(.decryptionFailed, "chunk \(index): \(error.reason)") }
            pending.removeSubrange(0..<count)
            index += 1
            try plain.withUnsafeBytes { p in Result { () throws(BundleError) in try next(p) } }.get()
        }
        if index == chunkCount && !pending.isEmpty { throw BundleError(.sizeMismatch, "bytes after the last encrypted chunk") }
    }

    func finish() throws(BundleError) {
        guard index == chunkCount, pending.isEmpty else { throw BundleError(.sizeMismatch, "payload ends inside encrypted chunk \(index)") }
    }
}

/// Where a verification's components go, other than files in a directory: each
/// component's bytes in order, between `begin` and `end`; `end` comes once the
/// component is complete and its SHA-256 matched (for a lone plain component, B-16,
/// its hash is the payload's, checked before `release`); `release` once every
/// check of step 2 has passed; `discard` when one failed. Nothing a sink receives
/// may be used (booted, installed) before `release`.
public protocol ComponentSink: AnyObject {
    func begin(_ component: Manifest.Component) throws(BundleError)
    func write(_ bytes: UnsafeRawBufferPointer) throws(BundleError)
    func end(_ component: Manifest.Component) throws(BundleError)
    /// Where each component went, by name.
    func release() throws(BundleError) -> [String: String]
    func discard()
}

/// Splits the decompressed stream into components, hashes each, and writes
/// them to temporary files that are renamed into place only by `finish()`
/// (Specs/bundle.md §5 B-10, B-11), or to a `ComponentSink`.
///
/// Files are made under the output directory's descriptor, never through a link;
/// temporaries (`<name>.partial`, a suffix no component name may have, B-6a) are
/// created exclusively with `mode` (0600: decrypted firmware is for this device).
final class ComponentWriter {
    private let components: [Manifest.Component]
    private let directory: SafeDirectory?
    private let mode: mode_t
    private var current = 0
    private var written: UInt64 = 0
    private var hash = SHA256()
    private var file: File?
    /// (temporary, final) names inside `directory`.
    private var temporaries: [(String, String)] = []
    private let sink: ComponentSink?
    private var released = false
    /// The only component is the payload itself, whose hash the caller checks (B-16).
    private let hashedAsPayload: Bool
    /// The caller wrote the component's `.partial` file (the staged payload, B-16a):
    /// nothing is written here, and `finish()` renames that file.
    private let stagedByCaller: Bool

    static func partialName(component: String) -> String { component + Manifest.temporarySuffix }
    static func partialPath(directory: String, component: String) -> String { directory + "/" + partialName(component: component) }

    init(components: [Manifest.Component], directory: String?, mode: mode_t = 0o600, hashedAsPayload: Bool = false,
         stagedByCaller: Bool = false, sink: ComponentSink? = nil) throws(BundleError) {
        self.sink = sink
        precondition(!hashedAsPayload || components.count == 1)
        precondition(!stagedByCaller || (hashedAsPayload && directory != nil))
        self.components = components
        self.directory = try directory.map { (d) throws(BundleError) in try SafeDirectory(path: d) }
        self.mode = mode
        self.hashedAsPayload = hashedAsPayload
        self.stagedByCaller = stagedByCaller
        if stagedByCaller {
            // Not in `temporaries`: the file is the caller's staging until it is released.
            current = components.count
            return
        }
        try openCurrent()
    }

    deinit {
        for (temporary, _) in temporaries { directory?.remove(temporary) }
        if !released { sink?.discard() }
    }

    private func openCurrent() throws(BundleError) {
        while current < components.count {
            if let directory {
                let final = components[current].name
                let temporary = Self.partialName(component: final)
                file = try directory.createExclusive(temporary, mode: mode)
                temporaries.append((temporary, final))
            }
            try sink?.begin(components[current])
            guard components[current].size == 0 else { return }
            try closeCurrent()  // an empty component is complete at once
        }
    }

    private func closeCurrent() throws(BundleError) {
        let c = components[current]
        guard hashedAsPayload || hash.finalize() == c.sha256 else { throw BundleError(.hashMismatch, "component '\(c.name)' SHA-256 differs from the manifest") }
        try file?.sync()
        try sink?.end(c)
        file = nil
        current += 1
        written = 0
        writebackStartedUpTo = 0
    }

    /// Bytes of the current file whose writeback has been started; the rest of
    /// `written` has not.
    private var writebackStartedUpTo: UInt64 = 0
    /// Every this many bytes, writeback of a component file starts in the background
    /// (`sync_file_range`), so that the fsync before release finds little left to write.
    static let writebackChunkByteCount = 8 << 20

    private func startWriteback() {
        guard let file, written - writebackStartedUpTo >= UInt64(Self.writebackChunkByteCount) else { return }
        // Best effort: the fsync at release is what counts.
        _ = fc_start_writeback(file.fd, Int64(writebackStartedUpTo), Int64(written - writebackStartedUpTo))
        writebackStartedUpTo = written
    }

    func consume(_ bytes: UnsafeRawBufferPointer) throws(BundleError) {
        if stagedByCaller { return }  // the payload hash covers it (B-16), the caller staged it (B-16a)
        var offset = 0
        while offset < bytes.count {
            guard current < components.count else {
                throw BundleError(.sizeMismatch, "payload decompresses to more than the \(components.reduce(0) { $0 + $1.size }) bytes the manifest lists")
            }
            let n = Int(min(UInt64(bytes.count - offset), components[current].size - written))
            let piece = UnsafeRawBufferPointer(rebasing: bytes[offset..<(offset + n)])
            if !hashedAsPayload { hash.update(piece) }
            try file?.write(piece)
            try sink?.write(piece)
            written += UInt64(n)
            startWriteback()
            offset += n
            if written == components[current].size { try closeCurrent(); try openCurrent() }
        }
    }

    func finish() throws(BundleError) -> [String: String] {
        guard current == components.count else {
            throw BundleError(.sizeMismatch, "payload ends inside component '\(components[current].name)'")
        }
        var paths: [String: String] = [:]
        if stagedByCaller, let directory {
            let name = components[0].name
            try directory.rename(Self.partialName(component: name), to: name)
            paths[name] = directory.file(name)
        }
        for (temporary, final) in temporaries {
            try directory!.rename(temporary, to: final)
            paths[final] = directory!.file(final)
        }
        temporaries = []
        if let sink {
            paths.merge(try sink.release()) { $1 }
            released = true
        }
        return paths
    }
}
