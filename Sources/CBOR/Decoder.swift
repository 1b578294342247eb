/// Why bytes were rejected as CBOR. `offset` is where the decoder stood.
public struct CBORError: Error, Hashable, CustomStringConvertible, Sendable {
    public enum Code: String, Sendable {
        case truncated, trailingBytes, notDeterministic, unsupported, tooDeep, tooLarge, invalidUTF8, duplicateKey
    }
    public let code: Code
    public let offset: Int
    public let reason: String
    public init(_ code: Code, at offset: Int, _ reason: String) { self.code = code; self.offset = offset; self.reason = reason }
    public static func == (a: Self, b: Self) -> Bool { a.code == b.code }
    public func hash(into h: inout Hasher) { h.combine(code) }
    public var description: String { "CBOR \(code.rawValue) at byte \(offset): \(reason)" }
}

extension CBOR {
    /// Limits on untrusted input. Every item costs at least one input byte,
    /// so work is linear in the input; the depth limit bounds recursion.
    public struct DecodingLimits: Sendable {
        /// Nesting of arrays, maps and tags.
        public var depthMax: Int
        /// Items in one array or map (also bounded by the bytes left).
        public var containerCountMax: Int
        public init(depthMax: Int = 16, containerCountMax: Int = 4096) {
            self.depthMax = depthMax
            self.containerCountMax = containerCountMax
        }
    }

    /// Decodes exactly one item occupying all of `bytes`, accepting only the
    /// deterministic encoding (RFC 8949 §4.2.1) that `encoded()` produces:
    /// shortest arguments, definite lengths, sorted and unique map keys,
    /// valid UTF-8, no floats, no simple values but false/true/null.
    public init(decoding bytes: [UInt8], limits: DecodingLimits = .init()) throws(CBORError) {
        var reader = Reader(bytes: bytes, limits: limits)
        self = try reader.item(depth: 0)
        guard reader.offset == bytes.count else {
            throw CBORError(.trailingBytes, at: reader.offset, "\(bytes.count - reader.offset) bytes after the item")
        }
    }

    struct Reader {
        let bytes: [UInt8]
        let limits: DecodingLimits
        var offset = 0

        mutating func byte() throws(CBORError) -> UInt8 {
            guard offset < bytes.count else { throw CBORError(.truncated, at: offset, "input ends inside an item") }
            defer { offset += 1 }
            return bytes[offset]
        }

        mutating func take(_ count: UInt64) throws(CBORError) -> ArraySlice<UInt8> {
            guard count <= UInt64(bytes.count - offset) else {
                throw CBORError(.truncated, at: offset, "string of \(count) bytes, \(bytes.count - offset) left")
            }
            defer { offset += Int(count) }
            return bytes[offset..<(offset + Int(count))]
        }

        mutating func argument(_ info: UInt8, at start: Int) throws(CBORError) -> UInt64 {
            let width: Int
            switch info {
            case 0..<24: return UInt64(info)
            case 24: width = 1
            case 25: width = 2
            case 26: width = 4
            case 27: width = 8
            case 31: throw CBORError(.notDeterministic, at: start, "indefinite length")
            default: throw CBORError(.unsupported, at: start, "reserved additional information \(info)")
            }
            var value: UInt64 = 0
            for _ in 0..<width { value = value << 8 | UInt64(try byte()) }
            let minimum: UInt64 = switch width { case 1: 24; case 2: 0x100; case 4: 0x1_0000; default: 0x1_0000_0000 }
            guard value >= minimum else {
                throw CBORError(.notDeterministic, at: start, "argument \(value) not in its shortest form")
            }
            return value
        }

        mutating func count(_ n: UInt64, at start: Int) throws(CBORError) -> Int {
            guard n <= UInt64(limits.containerCountMax), n <= UInt64(bytes.count - offset) else {
                throw CBORError(.tooLarge, at: start, "container of \(n) items exceeds the limit or the input")
            }
            return Int(n)
        }

        mutating func item(depth: Int) throws(CBORError) -> CBOR {
            guard depth <= limits.depthMax else { throw CBORError(.tooDeep, at: offset, "nesting deeper than \(limits.depthMax)") }
            let start = offset
            let initial = try byte()
            let major = initial >> 5, info = initial & 0x1F
            if major == 7 {
                switch info {
                case 20: return .bool(false)
                case 21: return .bool(true)
                case 22: return .null
                case 25, 26, 27: throw CBORError(.unsupported, at: start, "floating-point values are not allowed")
                default: throw CBORError(.unsupported, at: start, "simple value \(info) is not allowed")
                }
            }
            let argument = try argument(info, at: start)
            switch major {
            case 0: return .unsigned(argument)
            case 1: return .negative(argument)
            case 2: return .bytes(Array(try take(argument)))
            case 3:
                let raw = try take(argument)
                guard let text = String(validating: raw, as: UTF8.self) else {
                    throw CBORError(.invalidUTF8, at: start, "text string is not valid UTF-8")
                }
                return .text(text)
            case 4:
                let n = try count(argument, at: start)
                var items: [CBOR] = []
                items.reserveCapacity(n)
                for _ in 0..<n { items.append(try item(depth: depth + 1)) }
                return .array(items)
            case 5:
                let n = try count(argument, at: start)
                var entries: [Entry] = []
                entries.reserveCapacity(n)
                var previousKey: ArraySlice<UInt8>? = nil
                for _ in 0..<n {
                    let keyStart = offset
                    let key = try item(depth: depth + 1)
                    let keyBytes = bytes[keyStart..<offset]
                    if let previousKey {
                        if previousKey == keyBytes { throw CBORError(.duplicateKey, at: keyStart, "map key repeated") }
                        guard previousKey.lexicographicallyPrecedes(keyBytes) else {
                            throw CBORError(.notDeterministic, at: keyStart, "map keys not in bytewise order")
                        }
                    }
                    previousKey = keyBytes
                    entries.append(Entry(key, try item(depth: depth + 1)))
                }
                return .map(entries)
            default: // 6
                return .tagged(argument, try item(depth: depth + 1))
            }
        }
    }
}
