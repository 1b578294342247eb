import Foundation
import FleetCrypto
import Testing
@testable import UpdateBundle

@Suite("Pack and verify")
struct PackVerifyTests {
    @Test("Round trip: encrypted to X25519, P-256 and a group key; plaintext; no compression")
    func roundTrips() throws {
        let f = Fixture(imageSize: 100_000)
        let variants: [(String, (inout PackRequest) -> Void, DecryptionKeys)] = [
            ("x25519", { _ in }, DecryptionKeys(deviceKeys: [f.device])),
            ("p256", { $0.recipients = [f.p256Device.publicKey] }, DecryptionKeys(deviceKeys: [f.p256Device])),
            ("group", { $0.recipients = []; $0.groupKeys = [f.group] }, DecryptionKeys(groupKeys: [f.group])),
            ("plain", { $0.recipients = [] }, DecryptionKeys()),
            ("stored", { $0.recipients = []; $0.compression = .none }, DecryptionKeys()),
            ("es256", { $0.signingKeys = [f.p256Signer] }, DecryptionKeys(deviceKeys: [f.device])),
        ]
        for (name, modify, keys) in variants {
            let path = try f.pack(name + ".fcb", modify)
            let out = f.dir.file("out-" + name)
            try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
            let trust = TrustPolicy(trustedKeys: [f.signer.publicKey, f.p256Signer.publicKey])
            let result = try f.verify(path, trust: trust, keys: keys, output: out)
            #expect(readBytes(result.componentPaths["rootfs.img"]!) == f.image, "variant \(name)")
            #expect(try FileManager.default.contentsOfDirectory(atPath: out) == ["rootfs.img"], "no partial files left")
        }
    }

    @Test("Several components, one of them empty, each checked and written")
    func components() throws {
        let f = Fixture()
        let second = makeImage(size: 5000, seed: 9)
        writeBytes(f.dir.file("boot.bin"), second)
        writeBytes(f.dir.file("empty.cfg"), [])
        let path = try f.pack { r in
            r.components += [.init(name: "boot.bin", path: f.dir.file("boot.bin"), installTarget: "boot"),
                             .init(name: "empty.cfg", path: f.dir.file("empty.cfg"), installTarget: "config")]
        }
        let out = f.dir.file("out")
        try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
        let result = try f.verify(path, output: out)
        #expect(readBytes(result.componentPaths["rootfs.img"]!) == f.image)
        #expect(readBytes(result.componentPaths["boot.bin"]!) == second)
        #expect(readBytes(result.componentPaths["empty.cfg"]!) == [])
        #expect(result.manifest.manifest.components.map(\.name) == ["rootfs.img", "boot.bin", "empty.cfg"])
    }

    @Test("The manifest commits to the profile and the chain geometry")
    func manifestContents() throws {
        let f = Fixture(imageSize: 60_000)
        let path = try f.pack()
        let (manifest, signers) = try UnverifiedBundle(path: path).unverifiedContents()
        #expect(signers == [f.signer.publicKey.keyID])
        #expect(manifest.transport == Fixture.smallProfile)
        let geometry = BlockGeometry(payloadSize: manifest.payload.size, profile: manifest.transport)
        #expect(manifest.authentication.segmentCount == (geometry.blockCount + 3) / 4)
        #expect(manifest.encryption?.recipients.first?.keyID == f.device.publicKey.keyID)
        #expect(manifest.components[0].sha256 == SHA256.hash(f.image))
        #expect(manifest.sequence == 7 && manifest.hardwareIDs == ["gw-rev-a", "gw-rev-b"])
    }
}

@Suite("Every rejection")
struct RejectionTests {
    @Test("Wrong trusted key, too few signatures, k-of-n threshold")
    func signatures() throws {
        let f = Fixture()
        let path = try f.pack()
        let stranger = try PrivateKey.generate(.ed25519)
        #expect(failure { try f.verify(path, trust: TrustPolicy(trustedKeys: [stranger.publicKey])) } == .signatureInvalid)
        #expect(failure { try f.verify(path, trust: TrustPolicy(trustedKeys: [f.signer.publicKey], threshold: 2)) } == .signatureInvalid)

        // 2-of-3 declared by the manifest: one signature is not enough, two are.
        let third = try PrivateKey.generate(.ed25519)
        let one = try f.pack("one.fcb") { r in
            r.additionalSignerKeyIDs = [f.p256Signer.publicKey.keyID, third.publicKey.keyID]
            r.signatureThreshold = 2
        }
        let all = TrustPolicy(trustedKeys: [f.signer.publicKey, f.p256Signer.publicKey, third.publicKey])
        #expect(failure { try f.verify(one, trust: all) } == .signatureInvalid)
        let two = try f.pack("two.fcb") { r in
            r.signingKeys = [f.signer, f.p256Signer]
            r.additionalSignerKeyIDs = [third.publicKey.keyID]
            r.signatureThreshold = 2
        }
        #expect(failure { try f.verify(two, trust: all) } == nil)
        // The same signature twice does not count twice.
        let twice = try f.pack("twice.fcb") { r in
            r.signingKeys = [f.signer, f.signer]
            r.additionalSignerKeyIDs = [third.publicKey.keyID]
            r.signatureThreshold = 2
        }
        #expect(failure { try f.verify(twice, trust: all) } == .signatureInvalid)
        // A valid signature from a trusted key that the manifest does not authorise does not count.
        #expect(failure { try f.verify(path, trust: TrustPolicy(trustedKeys: [f.signer.publicKey, third.publicKey], threshold: 1)) } == nil)
    }

    @Test("Expired, wrong hardware, wrong product, rollback and replay of the installed sequence")
    func policy() throws {
        let f = Fixture()
        let path = try f.pack()
        #expect(failure { try f.verify(path, device: DevicePolicy(now: now + 86_400, hardwareID: "gw-rev-a")) } == .expired)
        #expect(failure { try f.verify(path, device: DevicePolicy(now: now, hardwareID: "gw-rev-z")) } == .incompatibleHardware)
        #expect(failure { try f.verify(path, device: DevicePolicy(now: now, productID: "toaster")) } == .incompatibleHardware)
        #expect(failure { try f.verify(path, device: DevicePolicy(now: now, installedSequence: 7)) } == .rollback)
        #expect(failure { try f.verify(path, device: DevicePolicy(now: now, installedSequence: 8)) } == .rollback)
        #expect(failure { try f.verify(path, device: DevicePolicy(now: now, hardwareID: "gw-rev-b", installedSequence: 6)) } == nil)
    }

    @Test("Wrong recipient, wrong group key, and a tampered wrapped key")
    func recipients() throws {
        let f = Fixture()
        let path = try f.pack()
        let other = try PrivateKey.generate(.x25519)
        #expect(failure { try f.verify(path, keys: DecryptionKeys(deviceKeys: [other])) } == .notARecipient)
        #expect(failure { try f.verify(path, keys: DecryptionKeys()) } == .notARecipient)
        let group = try f.pack("group.fcb") { $0.recipients = []; $0.groupKeys = [f.group] }
        #expect(failure { try f.verify(group, keys: DecryptionKeys(groupKeys: [try GroupKey([UInt8](repeating: 1, count: 32))])) } == .notARecipient)

        // A correctly signed manifest whose wrapped key was altered before signing.
        let (manifestBytes, _) = try COSE.parseEnvelope(try UnverifiedBundle(path: path).envelope)
        var manifest = try Manifest(decoding: manifestBytes)
        manifest.encryption!.recipients[0].wrappedKey[5] ^= 1
        let resigned = try resign(path, manifest: manifest, key: f.signer, in: f)
        #expect(failure { try f.verify(resigned) } == .decryptionFailed)
    }

    @Test("Tampered ciphertext under a valid manifest is refused before install")
    func tamperedCiphertext() throws {
        let f = Fixture()
        let path = try f.pack()
        let header = try UnverifiedBundle(path: path).header
        var bytes = readBytes(path)
        bytes[Int(header.payloadOffset) + 3000] ^= 0x01
        let bad = f.dir.file("bad.fcb")
        writeBytes(bad, bytes)
        let out = f.dir.file("out")
        try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
        #expect(failure { try f.verify(bad, output: out) } == .hashMismatch)
        #expect(try FileManager.default.contentsOfDirectory(atPath: out).isEmpty, "nothing is left for an installer")
    }

    @Test("B-16: a lone plain component is hashed once as the payload, and still refused when altered")
    func plainComponentIsPayload() throws {
        let f = Fixture()
        let path = try f.pack("plain.fcb") { $0.compression = .none; $0.recipients = [] }
        let bundle = try UnverifiedBundle(path: path)
        let m = try bundle.verifyManifest(trust: f.trust, device: f.devicePolicy).manifest
        #expect(m.components.count == 1 && m.components[0].sha256 == m.payload.sha256, "the case B-16 covers")
        let out = f.dir.file("plain-out")
        try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
        let good = try f.verify(path, output: out)
        #expect(readBytes(good.componentPaths["rootfs.img"]!) == f.image)

        // A payload byte altered, with the chain walk off as `fleetcast receive` runs it (B-15a):
        // the one payload hash must catch it, and nothing may be released.
        let header = bundle.header
        var bytes = readBytes(path)
        bytes[Int(header.payloadOffset) + 1234] ^= 0x40
        let bad = f.dir.file("plain-bad.fcb")
        writeBytes(bad, bytes)
        let badOut = f.dir.file("plain-bad-out")
        try FileManager.default.createDirectory(atPath: badOut, withIntermediateDirectories: true)
        let opened = try UnverifiedBundle(path: bad)
        let verified = try opened.verifyManifest(trust: f.trust, device: f.devicePolicy)
        #expect(failure { _ = try opened.verifyPayload(verified, keys: f.keys, outputDirectory: badOut, checkAuthChain: false) } == .hashMismatch)
        #expect(try FileManager.default.contentsOfDirectory(atPath: badOut).isEmpty, "nothing is left for an installer")

        // A signed manifest whose component digest disagrees with the payload's gets both computed, and fails.
        var manifest = m
        manifest.components[0].sha256[0] ^= 1
        let resigned = try resign(path, manifest: manifest, key: f.signer, in: f, name: "plain-resigned.fcb")
        #expect(failure { try f.verify(resigned) } == .hashMismatch)
    }

    @Test("B-15b: step 2 fed block by block gives the same components; a bad block fails at the end and releases nothing")
    func blockByBlock() throws {
        let f = Fixture(imageSize: 50_000)
        let path = try f.pack()  // compressed and encrypted: hash, GCM and zlib all run incrementally
        let bundle = try UnverifiedBundle(path: path)
        let verified = try bundle.verifyManifest(trust: f.trust, device: f.devicePolicy)
        let m = verified.manifest
        let geometry = BlockGeometry(payloadSize: m.payload.size, profile: m.transport)
        let bytes = readBytes(path)
        func feed(corrupting: Int?, into out: String) throws -> VerifiedBundle {
            try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
            let v = try PayloadVerification(verified, keys: f.keys, outputDirectory: out)
            for b in 0..<geometry.blockCount {
                let range = geometry.byteRange(ofBlock: b)
                var block = Array(bytes[(Int(bundle.header.payloadOffset) + Int(range.lowerBound))...].prefix(range.count))
                if b == corrupting { block[block.count / 2] ^= 0x10 }
                try block.withUnsafeBytes { try v.consume(block: b, bytes: $0) }
            }
            return try v.finish()
        }
        #expect(geometry.blockCount > 2, "several blocks, so that the feeding is incremental")
        let good = try feed(corrupting: nil, into: f.dir.file("fed"))
        #expect(readBytes(good.componentPaths["rootfs.img"]!) == f.image)

        let badOut = f.dir.file("fed-bad")
        let code = failure { _ = try feed(corrupting: geometry.blockCount - 1, into: badOut) }
        #expect(code == .hashMismatch || code == .decryptionFailed, "\(String(describing: code))")
        #expect(try FileManager.default.contentsOfDirectory(atPath: badOut).isEmpty, "nothing is left for an installer")

        // A block of the wrong size is refused at once.
        let v = try PayloadVerification(verified, keys: f.keys)
        #expect(failure { try [UInt8](repeating: 0, count: 10).withUnsafeBytes { try v.consume(block: 0, bytes: $0) } } == .sizeMismatch)
    }

    @Test("B-16a: a payload staged as the component file is released by rename when its hash matches, and never when it does not")
    func stagedComponent() throws {
        let f = Fixture(imageSize: 50_000)
        let path = try f.pack("staged.fcb") { $0.compression = .none; $0.recipients = [] }
        let bundle = try UnverifiedBundle(path: path)
        let verified = try bundle.verifyManifest(trust: f.trust, device: f.devicePolicy)
        let m = verified.manifest
        let geometry = BlockGeometry(payloadSize: m.payload.size, profile: m.transport)
        let payload = Array(readBytes(path)[Int(bundle.header.payloadOffset)...].prefix(Int(m.payload.size)))
        // An encrypted bundle's component is not its payload: it cannot be staged.
        let encrypted = try UnverifiedBundle(path: try f.pack()).verifyManifest(trust: f.trust, device: f.devicePolicy).manifest
        #expect(PayloadVerification.stagedComponentPath(encrypted, outputDirectory: "/x") == nil)

        func stageAndFeed(corrupting: Int?, into out: String) throws -> VerifiedBundle {
            try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
            // The caller (the receiver's staging) writes the file; verification only hashes.
            let staged = try #require(PayloadVerification.stagedComponentPath(m, outputDirectory: out))
            #expect(staged == out + "/rootfs.img.partial")
            var bytes = payload
            if let b = corrupting { bytes[Int(geometry.byteRange(ofBlock: b).lowerBound) + 7] ^= 0x01 }
            writeBytes(staged, bytes)
            let v = try PayloadVerification(verified, keys: f.keys, outputDirectory: out, componentStaged: true)
            for b in 0..<geometry.blockCount {
                let range = geometry.byteRange(ofBlock: b)
                try Array(bytes[Int(range.lowerBound)..<Int(range.upperBound)]).withUnsafeBytes { try v.consume(block: b, bytes: $0) }
            }
            return try v.finish()
        }
        let out = f.dir.file("staged-out")
        let good = try stageAndFeed(corrupting: nil, into: out)
        #expect(good.componentPaths["rootfs.img"] == out + "/rootfs.img")
        #expect(readBytes(out + "/rootfs.img") == f.image)
        #expect(try FileManager.default.contentsOfDirectory(atPath: out) == ["rootfs.img"], "the .partial file became the component")

        let badOut = f.dir.file("staged-bad")
        #expect(failure { _ = try stageAndFeed(corrupting: geometry.blockCount - 1, into: badOut) } == .hashMismatch)
        #expect(!FileManager.default.fileExists(atPath: badOut + "/rootfs.img"), "nothing is released when the hash differs")
    }

    @Test("A component larger than the writeback chunk (8 MiB) is written whole and exact")
    func largeComponentWriteback() throws {
        let f = Fixture(imageSize: 20_000_000)
        let path = try f.pack("large.fcb") { $0.compression = .none; $0.recipients = []; $0.transport = .default }
        let out = f.dir.file("large-out")
        try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
        let result = try f.verify(path, output: out)
        #expect(readBytes(result.componentPaths["rootfs.img"]!) == f.image)
    }

    @Test("A bit flipped anywhere is refused: header, envelope, payload, chain")
    func bitFlips() throws {
        let f = Fixture(imageSize: 30_000)
        let path = try f.pack()
        let original = readBytes(path)
        var rng = SeededGenerator(seed: 0xB17F)
        var offsets = Array(0..<BundleHeader.byteCount)
        for _ in 0..<400 { offsets.append(Int(rng.next() % UInt64(original.count))) }
        offsets.append(original.count - 1)
        let bad = f.dir.file("flipped.fcb")
        for offset in offsets {
            var bytes = original
            bytes[offset] ^= UInt8(1 << (rng.next() % 8))
            writeBytes(bad, bytes)
            #expect(failure { try f.verify(bad) } != nil, "flip at \(offset) (seed 0xB17F) was accepted")
        }
    }

    /// Specs/bundle.md B-1a: format 1 chains cannot have their symbols checked on arrival.
    @Test("B-1a: a format 1 header or manifest is refused with a message to pack again")
    func formatOne() throws {
        let f = Fixture(imageSize: 10_000)
        let path = try f.pack()
        var bytes = readBytes(path)
        #expect(bytes[4] == 0 && bytes[5] == 2, "bundles are format 2")
        bytes[5] = 1
        let old = f.dir.file("format1.fcb")
        writeBytes(old, bytes)
        let e = #expect(throws: BundleError.self) { try f.verify(old) }
        #expect(e?.code == .malformed && e?.description.contains("pack the update again") == true, "\(String(describing: e))")
        // A manifest saying format 1 ({1: 1, ...}: the first key and value follow the map head), validly signed.
        var manifest = try COSE.parseEnvelope(try UnverifiedBundle(path: path).envelope).0
        #expect(manifest[1] == 0x01 && manifest[2] == 0x02)
        manifest[2] = 0x01
        let envelope = try COSE.envelope(manifest: manifest, keys: [f.signer])
        let m = #expect(throws: BundleError.self) { _ = try ManifestVerifier.verify(envelope: envelope, trust: f.trust, device: f.devicePolicy) }
        #expect(m?.description.contains("bundle format 1 is no longer read") == true, "\(String(describing: m))")
    }

    /// Specs/bundle.md B-15, B-13a: verify checks every auth-chain symbol's chain tag, so a
    /// bundle whose tags a receiver would refuse good symbols by is refused before it is sent.
    @Test("B-15: first-tags or chain tags that do not match the chain's symbols are refused by verify")
    func chainTags() throws {
        let f = Fixture(imageSize: 40_000)
        let path = try f.pack()
        var m = try Manifest(decoding: COSE.parseEnvelope(try UnverifiedBundle(path: path).envelope).0)
        #expect(m.authentication.segmentCount > 2 && !m.authentication.firstTags.isEmpty)
        try f.verify(path)
        for index in [0, m.authentication.firstTags.count - 1] {
            var bad = m
            bad.authentication.firstTags[index] ^= 0x40
            let resigned = try resign(path, manifest: bad, key: f.signer, in: f, name: "tags\(index).fcb")
            let e = #expect(throws: BundleError.self) { try f.verify(resigned) }
            #expect(e?.code == .hashMismatch && e?.description.contains("chain tags the manifest holds") == true, "\(String(describing: e))")
        }
        m.authentication.firstTags[0] ^= 0  // unchanged: the resigned bundle verifies (the test can pass)
        try f.verify(try resign(path, manifest: m, key: f.signer, in: f, name: "same.fcb"))
    }

    @Test("Truncated or extended at many lengths is refused")
    func truncations() throws {
        let f = Fixture(imageSize: 20_000)
        let path = try f.pack()
        let original = readBytes(path)
        let bad = f.dir.file("cut.fcb")
        for length in Array(0..<80) + Array(stride(from: 80, to: original.count, by: 97)) + [original.count - 1] {
            writeBytes(bad, Array(original.prefix(length)))
            #expect(failure { try f.verify(bad) } != nil, "truncated to \(length) was accepted")
        }
        writeBytes(bad, original + [0])
        #expect(failure { try f.verify(bad) } == .sizeMismatch)
    }
}

/// Re-signs `manifest` with `key` and rebuilds the bundle around the same payload and chain.
func resign(_ path: String, manifest: Manifest, key: PrivateKey, in f: Fixture, name: String = "resigned.fcb") throws -> String {
    let bundle = try UnverifiedBundle(path: path)
    let bytes = readBytes(path)
    let envelope = try COSE.envelope(manifest: manifest.encoded(), keys: [key])
    let header = BundleHeader(envelopeLength: envelope.count, payloadLength: bundle.header.payloadLength, authLength: bundle.header.authLength)
    let out = f.dir.file(name)
    writeBytes(out, header.encoded() + envelope + bytes[Int(bundle.header.payloadOffset)...])
    return out
}
