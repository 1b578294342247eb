import FleetCrypto

/// A pre-shared 256-bit group key held in a device's key store.
public struct GroupKey: Sendable, Hashable {
    public let bytes: [UInt8]
    public init(_ bytes: [UInt8]) throws(BundleError) {
        guard bytes.count == 32 else { throw BundleError(.invalidInput, "a group key is 32 bytes, got \(bytes.count)") }
        self.bytes = bytes
    }
    /// First 8 bytes of SHA-256("fleetcast group key" || key): names the key, reveals nothing of it.
    public var keyID: [UInt8] { Array(SHA256.hash(Array("fleetcast group key".utf8) + bytes).prefix(8)) }
}

/// Wrapping and unwrapping of the content key, and the chunk framing of
/// the encrypted payload (Specs/bundle.md §6).
package enum ContentEncryption {
    package static let contentKeyByteCount = 32

    package static func kek(method: Manifest.Recipient.Method, secret: [UInt8], bundleID: [UInt8], keyID: [UInt8], ephemeral: [UInt8]?) throws(BundleError) -> [UInt8] {
        let label = method == .groupKey ? "fleetcast group kek v1" : "fleetcast ecdh-es kek v1"
        let info = Array(label.utf8) + [UInt8(method.rawValue), UInt8(keyID.count)] + keyID + (ephemeral ?? [])
        do { return try HKDF.sha256(inputKeyMaterial: secret, salt: bundleID, info: info, outputByteCount: 32) }
        catch { throw BundleError(.decryptionFailed, "HKDF: \(error)") }
    }

    package static func wrap(contentKey: [UInt8], bundleID: [UInt8], device: PublicKey) throws(BundleError) -> Manifest.Recipient {
        let method: Manifest.Recipient.Method
        switch device.algorithm {
        case .p256: method = .ecdhP256
        case .x25519: method = .ecdhX25519
        case .ed25519: throw BundleError(.invalidInput, "recipient \(device) is an Ed25519 signing key; device keys are P-256 or X25519")
        }
        do {
            let ephemeral = try PrivateKey.generate(device.algorithm)
            let secret = try ephemeral.sharedSecret(with: device)
            let epk = ephemeral.publicKey.raw
            let kek = try kek(method: method, secret: secret, bundleID: bundleID, keyID: device.keyID, ephemeral: epk)
            return Manifest.Recipient(method: method, keyID: device.keyID, ephemeralPublicKey: epk,
                                      wrappedKey: try AESKeyWrap.wrap(key: contentKey, kek: kek))
        } catch let error as CryptoError {
            throw BundleError(.invalidInput, "wrapping for \(device): \(error)")
        } catch let error as BundleError { throw error } catch { fatalError("unreachable") }
    }

    package static func wrap(contentKey: [UInt8], bundleID: [UInt8], group: GroupKey) throws(BundleError) -> Manifest.Recipient {
        let kek = try kek(method: .groupKey, secret: group.bytes, bundleID: bundleID, keyID: group.keyID, ephemeral: nil)
        do {
            return Manifest.Recipient(method: .groupKey, keyID: group.keyID, ephemeralPublicKey: nil,
                                      wrappedKey: try AESKeyWrap.wrap(key: contentKey, kek: kek))
        } catch { throw BundleError(.invalidInput, "group key wrap: \(error)") }
    }

    /// Finds a recipient entry for one of the device's keys and unwraps the content key.
    package static func unwrap(_ info: Manifest.EncryptionInfo, bundleID: [UInt8], keys: DecryptionKeys) throws(BundleError) -> [UInt8] {
        var matched = false
        for recipient in info.recipients {
            var secret: [UInt8]?
            switch recipient.method {
            case .groupKey:
                secret = keys.groupKeys.first { $0.keyID == recipient.keyID }?.bytes
            case .ecdhP256, .ecdhX25519:
                let algorithm: KeyAlgorithm = recipient.method == .ecdhP256 ? .p256 : .x25519
                guard let device = keys.deviceKeys.first(where: { $0.algorithm == algorithm && $0.publicKey.keyID == recipient.keyID }),
                      let epk = recipient.ephemeralPublicKey else { continue }
                do { secret = try device.sharedSecret(with: PublicKey(raw: epk, algorithm: algorithm)) }
                catch { throw BundleError(.decryptionFailed, "ephemeral key of recipient \(recipient.keyID.hexString): \(error)") }
            }
            guard let secret else { continue }
            matched = true
            let kek = try kek(method: recipient.method, secret: secret, bundleID: bundleID, keyID: recipient.keyID, ephemeral: recipient.ephemeralPublicKey)
            if let key = try? AESKeyWrap.unwrap(recipient.wrappedKey, kek: kek), key.count == contentKeyByteCount { return key }
        }
        if matched { throw BundleError(.decryptionFailed, "the content key does not unwrap with this device's key") }
        throw BundleError(.notARecipient, "none of this device's \(keys.deviceKeys.count + keys.groupKeys.count) key(s) is among the \(info.recipients.count) recipient(s)")
    }

    /// nonce(i) = 0x00000000 || u64 i  (the content key is fresh per bundle).
    package static func nonce(chunk i: UInt64) -> [UInt8] { [0, 0, 0, 0] + bigEndian64(i) }

    /// aad(i) = "FLCE" || bundle ID || u64 i || u8 last: binds order and the end of the stream.
    package static func aad(bundleID: [UInt8], chunk i: UInt64, last: Bool) -> [UInt8] {
        Array("FLCE".utf8) + bundleID + bigEndian64(i) + [last ? 1 : 0]
    }
}

/// The device's decryption keys: its own ECDH keys and any group keys.
public struct DecryptionKeys: Sendable {
    public var deviceKeys: [PrivateKey]
    public var groupKeys: [GroupKey]
    public init(deviceKeys: [PrivateKey] = [], groupKeys: [GroupKey] = []) {
        self.deviceKeys = deviceKeys
        self.groupKeys = groupKeys
    }
}

/// Sizes of the payload as transferred.
package enum PayloadLayout {
    package static func transferredSize(compressedSize: UInt64, encryption: Manifest.EncryptionInfo?) throws(BundleError) -> UInt64 {
        guard let encryption else { return compressedSize }
        let chunk = UInt64(encryption.chunkSize)
        let chunks = (compressedSize + chunk - 1) / chunk
        return compressedSize + chunks * UInt64(AES256GCM.tagByteCount)
    }
}
