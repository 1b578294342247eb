import CBOR
import FleetCrypto

/// Specs/bundle.md §4.3. COSE_Sign1 (RFC 9052 §4.2) with EdDSA (-8) or ES256 (-7), and the
/// envelope that carries a manifest with one or more of them.
///
/// ```
/// COSE_Sign1 = #6.18([ protected: bstr .cbor {1: alg, 4: kid}, unprotected: {},
///                      payload: bstr / nil, signature: bstr ])
/// Sig_structure = ["Signature1", protected, external_aad: h'', payload]
/// SignedManifest = [ manifest: bstr .cbor Manifest, signatures: [+ COSE_Sign1 with nil payload] ]
/// ```
/// Signatures are detached (RFC 9052 §2) so that k-of-n signers do not repeat
/// the manifest; each is still a standard COSE_Sign1 any COSE library verifies
/// once given the manifest bytes as payload.
public enum COSE {
    public static let sign1Tag: UInt64 = 18

    public enum Algorithm: Int, Sendable {
        case es256 = -7
        case edDSA = -8

        public init(_ key: KeyAlgorithm) throws(BundleError) {
            switch key {
            case .ed25519: self = .edDSA
            case .p256: self = .es256
            case .x25519: throw BundleError(.invalidInput, "X25519 keys cannot sign")
            }
        }

        var keyAlgorithm: KeyAlgorithm { self == .edDSA ? .ed25519 : .p256 }
    }

    /// One parsed COSE_Sign1.
    public struct Sign1: Sendable {
        public let algorithm: Algorithm
        public let keyID: [UInt8]
        public let protectedBytes: [UInt8]
        public let payload: [UInt8]?
        public let signature: [UInt8]

        /// Signs `payload`; the result carries it attached or detached.
        public static func sign(payload: [UInt8], key: PrivateKey, detached: Bool) throws(BundleError) -> CBOR {
            let algorithm = try Algorithm(key.algorithm)
            let protected = CBOR.intMap([(1, .int(algorithm.rawValue)), (4, .bytes(key.publicKey.keyID))]).encoded()
            let signature: [UInt8]
            do { signature = try key.sign(toBeSigned(protected: protected, payload: payload)) }
            catch { throw BundleError(.invalidInput, "signing failed: \(error)") }
            return .tagged(sign1Tag, .array([.bytes(protected), .map([]), detached ? .null : .bytes(payload), .bytes(signature)]))
        }

        static func toBeSigned(protected: [UInt8], payload: [UInt8]) -> [UInt8] {
            CBOR.array([.text("Signature1"), .bytes(protected), .bytes([]), .bytes(payload)]).encoded()
        }

        public init(_ item: CBOR) throws(BundleError) {
            guard case .tagged(sign1Tag, let body) = item, let fields = body.arrayValue, fields.count == 4,
                  let protected = fields[0].bytesValue, fields[1].mapValue != nil, let signature = fields[3].bytesValue else {
                throw BundleError(.malformed, "COSE_Sign1: not a tagged four-element array")
            }
            switch fields[2] {
            case .null: payload = nil
            case .bytes(let b): payload = b
            default: throw BundleError(.malformed, "COSE_Sign1: payload is neither bstr nor nil")
            }
            let header: CBOR
            do { header = try CBOR(decoding: protected) } catch { throw .malformed(error, in: "COSE protected header") }
            guard let entries = header.mapValue else { throw BundleError(.malformed, "COSE protected header is not a map") }
            var algorithm: Algorithm?
            var keyID: [UInt8]?
            for entry in entries {
                switch entry.key.intValue {
                case 1: algorithm = entry.value.intValue.flatMap(Algorithm.init(rawValue:))
                    if algorithm == nil { throw BundleError(.signatureInvalid, "COSE: unsupported algorithm \(entry.value)") }
                case 4: keyID = entry.value.bytesValue
                case 2: throw BundleError(.unknownCriticalField, "COSE: critical header parameters are not supported")  // B-9
                default: continue  // other protected parameters (e.g. content type) are informative
                }
            }
            if keyID == nil, let unprotected = fields[1].mapValue {
                keyID = unprotected.first { $0.key == .int(4) }?.value.bytesValue
            }
            guard let algorithm else { throw BundleError(.malformed, "COSE: no algorithm in the protected header") }
            self.algorithm = algorithm
            self.keyID = keyID ?? []
            self.protectedBytes = protected
            self.signature = signature
        }

        /// Verifies against `key` over `payload` (the detached one, or the attached one if nil).
        public func verify(with key: PublicKey, detachedPayload: [UInt8]? = nil) -> Bool {
            guard key.algorithm == algorithm.keyAlgorithm, let content = detachedPayload ?? payload else { return false }
            if let payload, let detachedPayload, payload != detachedPayload { return false }
            return key.verify(signature: signature, for: Self.toBeSigned(protected: protectedBytes, payload: content))
        }
    }

    /// Builds the envelope: the manifest bytes and one detached COSE_Sign1 per key.
    public static func envelope(manifest: [UInt8], keys: [PrivateKey]) throws(BundleError) -> [UInt8] {
        var signatures: [CBOR] = []
        for key in keys { signatures.append(try Sign1.sign(payload: manifest, key: key, detached: true)) }
        return CBOR.array([.bytes(manifest), .array(signatures)]).encoded()
    }

    /// Splits an envelope into the manifest bytes and its signatures, without verifying.
    public static func parseEnvelope(_ bytes: [UInt8]) throws(BundleError) -> (manifest: [UInt8], signatures: [Sign1]) {
        guard bytes.count <= BundleLimits.envelopeByteCountMax else {
            throw BundleError(.malformed, "signed manifest of \(bytes.count) bytes exceeds \(BundleLimits.envelopeByteCountMax)")
        }
        let item: CBOR
        do { item = try CBOR(decoding: bytes) } catch { throw .malformed(error, in: "signed manifest") }
        guard let parts = item.arrayValue, parts.count == 2, let manifest = parts[0].bytesValue, let list = parts[1].arrayValue else {
            throw BundleError(.malformed, "signed manifest: not [manifest, signatures]")
        }
        guard !list.isEmpty, list.count <= BundleLimits.signatureCountMax else {
            throw BundleError(.malformed, "signed manifest: \(list.count) signatures, need 1...\(BundleLimits.signatureCountMax)")
        }
        var signatures: [Sign1] = []
        for s in list {
            let sign1 = try Sign1(s)
            guard sign1.payload == nil || sign1.payload == manifest else {
                throw BundleError(.malformed, "signed manifest: a signature carries a different payload")
            }
            signatures.append(sign1)
        }
        return (manifest, signatures)
    }
}
