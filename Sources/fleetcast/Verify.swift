import ArgumentParser
import FleetCrypto
import Foundation
import UpdateBundle

struct Verify: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Verify a bundle as a device would (step 2) and optionally extract it.",
        discussion: """
        Checks, in order: the signatures against the trusted keys and threshold, expiry, \
        product and hardware compatibility, anti-rollback, then every payload byte (each \
        block and symbol against the authentication chain, the payload hash), decrypts and \
        decompresses, and checks each component's size and hash. Components are written to \
        --output-dir only after every check passed. Each failure has its own exit status \
        (see `fleetcast --help`).
        """
    )

    @Argument(help: "Bundle file.")
    var bundle: String

    @OptionGroup var device: DeviceOptions

    @Option(help: "Verification time as Unix seconds (default: now).")
    var now: UInt64?

    @Option(help: "Directory to write the verified components into (never through a link; temporaries created exclusively).")
    var outputDir: String?

    @Option(help: "Mode of the written component files, in octal.")
    var componentMode: String = "0600"

    func validate() throws {
        guard let mode = mode_t(componentMode, radix: 8), mode <= 0o777 else { throw ValidationError("--component-mode wants an octal mode such as 0600 or 0644") }
    }

    @Flag(help: "No progress line.")
    var quiet = false

    func run() throws {
        try reportingFailures {
            let opened = try UnverifiedBundle(path: bundle)
            let verified = try opened.verifyManifest(trust: try device.trust(), device: device.policy(now: now ?? currentUnixTime()))
            let m = verified.manifest
            log.debug("manifest verified", metadata: ["signers": "\(verified.validSignerKeyIDs.map(\.hexString))"])
            if let outputDir {
                try FileManager.default.createDirectory(atPath: outputDir, withIntermediateDirectories: true)
            }
            let keys = try device.keys()
            let progress = ProgressLine("verifying", enabled: !quiet)
            let result = try opened.verifyPayload(verified, keys: keys, outputDirectory: outputDir, componentMode: mode_t(componentMode, radix: 8)!,
                                                  progress: progress.update)
            progress.finish()
            print("verified \(bundle): \(m.productID) \(m.version) (sequence \(m.sequence)), \(verified.validSignerKeyIDs.count) valid signature(s), \(m.components.count) component(s), \(formatBytes(m.payload.uncompressedSize))\(m.encryption != nil ? ", decrypted" : "")")
            for (name, path) in result.componentPaths.sorted(by: { $0.key < $1.key }) { print("  \(name) -> \(path)") }
        }
    }
}
