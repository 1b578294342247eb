/// The fixed header at the start of a bundle file (Specs/bundle.md §3).
///
/// ```
///  0                   1                   2                   3
///  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// |                     magic "FLCB" (0x464C4342)                 |
/// +-------------------------------+-------------------------------+
/// |      format version = 2       |         reserved = 0          |
/// +-------------------------------+-------------------------------+
/// |                   signed manifest length (u32)                |
/// +---------------------------------------------------------------+
/// |                         reserved = 0                          |
/// +---------------------------------------------------------------+
/// |                   payload length (u64)                        |
/// |                                                               |
/// +---------------------------------------------------------------+
/// |                   auth chain length (u64)                     |
/// |                                                               |
/// +---------------------------------------------------------------+
/// then: signed manifest | payload | auth chain, and nothing after.
/// ```
public struct BundleHeader: Hashable, Sendable {
    public static let byteCount = 32
    public static let magic: [UInt8] = Array("FLCB".utf8)
    public static let formatVersion = UInt16(Manifest.formatVersion)

    public var envelopeLength: Int
    public var payloadLength: UInt64
    public var authLength: UInt64

    public init(envelopeLength: Int, payloadLength: UInt64, authLength: UInt64) {
        self.envelopeLength = envelopeLength
        self.payloadLength = payloadLength
        self.authLength = authLength
    }

    public func encoded() -> [UInt8] {
        var out = Self.magic + [UInt8(Self.formatVersion >> 8), UInt8(Self.formatVersion & 0xFF), 0, 0]
        out += bigEndian32(UInt32(envelopeLength)) + [0, 0, 0, 0] + bigEndian64(payloadLength) + bigEndian64(authLength)
        precondition(out.count == Self.byteCount)
        return out
    }

    /// Specs/bundle.md §3 B-1.
    public init(parsing bytes: [UInt8]) throws(BundleError) {
        guard bytes.count >= Self.byteCount else { throw BundleError(.malformed, "bundle shorter than its \(Self.byteCount)-byte header") }
        guard Array(bytes[0..<4]) == Self.magic else { throw BundleError(.malformed, "not a Fleetcast bundle (bad magic)") }
        let version = UInt16(bytes[4]) << 8 | UInt16(bytes[5])
        guard version == Self.formatVersion else { throw BundleError(.malformed, Manifest.versionMessage(Int(version))) }
        guard bytes[6] == 0, bytes[7] == 0, readBigEndian32(bytes, 12) == 0 else {
            throw BundleError(.malformed, "bundle header: reserved bytes are not zero")
        }
        envelopeLength = Int(readBigEndian32(bytes, 8))
        payloadLength = readBigEndian64(bytes, 16)
        authLength = readBigEndian64(bytes, 24)
        guard envelopeLength >= 1, envelopeLength <= BundleLimits.envelopeByteCountMax else {
            throw BundleError(.malformed, "signed manifest length \(envelopeLength) outside 1...\(BundleLimits.envelopeByteCountMax)")
        }
        guard payloadLength <= BundleLimits.payloadByteCountMax, authLength <= BundleLimits.payloadByteCountMax else {
            throw BundleError(.malformed, "payload or auth chain larger than \(BundleLimits.payloadByteCountMax) bytes")
        }
    }

    public var payloadOffset: UInt64 { UInt64(Self.byteCount + envelopeLength) }
    public var authOffset: UInt64 { payloadOffset + payloadLength }
    public var totalSize: UInt64 { authOffset + authLength }
}
