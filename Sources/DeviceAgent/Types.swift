import DeliveryCore
import UpdateBundle
import WireFormat

/// Who this device is and what it trusts: fixed for the life of the process.
public struct DeviceIdentity: Sendable {
    /// Shown in the sender's fleet report.
    public var deviceID: String
    /// The receiver's ID on the wire (Specs/protocol.md §3.5): random and kept per
    /// device, not derived from a name others can guess. Nil: the one made once and
    /// kept in the staging directory.
    public var receiverID: ReceiverID?
    /// The manifest must name this product, when set.
    public var productID: String?
    /// The manifest must list this hardware, when set.
    public var hardwareID: String?
    /// Whose signatures an update must carry, and how many.
    public var trust: TrustPolicy
    /// The device's keys for encrypted bundles.
    public var keys: DecryptionKeys

    /// Product and hardware left nil are not checked.
    public init(deviceID: String, receiverID: ReceiverID? = nil, productID: String? = nil, hardwareID: String? = nil,
                trust: TrustPolicy, keys: DecryptionKeys = .init()) {
        self.deviceID = deviceID; self.receiverID = receiverID; self.productID = productID; self.hardwareID = hardwareID
        self.trust = trust; self.keys = keys
    }
}

/// What runs on the device now. It changes when an update is confirmed, so the
/// receiver asks for it at every offer instead of keeping a copy.
public struct InstalledSoftware: Sendable, Equatable {
    /// Reported to the sender (REGISTER).
    public var version: String
    /// The anti-rollback sequence: an update's must be larger. Nil: not known (any is accepted).
    public var sequence: UInt64?
    /// The software as installed now.
    public init(version: String, sequence: UInt64?) { self.version = version; self.sequence = sequence }
}

/// An update the device's policy admits, waiting for the embedder's answer
/// (`UpdateReceiver.accept` or `decline`). Nothing of it is staged yet.
public struct UpdateOffer: Sendable {
    /// The sender's session.
    public let session: SessionID
    /// Signatures and policy (product, hardware, expiry, sequence) passed at `now`;
    /// the device's keys unwrap its content key.
    public let manifest: VerifiedManifest
    /// Bytes the staging directory needs (the bundle, or without its payload when the
    /// payload is staged as the component, P-29a), and the output directory.
    public let stagingBytes: UInt64
    /// (See `stagingBytes`.)
    public let outputBytes: UInt64
    /// Accepting resumes a journal of this very bundle: its verified blocks are kept.
    public let resumes: Bool
    /// Where the session's feedback goes: the sender, to which a device agent reports later too.
    public let sender: PeerAddress
    /// Whether a signed SESSION record vouches for the session (Specs/protocol.md P-31):
    /// the delegation of its sender key, nil for an unauthenticated session.
    public let senderDelegation: SenderDelegation?
}

/// Why a session ended without a verified update, typed: each has its own
/// exit status in `fleetcast receive` and its own reason on the wire.
public struct ReceiveFailure: Error, Sendable, CustomStringConvertible {
    /// Why, as a value to switch on.
    public enum Reason: String, Sendable, CaseIterable {
        case expired, incompatibleHardware, rollback, notARecipient
        /// Staging or output could not be written, read back or made durable (or had no room).
        case storage
        /// Step 2: a hash or a size disagrees with the signed manifest.
        case verification
        /// Step 2: the payload does not decrypt or decompress.
        case decryption
        /// The sender closed the session, or went silent, before every block arrived.
        case sessionClosed, timedOut
        /// The embedder declined the offer.
        case declined
        /// The session's sender is not authorized for this update (Specs/protocol.md P-31b).
        case unauthorized
    }
    /// The kind of failure.
    public let reason: Reason
    /// What exactly happened, for a person.
    public let text: String
    /// A failure of `reason`, explained by `text`.
    public init(_ reason: Reason, _ text: String) { self.reason = reason; self.text = text }
    /// "reason: text".
    public var description: String { "\(reason.rawValue): \(text)" }

    /// The STATUS reason the sender hears (Specs/protocol.md §3.7).
    public var statusReason: Status.Reason {
        switch reason {
        case .expired: .expired
        case .incompatibleHardware: .incompatibleHardware
        case .rollback: .rollback
        case .notARecipient: .notARecipient
        case .storage: .storage
        case .verification: .verificationFailed
        case .decryption: .decryptionFailed
        case .sessionClosed: .sessionClosed
        case .timedOut: .timedOut
        case .declined: .declined
        case .unauthorized: .unauthorized
        }
    }

    init(status reason: Status.Reason, _ text: String) {
        let r: Reason = switch reason {
        case .expired: .expired
        case .incompatibleHardware: .incompatibleHardware
        case .rollback: .rollback
        case .notARecipient: .notARecipient
        case .storage, .none, .interrupted, .slot, .unhealthy, .didNotBoot, .rebootFailed: .storage
        case .verificationFailed: .verification
        case .decryptionFailed: .decryption
        case .sessionClosed: .sessionClosed
        case .timedOut: .timedOut
        case .declined: .declined
        case .unauthorized: .unauthorized
        }
        self.init(r, text)
    }

    /// A bundle check that failed, as a receive failure.
    init(_ error: BundleError) {
        let r: Reason = switch error.code {
        case .expired: .expired
        case .incompatibleHardware: .incompatibleHardware
        case .rollback: .rollback
        case .notARecipient: .notARecipient
        case .io: .storage
        case .decryptionFailed: .decryption
        case .malformed, .unknownCriticalField, .signatureInvalid, .sizeMismatch, .hashMismatch, .invalidInput: .verification
        }
        self.init(r, error.reason)
    }
}

/// A verified update, released: what step 2 made of a complete transfer.
public struct ReceivedUpdate: Sendable {
    /// The session it came in.
    public let session: SessionID
    /// The verified bundle: its manifest and where each component went.
    public let verified: VerifiedBundle
    /// The staged bundle, when one was kept (nil when the payload was staged as the
    /// component itself, P-29a). The next session's bundle replaces it: move it away
    /// to keep it.
    public let bundlePath: String?
    /// Where each component was released, by name (empty without an output directory).
    public var componentPaths: [String: String] { verified.componentPaths }
    /// The signed manifest of the update.
    public var manifest: Manifest { verified.manifest.manifest }
}

/// What the receiver tells its embedder, in order (`UpdateReceiver.pollEvent`).
public enum UpdateEvent: Sendable {
    /// Judge it: `accept` or `decline`. The policy has already passed.
    case offer(UpdateOffer)
    /// A validly signed announce the device's policy refused (expired, other hardware,
    /// rollback, not a recipient, no room): the sender was told, the receiver listens on.
    case refused(session: SessionID, ReceiveFailure)
    /// Accepted: the transfer of this session starts (or resumes).
    case joined(session: SessionID, manifest: Manifest)
    /// Every block is in; step 2 finishes (reading staged blocks back if it must).
    case received(session: SessionID)
    /// Verified, released, and reported to the sender as complete.
    case completed(ReceivedUpdate)
    /// The session ended without a verified update; the sender was told why.
    case failed(session: SessionID, ReceiveFailure)
}
