import ArgumentParser
import BundleFormat
import Foundation
import FleetCrypto
import UpdateBundle

/// `fleetcast delegate`: the vendor authorises a sender key to run sessions
/// (Specs/bundle.md §11, Specs/protocol.md P-31).
struct Delegate: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Authorise a sender key: its SESSION records then authenticate what it multicasts.",
        discussion: """
        A sender that holds a delegated key signs a SESSION record for each session (its \
        ID, where feedback goes, the envelope it announces, the anchor of its POLL chain), \
        so that receivers that require authenticated sessions (receive --session-auth \
        required, the agent's "session-auth") act on no forged or replayed ANNOUNCE, POLL \
        or CLOSE. The vendor's signing key stays offline: the sender key can install \
        nothing, and its delegation expires (at most a year; default 30 days).

        Examples:
          fleetcast keygen --type ed25519 --out sender
          fleetcast delegate --sign vendor.key --sender-key sender.pub --expires-in 30d -o sender.delegation
          fleetcast send update.fcb --sender-key sender.key --delegation sender.delegation --bind 198.18.0.1
        """
    )

    @Option(help: "The vendor's signing key (one the devices trust).")
    var sign: String

    @Option(help: "The sender's public key (Ed25519 or P-256), e.g. from `keygen --out sender`.")
    var senderKey: String

    @Option(help: "How long the delegation lasts (12h, 30d; at most 366d).")
    var expiresIn: String = "30d"

    @Option(help: "Products the sender may send, comma-separated (default: any).")
    var products: String?

    @Option(name: .shortAndLong, help: "Where to write the delegation.")
    var out: String

    @Flag(help: "Overwrite an existing file.")
    var force = false

    func run() throws {
        try reportingFailures {
            guard let validity = parseDuration(expiresIn), validity > 0, validity <= SenderDelegation.lifetimeSecondsMax else {
                throw BundleError(.invalidInput, "--expires-in '\(expiresIn)' is not a duration of at most 366d")
            }
            let now = currentUnixTime()
            let list = products.map { $0.split(separator: ",").map(String.init) }
            let d = try SenderDelegation.make(senderKey: try loadPublicKey(senderKey), signer: try loadPrivateKey(sign),
                                              notBefore: now, expires: now + validity, products: list)
            try writeFile(out, SenderDelegation.pem(d.encoded), mode: 0o644, force: force)
            print("wrote \(out): sender key \(d.senderKey.keyID.hexString) delegated until \(d.expires) (Unix time)"
                  + (list.map { " for \($0.joined(separator: ", "))" } ?? " for any product"))
        }
    }
}

extension SenderDelegation {
    static let pemLabel = "FLEETCAST SENDER DELEGATION"

    static func pem(_ bytes: [UInt8]) -> String {
        let body = Data(bytes).base64EncodedString(options: [.lineLength64Characters, .endLineWithLineFeed])
        return "-----BEGIN \(pemLabel)-----\n\(body)\n-----END \(pemLabel)-----\n"
    }

    /// A delegation file (`fleetcast delegate`): parsed, not yet verified.
    static func load(_ path: String) throws -> SenderDelegation {
        let text = try readText(path, what: "delegation")
        let lines = text.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }
        guard lines.first == "-----BEGIN \(pemLabel)-----", lines.last == "-----END \(pemLabel)-----",
              let bytes = Data(base64Encoded: lines.dropFirst().dropLast().joined()) else {
            throw BundleError(.invalidInput, "\(path): not a sender delegation (fleetcast delegate writes one)")
        }
        do { return try SenderDelegation(untrusted: [UInt8](bytes)) } catch { throw BundleError(.invalidInput, "\(path): \(error.reason)") }
    }
}
