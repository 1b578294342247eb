import COpenSSL

/// A failure of a cryptographic operation or of key material.
///
/// Compared by `code` only; `reason` carries diagnostics (including OpenSSL's
/// error queue) for humans. A signature that does not verify is *not* an
/// error: `verify` returns `false`.
public struct CryptoError: Error, Hashable, CustomStringConvertible, Sendable {
    public enum Code: String, Sendable {
        case invalidKey, invalidLength, wrongAlgorithm, authenticationFailed, openssl, randomness
    }
    public let code: Code
    public let reason: String

    public init(_ code: Code, _ reason: String) {
        self.code = code
        self.reason = reason
    }

    public static func == (a: CryptoError, b: CryptoError) -> Bool { a.code == b.code }
    public func hash(into h: inout Hasher) { h.combine(code) }
    public var description: String { "\(code.rawValue): \(reason)" }

    /// Drains OpenSSL's thread-local error queue into the reason.
    @inline(never)
    static func openssl(_ what: String) -> CryptoError {
        var messages: [String] = []
        while true {
            let e = ERR_get_error()
            if e == 0 { break }
            var buffer = [CChar](repeating: 0, count: 256)
            ERR_error_string_n(e, &buffer, buffer.count)
            messages.append(String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self))
        }
        return CryptoError(.openssl, messages.isEmpty ? what : "\(what): \(messages.joined(separator: "; "))")
    }
}

/// Cryptographically secure random bytes from OpenSSL's DRBG.
///
/// Only edges (pack, keygen) call this; pure modules take their randomness
/// as an argument.
public enum SecureRandom {
    public static func bytes(_ count: Int) throws(CryptoError) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        guard count == 0 || RAND_bytes(&out, Int32(count)) == 1 else { throw .openssl("RAND_bytes") }
        return out
    }
}
