import ArgumentParser
import CBOR
import FleetCrypto
import Foundation
import UpdateBundle

struct Inspect: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show what a bundle claims (signatures are checked only with --trusted-key).",
        discussion: "Reads only the header and the manifest; use `verify` to check the payload."
    )

    @Argument(help: "Bundle file.")
    var bundle: String

    @Flag(help: "Machine-readable JSON.")
    var json = false

    @Option(name: .customLong("trusted-key"), help: "Trusted signing public key; repeatable. Reports whether the signatures verify.")
    var trustedKeys: [String] = []

    func run() throws {
        try reportingFailures {
            let opened = try UnverifiedBundle(path: bundle)
            let (m, signers) = try opened.unverifiedContents()
            var signatureStatus = "not checked (no --trusted-key)"
            if !trustedKeys.isEmpty {
                let trust = TrustPolicy(trustedKeys: try trustedKeys.map(loadPublicKey))
                do {
                    let v = try ManifestVerifier.verify(envelope: opened.envelope, trust: trust, device: DevicePolicy(now: m.createdAt))
                    signatureStatus = "valid (\(v.validSignerKeyIDs.count) of \(m.signatureThreshold) required)"
                } catch let e as BundleError { signatureStatus = "INVALID: \(e.reason)" }
            }
            // Expiry against now (the signature is judged at the bundle's own creation time).
            let expired = currentUnixTime() >= m.expiresAt
            let geometry = BlockGeometry(payloadSize: m.payload.size, profile: m.transport)
            let tagBytes = UInt64(geometry.blockCount) * UInt64(m.transport.repairSymbolsPerBlock + m.transport.sourceSymbolsPerBlock) * 16
            if json {
                let object: [String: Any] = [
                    "product": m.productID, "hardware": m.hardwareIDs, "version": m.version, "sequence": m.sequence,
                    "created": m.createdAt, "expires": m.expiresAt, "expired": expired, "bundle_id": m.bundleID.hexString,
                    "components": m.components.map { ["name": $0.name, "size": $0.size, "sha256": $0.sha256.hexString, "target": $0.installTarget] },
                    "payload": ["compression": m.payload.compression == .zlib ? "zlib" : "none", "size": m.payload.size,
                                "sha256": m.payload.sha256.hexString, "compressed_size": m.payload.compressedSize,
                                "uncompressed_size": m.payload.uncompressedSize],
                    "transport": ["symbol_size": m.transport.symbolSize, "symbols_per_block": m.transport.sourceSymbolsPerBlock,
                                  "repair_ceiling": m.transport.repairSymbolsPerBlock, "blocks": geometry.blockCount],
                    "authentication": ["head": m.authentication.head.hexString, "segments": m.authentication.segmentCount,
                                       "blocks_per_segment": m.authentication.blocksPerSegment, "size": m.authentication.size,
                                       "overhead": Double(m.authentication.size) / Double(m.payload.size)],
                    "encryption": m.encryption.map { e in
                        ["algorithm": "A256GCM", "chunk_size": e.chunkSize,
                         "recipients": e.recipients.map { ["method": "\($0.method)", "key_id": $0.keyID.hexString] }] as [String: Any]
                    } ?? NSNull(),
                    "signers": m.signerKeyIDs.map(\.hexString), "threshold": m.signatureThreshold,
                    "signatures": signers.map(\.hexString), "signature_status": signatureStatus,
                ]
                let data = try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys])
                print(String(decoding: data, as: UTF8.self))
                _ = tagBytes
                return
            }
            // Every string from the manifest is escaped for the terminal: it is unverified here.
            let safe = terminalSafe
            print("""
            bundle      \(safe(bundle)) (format 1, \(formatBytes(opened.header.totalSize)))
            product     \(safe(m.productID)) version \(safe(m.version)), sequence \(m.sequence)
            hardware    \(m.hardwareIDs.map(safe).joined(separator: ", "))
            created     \(formatTime(m.createdAt)), expires \(formatTime(m.expiresAt))\(expired ? " (EXPIRED)" : "")
            bundle id   \(m.bundleID.hexString)
            components
            """)
            for c in m.components {
                print("  \(safe(c.name))  \(formatBytes(c.size))  -> \(safe(c.installTarget))  sha256 \(c.sha256.hexString)")
            }
            print("""
            payload     \(m.payload.compression == .zlib ? "zlib" : "uncompressed"), \(formatBytes(m.payload.uncompressedSize)) -> \(formatBytes(m.payload.compressedSize)) compressed, \(formatBytes(m.payload.size)) transferred
                        sha256 \(m.payload.sha256.hexString)
            encryption  \(m.encryption.map { "AES-256-GCM, \($0.chunkSize)-byte chunks, \($0.recipients.count) recipient(s): " + $0.recipients.map { "\($0.method) \($0.keyID.hexString)" }.joined(separator: ", ") } ?? "none")
            transport   \(m.transport.symbolSize)-byte symbols, k = \(m.transport.sourceSymbolsPerBlock), repair ceiling R = \(m.transport.repairSymbolsPerBlock), \(geometry.blockCount) blocks
            auth chain  \(m.authentication.segmentCount) segment(s) of \(m.authentication.blocksPerSegment) blocks, \(formatBytes(m.authentication.size)) (\(String(format: "%.2f", Double(m.authentication.size) * 100 / Double(m.payload.size)))% of payload), head \(m.authentication.head.hexString)
            signers     \(m.signatureThreshold) of [\(m.signerKeyIDs.map(\.hexString).joined(separator: ", "))]; signed by [\(signers.map(\.hexString).joined(separator: ", "))]
            signatures  \(safe(signatureStatus))
            """)
        }
    }
}
