import ArgumentParser
import FleetCrypto
import Foundation
import UpdateBundle

struct Demo: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run step A and step 2 end to end on a generated image, then show forgeries refused.",
        discussion: """
        Generates a vendor signing key and three device keys, packs a generated firmware \
        image into a signed bundle encrypted for the devices, verifies and decrypts it as \
        each device, then tampers with it in seven ways and shows each one refused with its \
        reason. Everything happens in a scratch directory that is removed afterwards \
        (unless --keep). Exits 0 only if every step behaved as expected.
        """
    )

    @Option(help: "Size of the generated image in MiB.")
    var sizeMiB: Int = 16

    @Option(help: "Work in this directory and keep it (default: a temporary one, removed).")
    var keep: String?

    func run() throws {
        let started = Date()
        let fm = FileManager.default
        let dir = keep ?? (NSTemporaryDirectory() + "fleetcast-demo-\(getpid())")
        try fm.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { if keep == nil { try? fm.removeItem(atPath: dir) } }
        var failures = 0
        func step(_ text: String) { print("\n== \(text)") }
        func check(_ ok: Bool, _ text: String) {
            print("  \(ok ? "ok  " : "FAIL") \(text)")
            if !ok { failures += 1 }
        }

        step("keys: a vendor signing key and three device keys")
        let vendor = try PrivateKey.generate(.ed25519)
        let devices = [try PrivateKey.generate(.x25519), try PrivateKey.generate(.p256), try PrivateKey.generate(.x25519)]
        let outsider = try PrivateKey.generate(.x25519)
        try writeFile(dir + "/vendor.key", try vendor.pemPKCS8(), mode: 0o600, force: true)
        try writeFile(dir + "/vendor.pub", try vendor.publicKey.pem(), mode: 0o644, force: true)
        print("  vendor  ed25519 \(vendor.publicKey.keyID.hexString)")
        for (i, d) in devices.enumerated() { print("  device\(i)  \(d.algorithm) \(d.publicKey.keyID.hexString)") }

        step("step A: pack a generated \(sizeMiB) MiB image, encrypted for the three devices")
        let image = dir + "/rootfs.img"
        try generateImage(path: image, bytes: sizeMiB << 20)
        let now = currentUnixTime()
        var request = PackRequest(productID: "demo-gateway", hardwareIDs: ["demo-board-rev-a"], version: "2.0.0", sequence: 2,
                                  createdAt: now, expiresAt: now + 7 * 86_400,
                                  components: [.init(name: "rootfs.img", path: image, installTarget: "rootfs")], signingKeys: [vendor])
        request.recipients = devices.map(\.publicKey)
        let bundle = dir + "/update.fcb"
        let packStart = Date()
        let progress = ProgressLine("  packing", enabled: true)
        let manifest = try Packer.pack(request, to: bundle, progress: progress.update)
        progress.finish()
        let bundleSize = (try fm.attributesOfItem(atPath: bundle)[.size] as? UInt64) ?? 0
        print("  \(bundle): \(formatBytes(bundleSize)) in \(String(format: "%.2f", Date().timeIntervalSince(packStart))) s")
        print("  payload \(formatBytes(manifest.payload.uncompressedSize)) -> \(formatBytes(manifest.payload.size)), \(manifest.authentication.segmentCount) chain segment(s), auth overhead \(String(format: "%.2f", Double(manifest.authentication.size) * 100 / Double(manifest.payload.size)))%")

        step("inspect (unverified view of the manifest)")
        let (shown, signers) = try UnverifiedBundle(path: bundle).unverifiedContents()
        print("  \(shown.productID) \(shown.version), sequence \(shown.sequence), hardware \(shown.hardwareIDs), \(shown.encryption?.recipients.count ?? 0) recipients, signed by \(signers.map(\.hexString))")

        let trust = TrustPolicy(trustedKeys: [vendor.publicKey])
        let device = DevicePolicy(now: now, hardwareID: "demo-board-rev-a", installedSequence: 1, productID: "demo-gateway")
        func verify(_ path: String, trust: TrustPolicy = trust, device: DevicePolicy = device, key: PrivateKey = devices[0], output: String? = nil) -> Result<VerifiedBundle, BundleError> {
            Result { () throws(BundleError) in
                let opened = try UnverifiedBundle(path: path)
                return try opened.verifyPayload(try opened.verifyManifest(trust: trust, device: device), keys: DecryptionKeys(deviceKeys: [key]), outputDirectory: output)
            }
        }

        step("step 2: each device verifies, decrypts and extracts")
        let original = fm.contents(atPath: image)
        for (i, key) in devices.enumerated() {
            let out = dir + "/device\(i)"
            try fm.createDirectory(atPath: out, withIntermediateDirectories: true)
            let t = Date()
            switch verify(bundle, key: key, output: out) {
            case .success(let result):
                let same = fm.contents(atPath: result.componentPaths["rootfs.img"] ?? "") == original
                check(same, "device\(i) (\(key.algorithm)): verified and decrypted in \(String(format: "%.2f", Date().timeIntervalSince(t))) s, image identical")
            case .failure(let e): check(false, "device\(i): \(e)")
            }
        }

        step("forgeries and policy violations, each refused")
        let bytes = [UInt8](fm.contents(atPath: bundle)!)
        let header = try UnverifiedBundle(path: bundle).header
        func tampered(_ name: String, _ change: (inout [UInt8]) -> Void) -> String {
            var copy = bytes
            change(&copy)
            let path = dir + "/" + name
            fm.createFile(atPath: path, contents: Data(copy))
            return path
        }
        let cases: [(String, Result<VerifiedBundle, BundleError>, BundleError.Code)] = [
            ("one payload bit flipped", verify(tampered("flip-payload.fcb") { $0[Int(header.payloadOffset) + $0.count / 3] ^= 0x04 }), .hashMismatch),
            ("one signature bit flipped", verify(tampered("flip-signature.fcb") { $0[Int(header.payloadOffset) - 10] ^= 0x01 }), .signatureInvalid),
            ("one auth-chain bit flipped", verify(tampered("flip-chain.fcb") { $0[$0.count - 100] ^= 0x80 }), .hashMismatch),
            ("truncated by one byte", verify(tampered("short.fcb") { $0.removeLast() }), .sizeMismatch),
            ("signed by an untrusted key", verify(bundle, trust: TrustPolicy(trustedKeys: [try PrivateKey.generate(.ed25519).publicKey])), .signatureInvalid),
            ("replayed to a device already at sequence 2", verify(bundle, device: DevicePolicy(now: now, installedSequence: 2)), .rollback),
            ("offered to other hardware", verify(bundle, device: DevicePolicy(now: now, hardwareID: "demo-board-rev-z")), .incompatibleHardware),
            ("verified after its expiry", verify(bundle, device: DevicePolicy(now: now + 8 * 86_400)), .expired),
            ("decrypted by a device not among the recipients", verify(bundle, key: outsider), .notARecipient),
        ]
        for (what, result, expected) in cases {
            switch result {
            case .success: check(false, "\(what): ACCEPTED")
            case .failure(let e): check(e.code == expected, "\(what): refused, \(e.code.rawValue) (exit \(e.exitCode)): \(e.reason)")
            }
        }

        print("\n\(failures == 0 ? "demo passed" : "demo FAILED: \(failures) step(s)") in \(String(format: "%.1f", Date().timeIntervalSince(started))) s\(keep != nil ? "; files kept in \(dir)" : "")")
        if failures > 0 { throw ExitCode.failure }
    }

    /// A firmware-like image: compressible text runs mixed with random bytes.
    private func generateImage(path: String, bytes: Int) throws {
        guard let handle = FileHandle(forWritingAtPath: path) ?? {
            FileManager.default.createFile(atPath: path, contents: nil)
            return FileHandle(forWritingAtPath: path)
        }() else { throw BundleError(.io, "cannot create \(path)") }
        defer { try? handle.close() }
        var written = 0
        var chunk = [UInt8](repeating: 0, count: 1 << 20)
        let text = Array("fleetcast demo firmware: kernel, rootfs, configuration tables. ".utf8)
        while written < bytes {
            let random = try SecureRandom.bytes(chunk.count / 2)
            for i in 0..<chunk.count { chunk[i] = (i / 256) % 2 == 0 ? text[i % text.count] : random[i / 2] }
            let n = min(chunk.count, bytes - written)
            handle.write(Data(chunk[0..<n]))
            written += n
        }
    }
}
