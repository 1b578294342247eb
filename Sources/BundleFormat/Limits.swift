/// Every bound Fleetcast puts on untrusted bundles and manifests, named once.
/// Specs/bundle.md §9 lists them with their reasons.
public enum BundleLimits {
    /// The signed manifest envelope: it travels in the announce, so it stays small.
    public static let envelopeByteCountMax = 256 * 1024
    public static let componentCountMax = 64
    public static let hardwareIDCountMax = 64
    public static let recipientCountMax = 1024
    public static let signatureCountMax = 16
    /// Product IDs, versions, component names, install targets.
    public static let textByteCountMax = 256
    /// One component, and the whole payload: 64 GiB.
    public static let payloadByteCountMax: UInt64 = 64 << 30
    /// Symbol size bounds: ISA-L needs 16 bytes; a jumbo frame carries < 9000.
    public static let symbolByteCountMin = 64
    public static let symbolByteCountMax = 8960
    /// Symbol indices are one byte: k + R <= 256.
    public static let symbolIndexCountMax = 256
    public static let blocksPerSegmentMax = 1024
    /// FEC blocks of the payload (Specs/bundle.md B-6b): a receiver keeps a little state
    /// per block from its join on, so the count a manifest implies is bounded before any
    /// of it is allocated. 2^20 blocks hold 64 GiB at 64 KiB a block; the compact profile
    /// (k = 64, T = 1400) needs 767,000 for 64 GiB, the default one fewer. Bounds the
    /// segment count too (at least one block a segment).
    public static let blockCountMax = 1 << 20
    /// Encryption chunk sizes allowed (plaintext bytes per AES-GCM chunk).
    public static let encryptionChunkByteCountMin = 1024
    public static let encryptionChunkByteCountMax = 1 << 20
    /// The manifest's tags of segment 0's auth-chain symbols (Specs/bundle.md B-13a): with
    /// the packer's default segment length one block's worth (4 KiB for the default
    /// profile); 64 KiB for 1,024 blocks a segment of it. Half the envelope's bound, so
    /// that signatures and recipients keep room; pack refuses a layout beyond it.
    public static let firstTagsByteCountMax = 128 * 1024
    /// Tag length of a symbol authenticator (truncated SHA-256).
    public static let symbolTagByteCount = 16
}
