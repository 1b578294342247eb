import CBOR
import FleetCrypto

/// Why a bundle or manifest was refused. Each code is a distinct failure with
/// its own CLI exit status (Specs/bundle.md §10); `reason` says exactly what.
public struct BundleError: Error, Hashable, CustomStringConvertible, Sendable {
    public enum Code: String, Sendable, CaseIterable {
        /// Bytes that do not parse: truncated, bad magic, bad CBOR, wrong types, limits exceeded.
        case malformed
        /// A non-negative (critical) manifest key this version does not understand.
        case unknownCriticalField
        /// Fewer valid signatures from trusted keys than the threshold.
        case signatureInvalid
        case expired
        case incompatibleHardware
        /// `sequence` not greater than the installed one (anti-rollback).
        case rollback
        /// A length that disagrees with the manifest.
        case sizeMismatch
        /// A hash (payload, block, symbol tag, segment, component) that disagrees.
        case hashMismatch
        /// Encrypted, and none of the device's keys is a recipient.
        case notARecipient
        /// Key unwrap or AES-GCM authentication failed, or the payload does not decompress.
        case decryptionFailed
        /// Reading or writing a file failed.
        case io
        /// Invalid input to pack (missing file, bad option).
        case invalidInput
    }

    public let code: Code
    public let reason: String

    public init(_ code: Code, _ reason: String) {
        self.code = code
        self.reason = reason
    }

    public static func == (a: Self, b: Self) -> Bool { a.code == b.code }
    public func hash(into h: inout Hasher) { h.combine(code) }
    public var description: String { "\(code.rawValue): \(reason)" }

    /// The process exit status for this failure (Specs/bundle.md §10).
    public var exitCode: Int32 {
        switch code {
        case .malformed: 10
        case .unknownCriticalField: 11
        case .signatureInvalid: 12
        case .expired: 13
        case .incompatibleHardware: 14
        case .rollback: 15
        case .sizeMismatch: 16
        case .hashMismatch: 17
        case .notARecipient: 18
        case .decryptionFailed: 19
        case .io: 20
        case .invalidInput: 21
        }
    }

    static func malformed(_ error: CBORError, in what: String) -> BundleError {
        BundleError(.malformed, "\(what): \(error)")
    }
}
