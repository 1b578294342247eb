import COpenSSL

/// The asymmetric algorithms Fleetcast uses.
///
/// `ed25519` and `p256` sign manifests (COSE EdDSA and ES256); `p256` and
/// `x25519` agree content-encryption keys with devices (ECDH-ES).
public enum KeyAlgorithm: String, Sendable, CaseIterable {
    case ed25519, p256, x25519

    public var canSign: Bool { self != .x25519 }
    public var canAgree: Bool { self != .ed25519 }

    fileprivate var rawType: Int32? {
        switch self {
        case .ed25519: EVP_PKEY_ED25519
        case .x25519: EVP_PKEY_X25519
        case .p256: nil
        }
    }

    /// Length of the raw public key: 32 bytes, or a 65-byte uncompressed SEC1 point.
    public var publicKeyByteCount: Int { self == .p256 ? 65 : 32 }
    /// Length of a raw signature: 64 bytes (ES256 as r||s, per RFC 9053 §2.1).
    public static let signatureByteCount = 64
}

/// Reads an OpenSSL key's algorithm, or nil for one we do not use.
private func keyAlgorithm(of pkey: OpaquePointer) -> KeyAlgorithm? {
    switch EVP_PKEY_get_id(pkey) {
    case EVP_PKEY_ED25519: return .ed25519
    case EVP_PKEY_X25519: return .x25519
    default: return fc_is_p256(pkey) == 1 ? .p256 : nil
    }
}

private func memoryBIOString(_ write: (OpaquePointer) -> Int32) throws(CryptoError) -> String {
    guard let bio = BIO_new(BIO_s_mem()) else { throw .openssl("BIO_new") }
    defer { BIO_free(bio) }
    guard write(bio) == 1 else { throw .openssl("PEM write") }
    var data: UnsafeMutablePointer<CChar>?
    let length = fc_bio_get_mem(bio, &data)
    guard let data, length > 0 else { throw .openssl("BIO_get_mem_data") }
    return String(decoding: UnsafeRawBufferPointer(start: data, count: Int(length)), as: UTF8.self)
}

private func withMemoryBIO<T>(_ text: String, _ body: (OpaquePointer) -> T?) -> T? {
    var bytes = Array(text.utf8)
    return bytes.withUnsafeMutableBytes { raw -> T? in
        guard let bio = BIO_new_mem_buf(raw.baseAddress, Int32(raw.count)) else { return nil }
        defer { BIO_free(bio) }
        return body(bio)
    }
}

/// A private key held in OpenSSL. Immutable after creation, so it may be
/// shared across threads (OpenSSL 3 key objects are safe for concurrent use).
public final class PrivateKey: @unchecked Sendable {
    let pkey: OpaquePointer
    public let algorithm: KeyAlgorithm

    private init(owning pkey: OpaquePointer, algorithm: KeyAlgorithm) {
        self.pkey = pkey
        self.algorithm = algorithm
    }

    deinit { EVP_PKEY_free(pkey) }

    public static func generate(_ algorithm: KeyAlgorithm) throws(CryptoError) -> PrivateKey {
        var pkey: OpaquePointer?
        if let type = algorithm.rawType {
            guard let ctx = EVP_PKEY_CTX_new_id(type, nil) else { throw .openssl("EVP_PKEY_CTX_new_id") }
            defer { EVP_PKEY_CTX_free(ctx) }
            guard EVP_PKEY_keygen_init(ctx) == 1, EVP_PKEY_keygen(ctx, &pkey) == 1 else {
                throw .openssl("keygen \(algorithm)")
            }
        } else {
            pkey = fc_p256_generate()
        }
        guard let pkey else { throw .openssl("keygen \(algorithm)") }
        return PrivateKey(owning: pkey, algorithm: algorithm)
    }

    /// A key from its raw private bytes: the 32-byte seed of Ed25519/X25519
    /// (RFC 8032, RFC 7748) or the 32-byte scalar of P-256.
    public convenience init(raw: [UInt8], algorithm: KeyAlgorithm) throws(CryptoError) {
        guard raw.count == 32 else { throw CryptoError(.invalidLength, "\(algorithm) private key must be 32 bytes, got \(raw.count)") }
        let pkey: OpaquePointer? = if let type = algorithm.rawType {
            EVP_PKEY_new_raw_private_key(type, nil, raw, raw.count)
        } else {
            fc_p256_private_from_scalar(raw, raw.count)
        }
        guard let pkey else { throw CryptoError(.invalidKey, "not a valid \(algorithm) private key") }
        self.init(owning: pkey, algorithm: algorithm)
    }

    /// Parses a PKCS#8 PEM private key ("-----BEGIN PRIVATE KEY-----"), as
    /// written by `pemPKCS8` or `openssl genpkey`.
    public convenience init(pem: String) throws(CryptoError) {
        // A callback that gives no passphrase: with none, OpenSSL would prompt on the terminal.
        let parsed = withMemoryBIO(pem) { bio in PEM_read_bio_PrivateKey(bio, nil, { _, _, _, _ in -1 }, nil) }
        guard let parsed else {
            if pem.contains("ENCRYPTED") {
                throw CryptoError(.invalidKey, "the private key is encrypted with a passphrase; fleetcast reads unencrypted PKCS#8 keys (openssl pkey -in KEY -out PLAIN.key, kept as private as KEY)")
            }
            throw CryptoError(.invalidKey, "not a PEM private key")
        }
        guard let alg = keyAlgorithm(of: parsed) else {
            EVP_PKEY_free(parsed)
            throw CryptoError(.wrongAlgorithm, "private key is not Ed25519, X25519 or P-256")
        }
        self.init(owning: parsed, algorithm: alg)
    }

    public func pemPKCS8() throws(CryptoError) -> String {
        try memoryBIOString { bio in PEM_write_bio_PrivateKey(bio, pkey, nil, nil, 0, nil, nil) }
    }

    public var publicKey: PublicKey {
        // Re-import the public half so the public key object holds no secret.
        try! PublicKey(raw: publicRaw(), algorithm: algorithm)
    }

    private func publicRaw() -> [UInt8] {
        var out = [UInt8](repeating: 0, count: algorithm.publicKeyByteCount)
        var length = out.count
        let ok = if algorithm.rawType != nil {
            EVP_PKEY_get_raw_public_key(pkey, &out, &length)
        } else {
            fc_ec_public_point(pkey, &out, out.count, &length)
        }
        precondition(ok == 1 && length == out.count, "key without a public half")
        return out
    }

    /// Signs `message`: PureEdDSA for Ed25519, ECDSA with SHA-256 for P-256,
    /// returned as the 64-byte r||s that COSE uses (RFC 9053 §2.1).
    public func sign(_ message: [UInt8]) throws(CryptoError) -> [UInt8] {
        guard algorithm.canSign else { throw CryptoError(.wrongAlgorithm, "\(algorithm) keys cannot sign") }
        guard let ctx = EVP_MD_CTX_new() else { throw .openssl("EVP_MD_CTX_new") }
        defer { EVP_MD_CTX_free(ctx) }
        let md: OpaquePointer? = algorithm == .p256 ? fc_sha256() : nil
        guard EVP_DigestSignInit(ctx, nil, md, nil, pkey) == 1 else { throw .openssl("EVP_DigestSignInit") }
        var length = 0
        guard EVP_DigestSign(ctx, nil, &length, message, message.count) == 1 else { throw .openssl("EVP_DigestSign") }
        var signature = [UInt8](repeating: 0, count: length)
        guard EVP_DigestSign(ctx, &signature, &length, message, message.count) == 1 else { throw .openssl("EVP_DigestSign") }
        signature.removeSubrange(length...)
        guard algorithm == .p256 else { return signature }
        var raw = [UInt8](repeating: 0, count: KeyAlgorithm.signatureByteCount)
        guard fc_ecdsa_der_to_raw(signature, signature.count, &raw, 32) == 1 else { throw .openssl("ECDSA DER to raw") }
        return raw
    }

    /// ECDH: the raw shared secret with `peer` (x-coordinate for P-256, RFC 7748 for X25519).
    public func sharedSecret(with peer: PublicKey) throws(CryptoError) -> [UInt8] {
        guard algorithm.canAgree, peer.algorithm == algorithm else {
            throw CryptoError(.wrongAlgorithm, "cannot agree \(algorithm) with \(peer.algorithm)")
        }
        guard let ctx = EVP_PKEY_CTX_new(pkey, nil) else { throw .openssl("EVP_PKEY_CTX_new") }
        defer { EVP_PKEY_CTX_free(ctx) }
        guard EVP_PKEY_derive_init(ctx) == 1, EVP_PKEY_derive_set_peer(ctx, peer.pkey) == 1 else {
            throw .openssl("ECDH init")
        }
        var length = 0
        guard EVP_PKEY_derive(ctx, nil, &length) == 1 else { throw .openssl("ECDH length") }
        var secret = [UInt8](repeating: 0, count: length)
        guard EVP_PKEY_derive(ctx, &secret, &length) == 1 else { throw .openssl("ECDH derive") }
        return Array(secret.prefix(length))
    }
}

/// A public key: verifies signatures and is a peer for key agreement.
public final class PublicKey: @unchecked Sendable, Hashable, CustomStringConvertible {
    let pkey: OpaquePointer
    public let algorithm: KeyAlgorithm
    /// Raw public key: 32 bytes, or the 65-byte uncompressed P-256 point.
    public let raw: [UInt8]

    deinit { EVP_PKEY_free(pkey) }

    public init(raw: [UInt8], algorithm: KeyAlgorithm) throws(CryptoError) {
        guard raw.count == algorithm.publicKeyByteCount else {
            throw CryptoError(.invalidLength, "\(algorithm) public key must be \(algorithm.publicKeyByteCount) bytes, got \(raw.count)")
        }
        let pkey: OpaquePointer? = if let type = algorithm.rawType {
            EVP_PKEY_new_raw_public_key(type, nil, raw, raw.count)
        } else {
            fc_p256_public_from_point(raw, raw.count)
        }
        guard let pkey else { throw CryptoError(.invalidKey, "not a valid \(algorithm) public key") }
        self.pkey = pkey
        self.algorithm = algorithm
        self.raw = raw
    }

    /// Parses a SubjectPublicKeyInfo PEM ("-----BEGIN PUBLIC KEY-----").
    public convenience init(pem: String) throws(CryptoError) {
        let parsed = withMemoryBIO(pem) { bio in PEM_read_bio_PUBKEY(bio, nil, nil, nil) }
        guard let parsed else { throw CryptoError(.invalidKey, "not a PEM public key") }
        defer { EVP_PKEY_free(parsed) }
        guard let alg = keyAlgorithm(of: parsed) else {
            throw CryptoError(.wrongAlgorithm, "public key is not Ed25519, X25519 or P-256")
        }
        var out = [UInt8](repeating: 0, count: alg.publicKeyByteCount)
        var length = out.count
        let ok = alg == .p256 ? fc_ec_public_point(parsed, &out, out.count, &length)
            : EVP_PKEY_get_raw_public_key(parsed, &out, &length)
        guard ok == 1, length == out.count else { throw .openssl("public key export") }
        try self.init(raw: out, algorithm: alg)
    }

    public func pem() throws(CryptoError) -> String {
        try memoryBIOString { bio in PEM_write_bio_PUBKEY(bio, pkey) }
    }

    /// The key's identifier: the first 8 bytes of SHA-256 over its DER
    /// SubjectPublicKeyInfo (RFC 7093 method 1, truncated). Identifies, never
    /// authenticates: a signature is always checked against the key itself.
    public var keyID: [UInt8] {
        var der: UnsafeMutablePointer<UInt8>?
        let length = i2d_PUBKEY(pkey, &der)
        precondition(length > 0 && der != nil, "i2d_PUBKEY failed")
        defer { CRYPTO_free(der, #fileID, #line) }
        return Array(SHA256.hash(UnsafeRawBufferPointer(start: der, count: Int(length))).prefix(8))
    }

    /// Checks a signature made by `PrivateKey.sign`. Malformed signatures
    /// return false; they are never an error.
    public func verify(signature: [UInt8], for message: [UInt8]) -> Bool {
        guard algorithm.canSign, signature.count == KeyAlgorithm.signatureByteCount else { return false }
        var signatureBytes = signature
        if algorithm == .p256 {
            var der = [UInt8](repeating: 0, count: 80)
            let length = fc_ecdsa_raw_to_der(signature, 32, &der, Int32(der.count))
            guard length > 0 else { return false }
            signatureBytes = Array(der.prefix(Int(length)))
        }
        guard let ctx = EVP_MD_CTX_new() else { return false }
        defer { EVP_MD_CTX_free(ctx); ERR_clear_error() }
        let md: OpaquePointer? = algorithm == .p256 ? fc_sha256() : nil
        guard EVP_DigestVerifyInit(ctx, nil, md, nil, pkey) == 1 else { return false }
        return EVP_DigestVerify(ctx, signatureBytes, signatureBytes.count, message, message.count) == 1
    }

    public static func == (a: PublicKey, b: PublicKey) -> Bool { a.algorithm == b.algorithm && a.raw == b.raw }
    public func hash(into h: inout Hasher) { h.combine(algorithm); h.combine(raw) }
    public var description: String { "\(algorithm) key \(keyID.hexString)" }
}

extension Collection<UInt8> {
    /// Lowercase hexadecimal, for diagnostics and `inspect`.
    public var hexString: String {
        let digits = Array("0123456789abcdef".utf8)
        var out = [UInt8]()
        out.reserveCapacity(count * 2)
        for b in self { out.append(digits[Int(b >> 4)]); out.append(digits[Int(b & 15)]) }
        return String(decoding: out, as: UTF8.self)
    }
}

extension Array<UInt8> {
    /// Parses hexadecimal; nil on odd length or a non-hex character.
    public init?(hex: some StringProtocol) {
        let chars = Array(hex.utf8)
        guard chars.count % 2 == 0 else { return nil }
        func value(_ c: UInt8) -> UInt8? {
            switch c {
            case 48...57: c - 48
            case 97...102: c - 87
            case 65...70: c - 55
            default: nil
            }
        }
        var out = [UInt8]()
        out.reserveCapacity(chars.count / 2)
        var i = 0
        while i < chars.count {
            guard let hi = value(chars[i]), let lo = value(chars[i + 1]) else { return nil }
            out.append(hi << 4 | lo)
            i += 2
        }
        self = out
    }
}
