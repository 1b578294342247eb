import COpenSSL

/// AES-256-GCM (NIST SP 800-38D) with a 96-bit nonce and a 128-bit tag.
///
/// The caller guarantees a nonce is never reused under one key; Fleetcast
/// uses a fresh random key per bundle and the chunk index as nonce
/// (Specs/bundle.md §6).
public final class AES256GCM: @unchecked Sendable {
    public static let keyByteCount = 32
    public static let nonceByteCount = 12
    public static let tagByteCount = 16

    private let key: [UInt8]
    private let context: OpaquePointer

    public init(key: [UInt8]) throws(CryptoError) {
        guard key.count == Self.keyByteCount else { throw CryptoError(.invalidLength, "AES-256 key must be 32 bytes, got \(key.count)") }
        guard let context = EVP_CIPHER_CTX_new() else { throw .openssl("EVP_CIPHER_CTX_new") }
        self.key = key
        self.context = context
    }

    deinit { EVP_CIPHER_CTX_free(context) }

    /// Encrypts `plaintext` into `ciphertext || tag`.
    public func seal(_ plaintext: UnsafeRawBufferPointer, nonce: [UInt8], aad: [UInt8], into output: inout [UInt8]) throws(CryptoError) {
        guard nonce.count == Self.nonceByteCount else { throw CryptoError(.invalidLength, "GCM nonce must be 12 bytes") }
        guard EVP_EncryptInit_ex(context, EVP_aes_256_gcm(), nil, key, nonce) == 1 else { throw .openssl("GCM init") }
        var length: Int32 = 0
        if !aad.isEmpty {
            guard EVP_EncryptUpdate(context, nil, &length, aad, Int32(aad.count)) == 1 else { throw .openssl("GCM aad") }
        }
        let start = output.count
        output.append(contentsOf: [UInt8](repeating: 0, count: plaintext.count + Self.tagByteCount))
        let ok: Bool = output.withUnsafeMutableBufferPointer { out in
            let base = out.baseAddress! + start
            var written: Int32 = 0
            if plaintext.count > 0 {
                guard EVP_EncryptUpdate(context, base, &written, plaintext.baseAddress, Int32(plaintext.count)) == 1 else { return false }
            }
            var final: Int32 = 0
            guard EVP_EncryptFinal_ex(context, base + Int(written), &final) == 1,
                  Int(written + final) == plaintext.count else { return false }
            return EVP_CIPHER_CTX_ctrl(context, EVP_CTRL_GCM_GET_TAG, Int32(Self.tagByteCount), base + plaintext.count) == 1
        }
        guard ok else { throw .openssl("GCM seal") }
    }

    public func seal(_ plaintext: [UInt8], nonce: [UInt8], aad: [UInt8] = []) throws(CryptoError) -> [UInt8] {
        var out: [UInt8] = []
        let result = plaintext.withUnsafeBytes { p in
            Result { () throws(CryptoError) in try seal(p, nonce: nonce, aad: aad, into: &out) }
        }
        try result.get()
        return out
    }

    /// Decrypts `ciphertext || tag`; throws `.authenticationFailed` if the tag,
    /// nonce, AAD or key do not match.
    public func open(_ sealed: UnsafeRawBufferPointer, nonce: [UInt8], aad: [UInt8], into output: inout [UInt8]) throws(CryptoError) {
        guard nonce.count == Self.nonceByteCount else { throw CryptoError(.invalidLength, "GCM nonce must be 12 bytes") }
        guard sealed.count >= Self.tagByteCount else { throw CryptoError(.authenticationFailed, "sealed chunk shorter than its tag") }
        let bodyCount = sealed.count - Self.tagByteCount
        guard EVP_DecryptInit_ex(context, EVP_aes_256_gcm(), nil, key, nonce) == 1 else { throw .openssl("GCM init") }
        var length: Int32 = 0
        if !aad.isEmpty {
            guard EVP_DecryptUpdate(context, nil, &length, aad, Int32(aad.count)) == 1 else { throw .openssl("GCM aad") }
        }
        let start = output.count
        output.append(contentsOf: [UInt8](repeating: 0, count: bodyCount))  // not repeatElement: generic and slow in debug builds
        var tag = Array(UnsafeRawBufferPointer(rebasing: sealed[bodyCount...]))
        let ok: Bool = output.withUnsafeMutableBufferPointer { out in
            let base = out.baseAddress! + start
            var written: Int32 = 0
            if bodyCount > 0 {
                guard EVP_DecryptUpdate(context, base, &written, sealed.baseAddress, Int32(bodyCount)) == 1 else { return false }
            }
            guard EVP_CIPHER_CTX_ctrl(context, EVP_CTRL_GCM_SET_TAG, Int32(Self.tagByteCount), &tag) == 1 else { return false }
            var final: Int32 = 0
            return EVP_DecryptFinal_ex(context, base + Int(written), &final) == 1
        }
        guard ok else {
            output.removeSubrange(start...)
            ERR_clear_error()
            throw CryptoError(.authenticationFailed, "AES-GCM tag mismatch")
        }
    }

    public func open(_ sealed: [UInt8], nonce: [UInt8], aad: [UInt8] = []) throws(CryptoError) -> [UInt8] {
        var out: [UInt8] = []
        let result = sealed.withUnsafeBytes { p in
            Result { () throws(CryptoError) in try open(p, nonce: nonce, aad: aad, into: &out) }
        }
        try result.get()
        return out
    }
}

/// HKDF with SHA-256 (RFC 5869).
public enum HKDF {
    public static func sha256(inputKeyMaterial ikm: [UInt8], salt: [UInt8], info: [UInt8], outputByteCount: Int) throws(CryptoError) -> [UInt8] {
        guard outputByteCount > 0, outputByteCount <= 255 * 32 else { throw CryptoError(.invalidLength, "HKDF output length \(outputByteCount) out of range") }
        var out = [UInt8](repeating: 0, count: outputByteCount)
        guard fc_hkdf_sha256(ikm, ikm.count, salt, salt.count, info, info.count, &out, out.count) == 1 else {
            throw .openssl("HKDF")
        }
        return out
    }
}

/// HMAC with SHA-256 (RFC 2104): the sender's stateless REGISTER cookies
/// (Specs/protocol.md P-30).
public enum HMAC {
    public static func sha256(key: [UInt8], message: [UInt8]) -> [UInt8] {
        precondition(!key.isEmpty && key.count <= Int(Int32.max), "an HMAC key")
        var out = [UInt8](repeating: 0, count: 32)
        let ok = key.withUnsafeBufferPointer { k in
            message.withUnsafeBufferPointer { m in
                out.withUnsafeMutableBufferPointer { fc_hmac_sha256(k.baseAddress, k.count, m.baseAddress, m.count, $0.baseAddress) }
            }
        }
        precondition(ok == 1, "HMAC-SHA256 failed in OpenSSL")
        return out
    }
}

/// AES Key Wrap with a 256-bit KEK (RFC 3394, NIST SP 800-38F KW), as COSE's A256KW.
public enum AESKeyWrap {
    public static let overheadByteCount = 8

    public static func wrap(key plaintextKey: [UInt8], kek: [UInt8]) throws(CryptoError) -> [UInt8] {
        guard plaintextKey.count >= 16, plaintextKey.count % 8 == 0 else { throw CryptoError(.invalidLength, "key to wrap must be a multiple of 8 bytes, at least 16") }
        return try run(encrypt: true, input: plaintextKey, kek: kek)
    }

    /// Unwraps; throws `.authenticationFailed` if the integrity check fails
    /// (wrong KEK or tampered wrapped key).
    public static func unwrap(_ wrapped: [UInt8], kek: [UInt8]) throws(CryptoError) -> [UInt8] {
        guard wrapped.count >= 24, wrapped.count % 8 == 0 else { throw CryptoError(.invalidLength, "wrapped key has an impossible length \(wrapped.count)") }
        return try run(encrypt: false, input: wrapped, kek: kek)
    }

    private static func run(encrypt: Bool, input: [UInt8], kek: [UInt8]) throws(CryptoError) -> [UInt8] {
        guard kek.count == 32 else { throw CryptoError(.invalidLength, "A256KW key-encryption key must be 32 bytes") }
        guard let ctx = EVP_CIPHER_CTX_new() else { throw .openssl("EVP_CIPHER_CTX_new") }
        defer { EVP_CIPHER_CTX_free(ctx) }
        _ = fc_cipher_allow_wrap(ctx)
        guard EVP_CipherInit_ex(ctx, EVP_aes_256_wrap(), nil, kek, nil, encrypt ? 1 : 0) == 1 else { throw .openssl("KW init") }
        var out = [UInt8](repeating: 0, count: input.count + 16)
        var length: Int32 = 0
        guard EVP_CipherUpdate(ctx, &out, &length, input, Int32(input.count)) == 1 else {
            ERR_clear_error()
            if encrypt { throw .openssl("KW wrap") }
            throw CryptoError(.authenticationFailed, "AES key unwrap integrity check failed")
        }
        var final: Int32 = 0
        guard EVP_CipherFinal_ex(ctx, &out[Int(length)], &final) == 1 else { throw .openssl("KW final") }
        return Array(out.prefix(Int(length + final)))
    }
}
