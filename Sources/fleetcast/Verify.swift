import ArgumentParser
import FleetCrypto
import Foundation
import UpdateBundle

struct Verify: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Verify a bundle as a device would (step 2) and optionally extract it.",
        discussion: """
        Checks, in order: the signatures against the trusted keys and threshold, expiry,
        product and hardware compatibility, anti-rollback, then every payload byte (each
        block and symbol against the authentication chain, the payload hash), decrypts and
        decompresses, and checks each component's size and hash. Components are written to
        --output-dir only after every check passed. Each failure has its own exit status
        (see `fleetcast --help`).
        """
    )

    @Argument(help: "Bundle file.")
    var bundle: String

    @Option(name: .customLong("trusted-key"), help: "Trusted signing public key (PEM); repeatable.")
    var trustedKeys: [String]

    @Option(help: "Signatures required (the manifest's own threshold applies too).")
    var threshold: Int = 1

    @Option(name: .customLong("device-key"), help: "This device's decryption private key (PEM); repeatable.")
    var deviceKeys: [String] = []

    @Option(name: .customLong("group-key"), help: "Group key file; repeatable.")
    var groupKeys: [String] = []

    @Option(help: "This device's hardware ID: the manifest must list it.")
    var hardwareID: String?

    @Option(help: "This device's product ID: the manifest must name it.")
    var product: String?

    @Option(help: "Installed anti-rollback sequence: the update's must be larger.")
    var installedSequence: UInt64?

    @Option(help: "Verification time as Unix seconds (default: now).")
    var now: UInt64?

    @Option(help: "Directory to write the verified components into.")
    var outputDir: String?

    @Flag(help: "No progress line.")
    var quiet = false

    func run() throws {
        try reportingFailures {
            let opened = try UnverifiedBundle(path: bundle)
            let trust = TrustPolicy(trustedKeys: try trustedKeys.map(loadPublicKey), threshold: threshold)
            let device = DevicePolicy(now: now ?? currentUnixTime(), hardwareID: hardwareID, installedSequence: installedSequence, productID: product)
            let verified = try opened.verifyManifest(trust: trust, device: device)
            let m = verified.manifest
            log.debug("manifest verified", metadata: ["signers": "\(verified.validSignerKeyIDs.map(\.hexString))"])
            if let outputDir {
                try FileManager.default.createDirectory(atPath: outputDir, withIntermediateDirectories: true)
            }
            let keys = DecryptionKeys(deviceKeys: try deviceKeys.map(loadPrivateKey), groupKeys: try groupKeys.map(loadGroupKey))
            let progress = ProgressLine("verifying", enabled: !quiet)
            let result = try opened.verifyPayload(verified, keys: keys, outputDirectory: outputDir, progress: progress.update)
            progress.finish()
            print("verified \(bundle): \(m.productID) \(m.version) (sequence \(m.sequence)), \(verified.validSignerKeyIDs.count) valid signature(s), \(m.components.count) component(s), \(formatBytes(m.payload.uncompressedSize))\(m.encryption != nil ? ", decrypted" : "")")
            for (name, path) in result.componentPaths.sorted(by: { $0.key < $1.key }) { print("  \(name) -> \(path)") }
        }
    }
}
