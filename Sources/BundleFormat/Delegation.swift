import CBOR
import FleetCrypto

/// A vendor's word that a sender key may run sessions (Specs/bundle.md §11): a
/// COSE_Sign1 with the payload attached, signed by a key of the receivers' trust
/// policy, over
///
/// ```
/// delegation = {
///   1 => "fleetcast sender",   ; purpose: never mistaken for a manifest
///   2 => bstr,                 ; the sender's public key, raw (32 bytes Ed25519, 65 P-256)
///   3 => int,                  ; its COSE algorithm: -8 EdDSA, -7 ES256
///   4 => uint,                 ; not before (Unix seconds)
///   5 => uint,                 ; expires (Unix seconds): after not-before, within a year
///   ? 6 => [+ tstr],           ; the products it may send; absent: any
/// }
/// ```
///
/// As TUF delegates a role, the vendor's signing key stays offline: the sender
/// holds only this short-lived key, which authenticates what it multicasts about a
/// session (Specs/protocol.md §3.10) and can install nothing.
public struct SenderDelegation: Sendable, Equatable {
    public static let purpose = "fleetcast sender"
    /// Named limits: the encoded delegation travels in every SESSION datagram; a
    /// delegation lasts at most a year.
    public static let byteCountMax = 768
    public static let lifetimeSecondsMax: UInt64 = 366 * 86_400
    public static let productCountMax = 16

    public let senderKey: PublicKey
    public let notBefore: UInt64
    public let expires: UInt64
    public let products: [String]?
    /// The encoded COSE_Sign1, as sent.
    public let encoded: [UInt8]

    /// Signs a delegation of `senderKey` with the vendor's `signer`.
    public static func make(senderKey: PublicKey, signer: PrivateKey, notBefore: UInt64, expires: UInt64,
                            products: [String]? = nil) throws(BundleError) -> SenderDelegation {
        guard senderKey.algorithm.canSign else { throw BundleError(.invalidInput, "a sender key signs: Ed25519 or P-256, not \(senderKey.algorithm)") }
        var fields: [(Int, CBOR)] = [(1, .text(purpose)), (2, .bytes(senderKey.raw)), (3, .int(try COSE.Algorithm(senderKey.algorithm).rawValue)),
                                     (4, .unsigned(notBefore)), (5, .unsigned(expires))]
        if let products { fields.append((6, .array(products.map { .text($0) }))) }
        let signed = try COSE.Sign1.sign(payload: CBOR.intMap(fields).encoded(), key: signer, detached: false).encoded()
        let parsed = try SenderDelegation(untrusted: signed)
        return parsed
    }

    /// Parses a delegation from untrusted bytes: its structure and fields, strictly.
    /// Not its signature (`verified(by:)`) nor its time (`isValid(at:)`).
    public init(untrusted bytes: [UInt8]) throws(BundleError) {
        guard bytes.count <= Self.byteCountMax else { throw BundleError(.malformed, "delegation of \(bytes.count) bytes exceeds \(Self.byteCountMax)") }
        let item: CBOR
        do { item = try CBOR(decoding: bytes) } catch { throw .malformed(error, in: "delegation") }
        let sign1 = try COSE.Sign1(item)
        guard let payload = sign1.payload else { throw BundleError(.malformed, "delegation: the payload is detached") }
        let body: CBOR
        do { body = try CBOR(decoding: payload) } catch { throw .malformed(error, in: "delegation payload") }
        var d = try FieldReader(body, "delegation")
        guard try d.field(1).textValue == Self.purpose else { throw BundleError(.malformed, "delegation: not a \"\(Self.purpose)\" delegation") }
        let raw = try d.bytes(2, countIn: 32...65)
        guard let algorithm = COSE.Algorithm(rawValue: try d.int(3, in: -8 ... -7)), algorithm.keyAlgorithm.canSign else {
            throw BundleError(.malformed, "delegation: the sender key's algorithm is not EdDSA or ES256")
        }
        do { senderKey = try PublicKey(raw: raw, algorithm: algorithm.keyAlgorithm) } catch {
            throw BundleError(.malformed, "delegation: sender key: \(error)")
        }
        notBefore = try d.uint64(4)
        expires = try d.uint64(5)
        guard expires > notBefore, expires - notBefore <= Self.lifetimeSecondsMax else {
            throw BundleError(.malformed, "delegation: valid from \(notBefore) to \(expires): empty, or longer than a year")
        }
        if d.has(6) {
            let list = try d.array(6, max: Self.productCountMax) { (item) throws(BundleError) in try FieldReader.text(item, "delegation product") }
            guard !list.isEmpty else { throw BundleError(.malformed, "delegation: an empty product list") }
            products = list
        } else {
            products = nil
        }
        try d.finish()
        self.sign1 = sign1
        encoded = bytes
    }

    private let sign1: COSE.Sign1

    /// The trusted key whose signature makes this delegation valid (one check per
    /// trusted key, Specs/bundle.md B-8a), or why none does.
    public func verified(by trust: TrustPolicy) throws(BundleError) -> PublicKey {
        guard let key = trust.trustedKeys.first(where: { $0.keyID == sign1.keyID }) else {
            throw BundleError(.signatureInvalid, "delegation signed by \(sign1.keyID.hexString), not a trusted key")
        }
        guard sign1.verify(with: key) else { throw BundleError(.signatureInvalid, "delegation: the signature of trusted key \(key.keyID.hexString) does not verify") }
        return key
    }

    /// Within its validity at `unixTime`, and for `product` if it names products.
    public func permits(product: String, at unixTime: UInt64) -> String? {
        if unixTime < notBefore { return "the sender's delegation is not valid before \(notBefore) (now \(unixTime))" }
        if unixTime >= expires { return "the sender's delegation expired at \(expires) (now \(unixTime))" }
        if let products, !products.contains(product) { return "the sender's delegation does not cover product \(product)" }
        return nil
    }

    public static func == (a: SenderDelegation, b: SenderDelegation) -> Bool { a.encoded == b.encoded }
}
