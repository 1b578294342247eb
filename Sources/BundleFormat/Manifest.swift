import CBOR

/// The signed description of a software update data set (Specs/bundle.md §4).
///
/// Encoded as a deterministic CBOR map with integer keys. Non-negative keys
/// are critical: a verifier that meets one it does not know refuses the
/// manifest. Negative keys are extensions a verifier may ignore.
public struct Manifest: Hashable, Sendable {
    /// 2: auth-chain symbols carry tags (Specs/bundle.md §7.3 B-13a). Format 1 is
    /// refused with a message saying to pack again (§3 B-1a).
    public static let formatVersion = 2

    public var productID: String
    /// The device hardware IDs this update may be installed on.
    public var hardwareIDs: [String]
    /// Human-readable version, e.g. "2.4.1".
    public var version: String
    /// Monotonic anti-rollback counter: a device installs only a larger one.
    public var sequence: UInt64
    /// Unix seconds.
    public var createdAt: UInt64
    /// Unix seconds; a verifier refuses the manifest from this instant on (freeze attacks).
    public var expiresAt: UInt64
    public var components: [Component]
    public var payload: PayloadInfo
    public var transport: TransportProfile
    public var authentication: AuthChainInfo
    public var encryption: EncryptionInfo?
    /// 16 random bytes naming this data set; salts key derivation and binds chunks.
    public var bundleID: [UInt8]
    /// Key IDs of the keys entitled to sign, and how many of them must (TUF style).
    public var signerKeyIDs: [[UInt8]]
    public var signatureThreshold: Int

    public struct Component: Hashable, Sendable {
        public var name: String
        public var size: UInt64
        public var sha256: [UInt8]
        /// Where the device installs it, e.g. "rootfs" or "bootloader".
        public var installTarget: String
        public init(name: String, size: UInt64, sha256: [UInt8], installTarget: String) {
            self.name = name; self.size = size; self.sha256 = sha256; self.installTarget = installTarget
        }
    }

    public enum Compression: Int, Sendable { case none = 0, zlib = 1 }

    /// The payload as transferred: the compressed (and maybe encrypted) stream.
    public struct PayloadInfo: Hashable, Sendable {
        public var compression: Compression
        /// Bytes as transferred and stored in the bundle.
        public var size: UInt64
        /// SHA-256 over the transferred bytes: the final check before install.
        public var sha256: [UInt8]
        /// Bytes after decryption (the compressed stream).
        public var compressedSize: UInt64
        /// Bytes after decompression: the sum of the component sizes.
        public var uncompressedSize: UInt64
        public init(compression: Compression, size: UInt64, sha256: [UInt8], compressedSize: UInt64, uncompressedSize: UInt64) {
            self.compression = compression; self.size = size; self.sha256 = sha256
            self.compressedSize = compressedSize; self.uncompressedSize = uncompressedSize
        }
    }

    public struct EncryptionInfo: Hashable, Sendable {
        public enum Algorithm: Int, Sendable { case aes256GCM = 1 }
        public var algorithm: Algorithm
        /// Plaintext bytes per AES-GCM chunk; each sealed chunk is 16 bytes longer.
        public var chunkSize: Int
        public var recipients: [Recipient]
        public init(algorithm: Algorithm = .aes256GCM, chunkSize: Int, recipients: [Recipient]) {
            self.algorithm = algorithm; self.chunkSize = chunkSize; self.recipients = recipients
        }
    }

    /// One wrapping of the content key (Specs/bundle.md §6.2).
    public struct Recipient: Hashable, Sendable {
        public enum Method: Int, Sendable {
            /// ECDH-ES with an ephemeral P-256 key, HKDF-SHA256, AES-256 key wrap.
            case ecdhP256 = 1
            /// The same with X25519.
            case ecdhX25519 = 2
            /// AES-256 key wrap under a pre-shared group key (HKDF-derived KEK).
            case groupKey = 3
        }
        public var method: Method
        /// The device key's or group key's ID.
        public var keyID: [UInt8]
        /// Ephemeral public key (ECDH methods only).
        public var ephemeralPublicKey: [UInt8]?
        /// The wrapped 32-byte content key (40 bytes).
        public var wrappedKey: [UInt8]
        public init(method: Method, keyID: [UInt8], ephemeralPublicKey: [UInt8]?, wrappedKey: [UInt8]) {
            self.method = method; self.keyID = keyID; self.ephemeralPublicKey = ephemeralPublicKey; self.wrappedKey = wrappedKey
        }
    }

    public init(productID: String, hardwareIDs: [String], version: String, sequence: UInt64, createdAt: UInt64,
                expiresAt: UInt64, components: [Component], payload: PayloadInfo, transport: TransportProfile,
                authentication: AuthChainInfo, encryption: EncryptionInfo?, bundleID: [UInt8],
                signerKeyIDs: [[UInt8]], signatureThreshold: Int) {
        self.productID = productID; self.hardwareIDs = hardwareIDs; self.version = version; self.sequence = sequence
        self.createdAt = createdAt; self.expiresAt = expiresAt; self.components = components; self.payload = payload
        self.transport = transport; self.authentication = authentication; self.encryption = encryption
        self.bundleID = bundleID; self.signerKeyIDs = signerKeyIDs; self.signatureThreshold = signatureThreshold
    }
}

// MARK: - Keys (Specs/bundle.md §4.1, the CDDL)

extension Manifest {
    enum Key: Int {
        case formatVersion = 1, productID, hardwareIDs, version, sequence, createdAt, expiresAt
        case components, payload, transport, authentication, encryption, bundleID, signerKeyIDs, threshold
    }

    public func cbor() -> CBOR {
        var entries: [(Int, CBOR)] = [
            (Key.formatVersion.rawValue, .int(Self.formatVersion)),
            (Key.productID.rawValue, .text(productID)),
            (Key.hardwareIDs.rawValue, .array(hardwareIDs.map(CBOR.text))),
            (Key.version.rawValue, .text(version)),
            (Key.sequence.rawValue, .unsigned(sequence)),
            (Key.createdAt.rawValue, .unsigned(createdAt)),
            (Key.expiresAt.rawValue, .unsigned(expiresAt)),
            (Key.components.rawValue, .array(components.map { c in
                .intMap([(1, .text(c.name)), (2, .unsigned(c.size)), (3, .bytes(c.sha256)), (4, .text(c.installTarget))])
            })),
            (Key.payload.rawValue, .intMap([
                (1, .int(payload.compression.rawValue)), (2, .unsigned(payload.size)), (3, .bytes(payload.sha256)),
                (4, .unsigned(payload.compressedSize)), (5, .unsigned(payload.uncompressedSize)),
            ])),
            (Key.transport.rawValue, .intMap([
                (1, .int(transport.symbolSize)), (2, .int(transport.sourceSymbolsPerBlock)), (3, .int(transport.repairSymbolsPerBlock)),
            ])),
            (Key.authentication.rawValue, .intMap([
                (1, .int(authentication.blocksPerSegment)), (2, .int(authentication.segmentCount)),
                (3, .bytes(authentication.head)), (4, .int(authentication.tagLength)), (5, .unsigned(authentication.size)),
                (6, .bytes(authentication.firstTags)),
            ])),
            (Key.bundleID.rawValue, .bytes(bundleID)),
            (Key.signerKeyIDs.rawValue, .array(signerKeyIDs.map(CBOR.bytes))),
            (Key.threshold.rawValue, .int(signatureThreshold)),
        ]
        if let encryption {
            entries.append((Key.encryption.rawValue, .intMap([
                (1, .int(encryption.algorithm.rawValue)), (2, .int(encryption.chunkSize)),
                (3, .array(encryption.recipients.map { r in
                    var fields: [(Int, CBOR)] = [(1, .int(r.method.rawValue)), (2, .bytes(r.keyID)), (4, .bytes(r.wrappedKey))]
                    if let epk = r.ephemeralPublicKey { fields.append((3, .bytes(epk))) }
                    return .intMap(fields)
                })),
            ])))
        }
        return .intMap(entries)
    }

    public func encoded() -> [UInt8] { cbor().encoded() }

    /// Why a manifest or bundle of another format is refused (Specs/bundle.md B-1a).
    public static func versionMessage(_ version: Int) -> String {
        version == 1
            ? "bundle format 1 is no longer read: its auth-chain symbols cannot be checked on arrival (Specs/bundle.md B-1a); pack the update again with this fleetcast (format \(formatVersion))"
            : "bundle format \(version), this build reads format \(formatVersion)"
    }

    /// Decodes and validates a manifest from untrusted bytes. Checks types,
    /// ranges and internal consistency; not signatures or policy.
    public init(decoding bytes: [UInt8]) throws(BundleError) {
        let item: CBOR
        do { item = try CBOR(decoding: bytes) } catch { throw .malformed(error, in: "manifest") }
        var m = try FieldReader(item, "manifest")
        let formatVersion = try m.int(Key.formatVersion.rawValue, in: 1...Int(Int32.max))
        // Specs/bundle.md B-1a: format 1 chains authenticate their own symbols only per segment.
        guard formatVersion == Self.formatVersion else { throw BundleError(.malformed, Self.versionMessage(formatVersion)) }
        productID = try m.text(Key.productID.rawValue)
        hardwareIDs = try m.array(Key.hardwareIDs.rawValue, max: BundleLimits.hardwareIDCountMax) { (item) throws(BundleError) in
            try FieldReader.text(item, "hardware ID")
        }
        guard !hardwareIDs.isEmpty else { throw BundleError(.malformed, "manifest: no hardware IDs") }
        version = try m.text(Key.version.rawValue)
        sequence = try m.uint64(Key.sequence.rawValue)
        createdAt = try m.uint64(Key.createdAt.rawValue)
        expiresAt = try m.uint64(Key.expiresAt.rawValue)
        guard expiresAt > createdAt else { throw BundleError(.malformed, "manifest: expires (\(expiresAt)) not after created (\(createdAt))") }
        components = try m.array(Key.components.rawValue, max: BundleLimits.componentCountMax) { (item) throws(BundleError) in
            var c = try FieldReader(item, "component")
            let component = Component(name: try c.text(1), size: try c.uint64(2, max: BundleLimits.payloadByteCountMax),
                                      sha256: try c.bytes(3, count: 32), installTarget: try c.text(4))
            try c.finish()
            guard Manifest.isSafeComponentName(component.name) else {
                throw BundleError(.malformed, "component name '\(component.name)' is not a safe file name")
            }
            return component
        }
        guard !components.isEmpty else { throw BundleError(.malformed, "manifest: no components") }
        guard Set(components.map(\.name)).count == components.count else { throw BundleError(.malformed, "manifest: component names repeat") }

        var p = try m.map(Key.payload.rawValue)
        guard let compression = Compression(rawValue: try p.int(1, in: 0...1)) else { fatalError("range checked") }
        payload = PayloadInfo(compression: compression, size: try p.uint64(2, max: BundleLimits.payloadByteCountMax),
                              sha256: try p.bytes(3, count: 32), compressedSize: try p.uint64(4, max: BundleLimits.payloadByteCountMax),
                              uncompressedSize: try p.uint64(5, max: BundleLimits.payloadByteCountMax))
        try p.finish()
        let componentTotal = components.reduce(UInt64(0)) { $0 + $1.size }
        guard componentTotal == payload.uncompressedSize else {
            throw BundleError(.malformed, "manifest: components total \(componentTotal) bytes, payload says \(payload.uncompressedSize)")
        }
        guard payload.size > 0 else { throw BundleError(.malformed, "manifest: empty payload") }

        var t = try m.map(Key.transport.rawValue)
        transport = try TransportProfile(symbolSize: t.int(1), sourceSymbolsPerBlock: t.int(2), repairSymbolsPerBlock: t.int(3))
        try t.finish()

        var a = try m.map(Key.authentication.rawValue)
        authentication = AuthChainInfo(blocksPerSegment: try a.int(1, in: 1...BundleLimits.blocksPerSegmentMax),
                                       segmentCount: try a.int(2, in: 1...BundleLimits.blockCountMax), head: try a.bytes(3, count: 32),
                                       tagLength: try a.int(4, in: BundleLimits.symbolTagByteCount...BundleLimits.symbolTagByteCount),
                                       size: try a.uint64(5, max: BundleLimits.payloadByteCountMax),
                                       firstTags: try a.bytes(6, countIn: 0...BundleLimits.firstTagsByteCountMax))
        try a.finish()

        if m.has(Key.encryption.rawValue) {
            var e = try m.map(Key.encryption.rawValue)
            guard let algorithm = EncryptionInfo.Algorithm(rawValue: try e.int(1, in: 1...1)) else { fatalError("range checked") }
            let chunkSize = try e.int(2, in: BundleLimits.encryptionChunkByteCountMin...BundleLimits.encryptionChunkByteCountMax)
            let recipients = try e.array(3, max: BundleLimits.recipientCountMax) { (item) throws(BundleError) in
                var r = try FieldReader(item, "recipient")
                guard let method = Recipient.Method(rawValue: try r.int(1, in: 1...3)) else { fatalError("range checked") }
                let keyID = try r.bytes(2, countIn: 1...32)
                let epk: [UInt8]? = switch method {
                case .ecdhP256: try r.bytes(3, count: 65)
                case .ecdhX25519: try r.bytes(3, count: 32)
                case .groupKey: nil
                }
                let wrapped = try r.bytes(4, count: 40)
                try r.finish()
                return Recipient(method: method, keyID: keyID, ephemeralPublicKey: epk, wrappedKey: wrapped)
            }
            guard !recipients.isEmpty else { throw BundleError(.malformed, "manifest: encrypted with no recipients") }
            try e.finish()
            encryption = EncryptionInfo(algorithm: algorithm, chunkSize: chunkSize, recipients: recipients)
        } else {
            encryption = nil
        }
        bundleID = try m.bytes(Key.bundleID.rawValue, count: 16)
        signerKeyIDs = try m.array(Key.signerKeyIDs.rawValue, max: BundleLimits.signatureCountMax) { (item) throws(BundleError) in
            guard let b = item.bytesValue, (1...32).contains(b.count) else { throw BundleError(.malformed, "manifest: signer key ID is not 1 to 32 bytes") }
            return b
        }
        signatureThreshold = try m.int(Key.threshold.rawValue, in: 1...BundleLimits.signatureCountMax)
        guard signatureThreshold <= signerKeyIDs.count else {
            throw BundleError(.malformed, "manifest: threshold \(signatureThreshold) exceeds the \(signerKeyIDs.count) signer keys")
        }
        try m.finish()

        // Specs/bundle.md §4.2 B-6: sizes implied by the profile must agree.
        let expectedPayload = try PayloadLayout.transferredSize(compressedSize: payload.compressedSize, encryption: encryption)
        guard expectedPayload == payload.size else {
            throw BundleError(.malformed, "manifest: payload size \(payload.size) does not match \(payload.compressedSize) compressed bytes (expected \(expectedPayload))")
        }
        let geometry = BlockGeometry(payloadSize: payload.size, profile: transport)
        // B-6b: a receiver's per-block state is bounded before it exists.
        guard geometry.blockCount <= BundleLimits.blockCountMax else {
            throw BundleError(.malformed, "manifest: \(payload.size) payload bytes in blocks of \(transport.blockByteCount) make \(geometry.blockCount) blocks, over the limit of \(BundleLimits.blockCountMax) (blockCountMax)")
        }
        let expectedSegments = (geometry.blockCount + authentication.blocksPerSegment - 1) / authentication.blocksPerSegment
        guard expectedSegments == authentication.segmentCount else {
            throw BundleError(.malformed, "manifest: \(authentication.segmentCount) segments for \(geometry.blockCount) blocks (expected \(expectedSegments))")
        }
        let layout = AuthChainLayout(geometry: geometry, blocksPerSegment: authentication.blocksPerSegment)
        guard layout.totalSize == authentication.size else {
            throw BundleError(.malformed, "manifest: authentication chain size \(authentication.size) does not match the profile")
        }
        let firstTagsCount = layout.authSymbolCount(inSegment: 0) * BundleLimits.symbolTagByteCount
        guard authentication.firstTags.count == firstTagsCount else {
            throw BundleError(.malformed, "manifest: \(authentication.firstTags.count) bytes of first-segment tags, the layout needs \(firstTagsCount)")
        }
    }
}

/// Reads a CBOR map with integer keys, field by field, and refuses unknown
/// critical (non-negative) keys at `finish()`.
struct FieldReader {
    private var fields: [Int: CBOR] = [:]
    private var consumed: Set<Int> = []
    let context: String

    init(_ item: CBOR, _ context: String) throws(BundleError) {
        self.context = context
        guard let entries = item.mapValue else { throw BundleError(.malformed, "\(context): not a map") }
        for entry in entries {
            guard let key = entry.key.intValue else { throw BundleError(.malformed, "\(context): map key is not an integer") }
            fields[key] = entry.value
        }
    }

    func has(_ key: Int) -> Bool { fields[key] != nil }

    mutating func field(_ key: Int) throws(BundleError) -> CBOR {
        guard let value = fields[key] else { throw BundleError(.malformed, "\(context): field \(key) missing") }
        consumed.insert(key)
        return value
    }

    mutating func int(_ key: Int, in range: ClosedRange<Int> = 0...Int(Int32.max)) throws(BundleError) -> Int {
        guard let v = try field(key).intValue, range.contains(v) else {
            throw BundleError(.malformed, "\(context): field \(key) is not an integer in \(range)")
        }
        return v
    }

    mutating func uint64(_ key: Int, max: UInt64 = .max) throws(BundleError) -> UInt64 {
        guard let v = try field(key).uint64Value, v <= max else {
            throw BundleError(.malformed, "\(context): field \(key) is not an unsigned integer up to \(max)")
        }
        return v
    }

    mutating func text(_ key: Int) throws(BundleError) -> String { try Self.text(field(key), "\(context) field \(key)") }

    static func text(_ item: CBOR, _ what: String) throws(BundleError) -> String {
        guard let t = item.textValue, !t.isEmpty, t.utf8.count <= BundleLimits.textByteCountMax else {
            throw BundleError(.malformed, "\(what): not a text of 1 to \(BundleLimits.textByteCountMax) bytes")
        }
        return t
    }

    mutating func bytes(_ key: Int, count: Int) throws(BundleError) -> [UInt8] {
        try bytes(key, countIn: count...count)
    }

    mutating func bytes(_ key: Int, countIn range: ClosedRange<Int>) throws(BundleError) -> [UInt8] {
        guard let b = try field(key).bytesValue, range.contains(b.count) else {
            throw BundleError(.malformed, "\(context): field \(key) is not a byte string of \(range) bytes")
        }
        return b
    }

    mutating func map(_ key: Int) throws(BundleError) -> FieldReader { try FieldReader(field(key), "\(context) field \(key)") }

    mutating func array<T>(_ key: Int, max: Int, _ element: (CBOR) throws(BundleError) -> T) throws(BundleError) -> [T] {
        guard let items = try field(key).arrayValue else { throw BundleError(.malformed, "\(context): field \(key) is not an array") }
        guard items.count <= max else { throw BundleError(.malformed, "\(context): field \(key) has \(items.count) entries, limit \(max)") }
        var out: [T] = []
        for item in items { out.append(try element(item)) }
        return out
    }

    /// Refuses any non-negative key that was not read (Specs/bundle.md §4.2 B-5).
    func finish() throws(BundleError) {
        let unknown = fields.keys.filter { $0 >= 0 && !consumed.contains($0) }.sorted()
        guard unknown.isEmpty else {
            throw BundleError(.unknownCriticalField, "\(context): unknown critical field(s) \(unknown)")
        }
    }
}
