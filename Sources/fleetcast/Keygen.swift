import ArgumentParser
import FleetCrypto
import UpdateBundle

struct Keygen: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Generate a signing key, a device encryption key, or a group key.",
        discussion: """
        Signing keys (ed25519, p256) sign manifests; keep NAME.key secret, give NAME.pub to \
        devices as a trusted key. Device keys (x25519, p256) let a device decrypt: the vendor \
        packs to NAME.pub, the device keeps NAME.key. A group key (--type group) is a shared \
        256-bit secret in NAME.groupkey. Private files are created with mode 0600.

        Examples:
          fleetcast keygen --type ed25519 --out vendor
          fleetcast keygen --type x25519 --out device-0001
          fleetcast keygen --type group --out fleet-a
        """
    )

    enum KeyType: String, ExpressibleByArgument, CaseIterable {
        case ed25519, p256, x25519, group
    }

    @Option(help: "Key type: \(KeyType.allCases.map(\.rawValue).joined(separator: ", ")).")
    var type: KeyType = .ed25519

    @Option(help: "Base name of the files to write (NAME.key and NAME.pub, or NAME.groupkey).")
    var out: String

    @Flag(help: "Overwrite existing files.")
    var force = false

    func run() throws {
        try reportingFailures {
            switch type {
            case .group:
                let key = try GroupKey(try SecureRandom.bytes(32))
                try writeFile(out + ".groupkey", key.bytes.hexString + "\n", mode: 0o600, force: force)
                print("wrote \(out).groupkey (group key, id \(key.keyID.hexString))")
            case .ed25519, .p256, .x25519:
                let algorithm = KeyAlgorithm(rawValue: type.rawValue)!
                let key = try PrivateKey.generate(algorithm)
                try writeFile(out + ".key", try key.pemPKCS8(), mode: 0o600, force: force)
                try writeFile(out + ".pub", try key.publicKey.pem(), mode: 0o644, force: force)
                let role = algorithm.canSign ? "signing" : "device encryption"
                print("wrote \(out).key and \(out).pub (\(algorithm) \(role) key, id \(key.publicKey.keyID.hexString))")
            }
        }
    }
}

