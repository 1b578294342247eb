import FleetCrypto

/// Whose signatures the device trusts, and how many it requires.
public struct TrustPolicy: Sendable {
    public var trustedKeys: [PublicKey]
    /// The device's own minimum; the manifest's threshold applies too, whichever is larger.
    public var threshold: Int
    public init(trustedKeys: [PublicKey], threshold: Int = 1) {
        self.trustedKeys = trustedKeys
        self.threshold = threshold
    }
}

/// What the device knows of itself when it judges an update, at one instant.
///
/// A long-running device agent builds a new one for every judgement, with the
/// current time and the currently installed sequence: a policy frozen when the
/// process started would accept a bundle that expired since (Specs/bundle.md §8
/// step 3, Specs/protocol.md P-3c).
public struct DevicePolicy: Sendable {
    /// Unix seconds, injected (the verifier never reads a clock).
    public var now: UInt64
    public var hardwareID: String?
    /// The anti-rollback counter of the installed software; the update's must be larger.
    public var installedSequence: UInt64?
    public var productID: String?
    public init(now: UInt64, hardwareID: String? = nil, installedSequence: UInt64? = nil, productID: String? = nil) {
        self.now = now; self.hardwareID = hardwareID; self.installedSequence = installedSequence; self.productID = productID
    }

    /// Specs/bundle.md §8 step 3: freeze, mix-and-match and rollback, in that order.
    /// Throws `.expired`, `.incompatibleHardware` or `.rollback`.
    public func check(_ manifest: Manifest) throws(BundleError) {
        try checkExpiry(manifest)
        if let product = productID, product != manifest.productID {
            throw BundleError(.incompatibleHardware, "update is for product '\(manifest.productID)', device is '\(product)'")
        }
        if let hardware = hardwareID, !manifest.hardwareIDs.contains(hardware) {
            throw BundleError(.incompatibleHardware, "hardware '\(hardware)' is not among \(manifest.hardwareIDs)")
        }
        if let installed = installedSequence, manifest.sequence <= installed {
            throw BundleError(.rollback, "sequence \(manifest.sequence) is not newer than the installed \(installed)")
        }
    }

    /// The freeze check alone: a receiver repeats it before it releases what it
    /// verified, since a transfer may outlast the manifest.
    public func checkExpiry(_ manifest: Manifest) throws(BundleError) {
        guard now < manifest.expiresAt else {
            throw BundleError(.expired, "manifest expired at \(manifest.expiresAt), now is \(now)")
        }
    }
}

/// A manifest whose signatures verified against the device's trusted keys
/// (Specs/bundle.md §8 steps 1-2), not yet judged against the device's policy.
/// Only `ManifestVerifier.verifySignatures` makes one; `admit(under:)` turns it
/// into a `VerifiedManifest`.
public struct SignedManifest: Sendable {
    public let manifest: Manifest
    public let manifestBytes: [UInt8]
    /// Key IDs of the trusted, authorised keys whose signatures verified.
    public let validSignerKeyIDs: [[UInt8]]

    /// Judges the manifest against the device as it is now (step 3).
    public func admit(under policy: DevicePolicy) throws(BundleError) -> VerifiedManifest {
        try policy.check(manifest)
        return VerifiedManifest(manifest: manifest, manifestBytes: manifestBytes, validSignerKeyIDs: validSignerKeyIDs)
    }
}

/// A manifest whose signatures and policy checks passed. Only
/// `SignedManifest.admit(under:)` (and so `ManifestVerifier.verify`) makes one.
public struct VerifiedManifest: Sendable {
    public let manifest: Manifest
    public let manifestBytes: [UInt8]
    /// Key IDs of the trusted keys whose signatures verified.
    public let validSignerKeyIDs: [[UInt8]]

    fileprivate init(manifest: Manifest, manifestBytes: [UInt8], validSignerKeyIDs: [[UInt8]]) {
        self.manifest = manifest; self.manifestBytes = manifestBytes; self.validSignerKeyIDs = validSignerKeyIDs
    }

    /// Checks, before any payload arrives, that `keys` can unwrap the content
    /// key (Specs/bundle.md §6.2): a device that is not a recipient learns it
    /// at once instead of after the whole download. Plain bundles pass.
    public func checkRecipient(keys: DecryptionKeys) throws(BundleError) {
        guard let encryption = manifest.encryption else { return }
        _ = try ContentEncryption.unwrap(encryption, bundleID: manifest.bundleID, keys: keys)
    }
}

/// Checks the manifest envelope: signatures first, then the device policy.
public enum ManifestVerifier {
    /// Specs/bundle.md §8 steps 1-2: the signatures over the exact bytes, then the
    /// manifest's decoding and the signature threshold.
    /// `onVerification` is called before each signature check (the receiver counts them).
    public static func verifySignatures(envelope: [UInt8], trust: TrustPolicy, onVerification: () -> Void = {}) throws(BundleError) -> SignedManifest {
        let (manifestBytes, signatures) = try COSE.parseEnvelope(envelope)
        // Specs/bundle.md §4.3 B-8: signatures over the exact bytes before any field is trusted.
        // Count distinct trusted keys with a valid signature over the exact bytes. B-8a: one
        // check per trusted key, whatever the envelope claims (16 forged signatures naming a
        // trusted key had cost 16 checks each).
        var valid: [[UInt8]] = []
        var tried: [[UInt8]] = []
        for signature in signatures {
            for key in trust.trustedKeys where key.keyID == signature.keyID && !tried.contains(key.keyID) {
                tried.append(key.keyID)
                onVerification()
                if signature.verify(with: key, detachedPayload: manifestBytes) { valid.append(key.keyID) }
            }
        }
        guard !valid.isEmpty else {
            let trustedIDs = Set(trust.trustedKeys.map(\.keyID))
            let fromTrusted = signatures.filter { trustedIDs.contains($0.keyID) }.map { $0.keyID.hexString }
            if !fromTrusted.isEmpty {
                throw BundleError(.signatureInvalid, "signature by trusted key \(fromTrusted.joined(separator: ", ")) does not verify: the manifest or signature was altered")
            }
            throw BundleError(.signatureInvalid, "no signature from a trusted key (signed by \(signatures.map { $0.keyID.hexString }), trusted \(trust.trustedKeys.map { $0.keyID.hexString }))")
        }
        let manifest = try Manifest(decoding: manifestBytes)
        let authorised = valid.filter { manifest.signerKeyIDs.contains($0) }
        let required = max(trust.threshold, manifest.signatureThreshold)
        guard authorised.count >= required else {
            throw BundleError(.signatureInvalid, "\(authorised.count) valid signature(s) from authorised trusted keys, \(required) required")
        }
        return SignedManifest(manifest: manifest, manifestBytes: manifestBytes, validSignerKeyIDs: authorised)
    }

    /// Signatures, then the device policy (Specs/bundle.md §8 steps 1-3).
    public static func verify(envelope: [UInt8], trust: TrustPolicy, device: DevicePolicy) throws(BundleError) -> VerifiedManifest {
        try verifySignatures(envelope: envelope, trust: trust).admit(under: device)
    }
}

extension Manifest {
    /// Temporaries sit next to the files they become, named `<name>` plus this
    /// suffix (a component's `.partial` file, Specs/bundle.md B-11 and B-16a): a
    /// component named like one could be clobbered by, or mistaken for, the
    /// temporary of another, so such names are refused.
    public static let temporarySuffix = ".partial"

    /// Component names become file names on the device: a conservative alphabet,
    /// no leading dot, and not the name of another component's temporary.
    public static func isSafeComponentName(_ name: String) -> Bool {
        guard !name.isEmpty, name.utf8.count <= BundleLimits.textByteCountMax, name.first != ".",
              !name.hasSuffix(temporarySuffix) else { return false }
        return name.utf8.allSatisfy { c in
            (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5A) || (c >= 0x61 && c <= 0x7A) || c == 0x2E || c == 0x5F || c == 0x2D
        }
    }
}
