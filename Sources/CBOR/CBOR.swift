/// A CBOR data item (RFC 8949), restricted to what Fleetcast's manifests and
/// COSE structures use: integers, byte and text strings, arrays, maps, tags,
/// and the simple values false, true and null. Floats and undefined are not
/// representable, so they cannot be smuggled into a signed manifest.
public indirect enum CBOR: Hashable, Sendable {
    case unsigned(UInt64)
    /// The negative integer `-1 - n`.
    case negative(UInt64)
    case bytes([UInt8])
    case text(String)
    case array([CBOR])
    /// Entries in the order given; the encoder sorts them (RFC 8949 §4.2.1).
    case map([Entry])
    case tagged(UInt64, CBOR)
    case bool(Bool)
    case null

    public struct Entry: Hashable, Sendable {
        public var key: CBOR
        public var value: CBOR
        public init(_ key: CBOR, _ value: CBOR) { self.key = key; self.value = value }
    }

    /// An integer item from a Swift `Int`.
    public static func int(_ value: Int) -> CBOR {
        value >= 0 ? .unsigned(UInt64(value)) : .negative(UInt64(-(value + 1)))
    }

    /// A map keyed by integers, the style of COSE and of our manifest.
    public static func intMap(_ entries: [(Int, CBOR)]) -> CBOR {
        .map(entries.map { Entry(.int($0.0), $0.1) })
    }

    // MARK: Typed accessors for decoders (nil when the item has another type).

    public var intValue: Int? {
        switch self {
        case .unsigned(let n): n <= UInt64(Int.max) ? Int(n) : nil
        case .negative(let n): n <= UInt64(Int.max) ? -Int(n) - 1 : nil
        default: nil
        }
    }
    public var uint64Value: UInt64? { if case .unsigned(let n) = self { n } else { nil } }
    public var bytesValue: [UInt8]? { if case .bytes(let b) = self { b } else { nil } }
    public var textValue: String? { if case .text(let t) = self { t } else { nil } }
    public var arrayValue: [CBOR]? { if case .array(let a) = self { a } else { nil } }
    public var mapValue: [Entry]? { if case .map(let m) = self { m } else { nil } }
    public var boolValue: Bool? { if case .bool(let b) = self { b } else { nil } }

    /// The value under integer key `key` of a map.
    public subscript(key: Int) -> CBOR? {
        mapValue?.first { $0.key == .int(key) }?.value
    }
}
