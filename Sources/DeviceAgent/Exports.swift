// One import for a device maker: the receiver's values (Instant, PeerAddress,
// Transmit, ReceiverStats), the bundle's (Manifest, TrustPolicy, DecryptionKeys,
// VerifiedBundle), the keys (PublicKey, PrivateKey) and the wire's identifiers.
@_exported import DeliveryCore
@_exported import FleetCrypto
@_exported import UpdateBundle
@_exported import WireFormat
