/// Why a datagram was refused (Specs/protocol.md P-1). Compared by code.
public struct WireFormatError: Error, Hashable, CustomStringConvertible, Sendable {
    public enum Code: String, Sendable, CaseIterable {
        case truncated, trailingBytes, badVersion, unknownType, reservedNotZero, invalidField
    }
    public let code: Code
    public let reason: String
    public init(_ code: Code, _ reason: String) { self.code = code; self.reason = reason }
    public static func == (a: Self, b: Self) -> Bool { a.code == b.code }
    public func hash(into h: inout Hasher) { h.combine(code) }
    public var description: String { "\(code.rawValue): \(reason)" }
}

/// A bounds-checked big-endian reader over untrusted bytes. Every read
/// checks the length first; nothing here can trap on bad input.
public struct ByteReader {
    public let bytes: [UInt8]
    public private(set) var offset: Int

    public init(_ bytes: [UInt8], offset: Int = 0) { self.bytes = bytes; self.offset = offset }

    public var remaining: Int { bytes.count - offset }

    public mutating func need(_ n: Int, _ what: StaticString) throws(WireFormatError) {
        guard n <= remaining else { throw WireFormatError(.truncated, "\(what): need \(n) bytes at \(offset), have \(remaining)") }
    }

    public mutating func u8(_ what: StaticString) throws(WireFormatError) -> UInt8 {
        try need(1, what)
        defer { offset += 1 }
        return bytes[offset]
    }

    /// A big-endian unsigned integer of T's width.
    public mutating func unsigned<T: FixedWidthInteger & UnsignedInteger>(_: T.Type, _ what: StaticString) throws(WireFormatError) -> T {
        let width = T.bitWidth / 8
        try need(width, what)
        var v: T = 0
        for i in 0..<width { v = v << 8 | T(bytes[offset + i]) }
        offset += width
        return v
    }

    public mutating func u16(_ what: StaticString) throws(WireFormatError) -> UInt16 { try unsigned(UInt16.self, what) }
    public mutating func u32(_ what: StaticString) throws(WireFormatError) -> UInt32 { try unsigned(UInt32.self, what) }
    public mutating func u64(_ what: StaticString) throws(WireFormatError) -> UInt64 { try unsigned(UInt64.self, what) }

    public mutating func bytes(_ n: Int, _ what: StaticString) throws(WireFormatError) -> [UInt8] {
        try need(n, what)
        defer { offset += n }
        return Array(bytes[offset..<(offset + n)])
    }

    /// The unread bytes, sharing the reader's storage (no copy).
    public mutating func restSlice() -> ArraySlice<UInt8> {
        defer { offset = bytes.count }
        return bytes[offset...]
    }

    public mutating func rest() -> [UInt8] {
        defer { offset = bytes.count }
        return Array(bytes[offset...])
    }

    public mutating func zero(_ n: Int, _ what: StaticString) throws(WireFormatError) {
        try need(n, what)
        for i in 0..<n where bytes[offset + i] != 0 {
            throw WireFormatError(.reservedNotZero, "\(what) at byte \(offset + i) is not zero")
        }
        offset += n
    }

    public func end() throws(WireFormatError) {
        guard remaining == 0 else { throw WireFormatError(.trailingBytes, "\(remaining) bytes after the last field") }
    }
}

/// Appends big-endian fields.
public struct ByteWriter {
    public var bytes: [UInt8] = []
    public init() {}
    public init(capacity: Int) { bytes.reserveCapacity(capacity) }
    public mutating func u8(_ v: UInt8) { bytes.append(v) }
    public mutating func u16(_ v: UInt16) { bytes += [UInt8(v >> 8), UInt8(v & 0xFF)] }
    public mutating func u32(_ v: UInt32) { for s in stride(from: 24, through: 0, by: -8) { bytes.append(UInt8((v >> UInt32(s)) & 0xFF)) } }
    public mutating func u64(_ v: UInt64) { for s in stride(from: 56, through: 0, by: -8) { bytes.append(UInt8((v >> UInt64(s)) & 0xFF)) } }
    public mutating func zero(_ n: Int) { bytes += repeatElement(0, count: n) }
    public mutating func append(_ b: [UInt8]) { bytes += b }
    public mutating func append(_ b: ArraySlice<UInt8>) { bytes += b }
}
