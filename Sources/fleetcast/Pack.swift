import ArgumentParser
import FleetCrypto
import Foundation
import UpdateBundle

struct Pack: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Pack images into a signed, optionally encrypted update bundle (step A).",
        discussion: """
        Each --component is NAME=PATH or NAME=PATH:TARGET (TARGET defaults to NAME). The \
        payload is zlib-compressed, encrypted with a fresh AES-256 key if any --recipient or \
        --group-key is given (the key is wrapped for each), cut into FEC blocks, and every \
        symbol the sender may ever send gets a tag in a hash chain the signature covers.

        Example:
          fleetcast pack --output update.fcb --product gateway --hardware gw-rev-a \\
            --version 2.1.0 --sequence 42 --expires-in 30d \\
            --component rootfs=build/rootfs.img --sign vendor.key \\
            --recipient device-0001.pub
        """
    )

    @Option(name: .shortAndLong, help: "Bundle file to write.")
    var output: String

    @Option(help: "Product ID the update is for.")
    var product: String

    @Option(name: .customLong("hardware"), help: "Compatible hardware ID (repeat for several).")
    var hardware: [String]

    @Option(help: "Human-readable version, e.g. 2.1.0.")
    var version: String

    @Option(help: "Anti-rollback sequence number: devices install only a larger one.")
    var sequence: UInt64

    @Option(help: "Validity from now: 90s, 15m, 12h, 30d, 1y.")
    var expiresIn: String = "30d"

    @Option(help: "Creation time as Unix seconds (default: now). For reproducible tests.")
    var createdAt: UInt64?

    @Option(name: .customLong("component"), help: "NAME=PATH[:TARGET] (repeat for several).")
    var components: [String]

    @Option(name: .customLong("sign"), help: "Signing key file (PEM, Ed25519 or P-256); repeat for k-of-n.")
    var signingKeys: [String]

    @Option(name: .customLong("signer-id"), help: "Hex key ID of a further authorised signer (co-signs elsewhere).")
    var signerIDs: [String] = []

    @Option(help: "Signatures a device must verify (k of the authorised signers).")
    var threshold: Int = 1

    @Option(name: .customLong("recipient"), help: "Device public key (P-256 or X25519 PEM) that may decrypt; repeatable.")
    var recipients: [String] = []

    @Option(name: .customLong("group-key"), help: "Group key file that may decrypt; repeatable.")
    var groupKeys: [String] = []

    @Option(help: "Compression: zlib or none.")
    var compression: String = "zlib"

    @Option(help: "zlib level 1 (fast) to 9 (small).")
    var level: Int32 = 6

    @Option(help: "Transport: bytes per symbol (one per datagram).")
    var symbolSize: Int = TransportProfile.default.symbolSize

    @Option(help: "Transport: source symbols per FEC block (k).")
    var symbolsPerBlock: Int = TransportProfile.default.sourceSymbolsPerBlock

    @Option(help: "Transport: repair ceiling per block (R); k + R <= 256.")
    var repair: Int = TransportProfile.default.repairSymbolsPerBlock

    @Option(help: "Authentication records per chain segment (default: as many as fill one block of the chain with the next segment's tags; 66 for the default profile).")
    var blocksPerSegment: Int?

    @Flag(help: "No progress line.")
    var quiet = false

    func run() throws {
        try reportingFailures {
            guard let validity = parseDuration(expiresIn), validity > 0 else {
                throw BundleError(.invalidInput, "--expires-in '\(expiresIn)' is not a duration like 30d (at most 100y)")
            }
            let created = createdAt ?? currentUnixTime()
            guard created <= UInt64.max - validity else {
                throw BundleError(.invalidInput, "--created-at \(created) with --expires-in \(expiresIn) passes the end of 64-bit time")
            }
            var sources: [PackRequest.ComponentSource] = []
            for spec in components {
                guard let eq = spec.firstIndex(of: "=") else { throw BundleError(.invalidInput, "--component '\(spec)' is not NAME=PATH[:TARGET]") }
                let name = String(spec[..<eq])
                var path = String(spec[spec.index(after: eq)...])
                var target = name
                if let colon = path.lastIndex(of: ":") {
                    target = String(path[path.index(after: colon)...])
                    path = String(path[..<colon])
                }
                guard FileManager.default.isReadableFile(atPath: path) else { throw BundleError(.invalidInput, "component file '\(path)' is not readable") }
                sources.append(.init(name: name, path: path, installTarget: target))
            }
            var request = PackRequest(productID: product, hardwareIDs: hardware, version: version, sequence: sequence,
                                      createdAt: created, expiresAt: created + validity, components: sources,
                                      signingKeys: try signingKeys.map(loadPrivateKey))
            switch compression {
            case "zlib": request.compression = .zlib
            case "none": request.compression = .none
            default: throw BundleError(.invalidInput, "--compression must be zlib or none")
            }
            request.compressionLevel = level
            request.transport = try TransportProfile(symbolSize: symbolSize, sourceSymbolsPerBlock: symbolsPerBlock, repairSymbolsPerBlock: repair)
            request.blocksPerSegment = blocksPerSegment
            request.recipients = try recipients.map(loadPublicKey)
            request.groupKeys = try groupKeys.map(loadGroupKey)
            request.additionalSignerKeyIDs = try signerIDs.map { id in
                guard let bytes = [UInt8](hex: id), (1...32).contains(bytes.count) else { throw BundleError(.invalidInput, "--signer-id '\(id)' is not a hex key ID") }
                return bytes
            }
            request.signatureThreshold = threshold

            let progress = ProgressLine("packing", enabled: !quiet)
            let manifest = try Packer.pack(request, to: output, progress: progress.update)
            progress.finish()
            let size = (try? FileManager.default.attributesOfItem(atPath: output)[.size] as? UInt64) ?? 0
            print("wrote \(output): \(formatBytes(size)), \(manifest.components.count) component(s), \(formatBytes(manifest.payload.uncompressedSize)) -> \(formatBytes(manifest.payload.size)) payload, \(manifest.encryption.map { "encrypted for \($0.recipients.count) recipient(s)" } ?? "not encrypted"), signed by \(request.signingKeys.count) key(s)")
        }
    }
}
