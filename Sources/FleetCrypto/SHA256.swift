import COpenSSL

/// Streaming SHA-256 (FIPS 180-4).
///
/// A value type over an OpenSSL digest context; copying it is a programmer
/// error, so it is non-copyable.
public struct SHA256: ~Copyable {
    public static let byteCount = 32
    private let context: OpaquePointer

    public init() {
        guard let context = EVP_MD_CTX_new() else { fatalError("EVP_MD_CTX_new: out of memory") }
        self.context = context
        precondition(EVP_DigestInit_ex2(context, fc_sha256(), nil) == 1, "SHA-256 unavailable in OpenSSL")
    }

    deinit { EVP_MD_CTX_free(context) }

    public mutating func update(_ bytes: UnsafeRawBufferPointer) {
        guard bytes.count > 0 else { return }
        precondition(EVP_DigestUpdate(context, bytes.baseAddress, bytes.count) == 1)
    }

    public mutating func update(_ bytes: [UInt8]) {
        bytes.withUnsafeBytes { update($0) }
    }

    public mutating func update(_ bytes: ArraySlice<UInt8>) {
        bytes.withUnsafeBytes { update($0) }
    }

    /// Finishes the hash and resets the context for reuse.
    public mutating func finalize() -> [UInt8] {
        var out = [UInt8](repeating: 0, count: Self.byteCount)
        var length: UInt32 = 0
        precondition(EVP_DigestFinal_ex(context, &out, &length) == 1 && length == 32)
        precondition(EVP_DigestInit_ex2(context, fc_sha256(), nil) == 1)
        return out
    }

    public static func hash(_ bytes: UnsafeRawBufferPointer) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: byteCount)
        var length: UInt32 = 0
        precondition(EVP_Digest(bytes.baseAddress, bytes.count, &out, &length, fc_sha256(), nil) == 1)
        return out
    }

    /// SHA-256 of `a` followed by `b`, without a heap-allocated context: for
    /// the many short messages of per-symbol authentication.
    public static func hash(_ a: UnsafeRawBufferPointer, _ b: UnsafeRawBufferPointer) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: byteCount)
        out.withUnsafeMutableBufferPointer { fc_sha256_concat(a.baseAddress, a.count, b.baseAddress, b.count, $0.baseAddress!) }
        return out
    }

    public static func hash(_ bytes: [UInt8]) -> [UInt8] {
        bytes.withUnsafeBytes { hash($0) }
    }

    public static func hash(_ bytes: ArraySlice<UInt8>) -> [UInt8] {
        bytes.withUnsafeBytes { hash($0) }
    }
}

/// Constant-time comparison for secrets and authenticators.
public func constantTimeEquals(_ a: some Collection<UInt8>, _ b: some Collection<UInt8>) -> Bool {
    guard a.count == b.count else { return false }
    var difference: UInt8 = 0
    for (x, y) in zip(a, b) { difference |= x ^ y }
    return difference == 0
}
