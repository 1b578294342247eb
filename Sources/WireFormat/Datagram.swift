/// The session a datagram belongs to: random per session (Specs/protocol.md P-2).
public struct SessionID: Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt32
    public init(_ rawValue: UInt32) { self.rawValue = rawValue }
    public var description: String { String(rawValue, radix: 16) }
}

/// A receiver's identity in feedback, chosen by the receiver.
public struct ReceiverID: Hashable, Sendable, Comparable, CustomStringConvertible {
    public let rawValue: UInt64
    public init(_ rawValue: UInt64) { self.rawValue = rawValue }
    public static func < (a: Self, b: Self) -> Bool { a.rawValue < b.rawValue }
    public var description: String { String(rawValue, radix: 16) }
}

/// A sender's proof that a receiver can be reached at the address it registered from
/// (Specs/protocol.md §3.9, P-30): 16 bytes, all zero for "none yet".
public struct FeedbackCookie: Hashable, Sendable, CustomStringConvertible {
    public static let byteCount = 16
    public static let none = FeedbackCookie(unchecked: [UInt8](repeating: 0, count: byteCount))
    public let bytes: [UInt8]
    init(unchecked bytes: [UInt8]) { self.bytes = bytes }
    public init(_ bytes: [UInt8]) {
        precondition(bytes.count == Self.byteCount, "a cookie is 16 bytes")
        self.bytes = bytes
    }
    public var isNone: Bool { self == .none }
    public var description: String { bytes.prefix(4).map { String($0, radix: 16) }.joined() + "…" }

    static func read(_ r: inout ByteReader) throws(WireFormatError) -> FeedbackCookie {
        FeedbackCookie(unchecked: try r.bytes(byteCount, "cookie"))
    }
}

/// The two objects of a session (Specs/protocol.md §1).
public enum ObjectID: UInt8, Sendable, CaseIterable {
    case authChain = 1
    case payload = 2
}

/// The datagrams of Specs/protocol.md §3, parsed strictly at the boundary.
public enum Datagram: Equatable, Sendable {
    case announce(Announce)
    case data(DataSymbol)
    case poll(Poll)
    case close(Close)
    case register(Register)
    case nack(Nack)
    case status(Status)
    case ack(Ack)
    case cookie(Cookie)
    case session(SessionRecord)

    /// Version 2: REGISTER, NACK, STATUS and ACK carry the feedback cookie, and COOKIE
    /// exists (Specs/protocol.md §3.9).
    public static let version: UInt8 = 2
    public static let headerByteCount = 8

    public enum Kind: UInt8, Sendable, CaseIterable {
        case announce = 1, data, poll, close, register, nack, status, ack, cookie, session
    }

    public var kind: Kind {
        switch self {
        case .announce: .announce
        case .data: .data
        case .poll: .poll
        case .close: .close
        case .register: .register
        case .nack: .nack
        case .status: .status
        case .ack: .ack
        case .cookie: .cookie
        case .session: .session
        }
    }

    public var sessionID: SessionID {
        switch self {
        case .announce(let d): d.session
        case .data(let d): d.session
        case .poll(let d): d.session
        case .close(let d): d.session
        case .register(let d): d.session
        case .nack(let d): d.session
        case .status(let d): d.session
        case .ack(let d): d.session
        case .cookie(let d): d.session
        case .session(let d): d.session
        }
    }

    /// Parses one datagram (P-1): version, type, reserved bits, lengths, no trailing bytes.
    public init(parsing bytes: [UInt8]) throws(WireFormatError) {
        var r = ByteReader(bytes)
        let version = try r.u8("version")
        guard version == Self.version else { throw WireFormatError(.badVersion, "version \(version), expected \(Self.version)") }
        let rawKind = try r.u8("type")
        guard let kind = Kind(rawValue: rawKind) else { throw WireFormatError(.unknownType, "type \(rawKind)") }
        try r.zero(2, "header reserved")
        let session = SessionID(try r.u32("session ID"))
        switch kind {
        case .announce: self = .announce(try Announce(session: session, reader: &r))
        case .data: self = .data(try DataSymbol(session: session, reader: &r))
        case .poll: self = .poll(try Poll(session: session, reader: &r))
        case .close: self = .close(try Close(session: session, reader: &r))
        case .register: self = .register(try Register(session: session, reader: &r))
        case .nack: self = .nack(try Nack(session: session, reader: &r))
        case .status: self = .status(try Status(session: session, reader: &r))
        case .ack: self = .ack(try Ack(session: session, reader: &r))
        case .cookie: self = .cookie(try Cookie(session: session, reader: &r))
        case .session: self = .session(try SessionRecord(session: session, reader: &r))
        }
        try r.end()
    }

    public func encoded() -> [UInt8] {
        var w = ByteWriter(capacity: 64)
        w.u8(Self.version)
        w.u8(kind.rawValue)
        w.u16(0)
        w.u32(sessionID.rawValue)
        switch self {
        case .announce(let d): d.write(to: &w)
        case .data(let d): d.write(to: &w)
        case .poll(let d): d.write(to: &w)
        case .close(let d): d.write(to: &w)
        case .register(let d): d.write(to: &w)
        case .nack(let d): d.write(to: &w)
        case .status(let d): d.write(to: &w)
        case .ack(let d): d.write(to: &w)
        case .cookie(let d): d.write(to: &w)
        case .session(let d): d.write(to: &w)
        }
        return w.bytes
    }
}

/// ANNOUNCE (Specs/protocol.md §3.1): who is sending what, and a fragment of the signed manifest.
public struct Announce: Equatable, Sendable {
    public static let fixedByteCount = 77
    public static let fragmentByteCountMax = 1024
    /// Named limit: the Merkle path of a fragment (Specs/protocol.md P-3d): 8 levels
    /// hold 256 fragments, the envelope's limit.
    public static let pathLengthMax = 8
    public static let hashByteCount = 32

    public enum AddressFamily: UInt8, Sendable { case sourceAddress = 0, ipv4 = 4, ipv6 = 6 }

    public var session: SessionID
    public var feedbackFamily: AddressFamily
    public var carousel: Bool
    public var feedbackPort: UInt16
    /// 16 bytes; an IPv4 address uses the first 4.
    public var feedbackAddress: [UInt8]
    public var rateKilobytesPerSecond: UInt32
    public var grttMicroseconds: UInt32
    public var groupSize: UInt32
    public var interleaveWindow: UInt16
    public var fragmentIndex: UInt16
    public var fragmentCount: UInt16
    public var envelopeLength: UInt32
    /// The Merkle root over the envelope's fragments, and this fragment's path to it
    /// (Specs/protocol.md P-3d): each fragment is checked on arrival.
    public var root: [UInt8]
    public var path: [[UInt8]]
    public var fragment: [UInt8]

    public init(session: SessionID, feedbackFamily: AddressFamily = .sourceAddress, carousel: Bool = false, feedbackPort: UInt16 = 0,
                feedbackAddress: [UInt8] = [UInt8](repeating: 0, count: 16), rateKilobytesPerSecond: UInt32, grttMicroseconds: UInt32,
                groupSize: UInt32, interleaveWindow: UInt16, fragmentIndex: UInt16, fragmentCount: UInt16, envelopeLength: UInt32,
                root: [UInt8] = [UInt8](repeating: 0, count: hashByteCount), path: [[UInt8]] = [], fragment: [UInt8]) {
        precondition(feedbackAddress.count == 16 && root.count == Self.hashByteCount && path.count <= Self.pathLengthMax)
        precondition(path.allSatisfy { $0.count == Self.hashByteCount })
        self.root = root; self.path = path
        self.session = session; self.feedbackFamily = feedbackFamily; self.carousel = carousel; self.feedbackPort = feedbackPort
        self.feedbackAddress = feedbackAddress; self.rateKilobytesPerSecond = rateKilobytesPerSecond; self.grttMicroseconds = grttMicroseconds
        self.groupSize = groupSize; self.interleaveWindow = interleaveWindow; self.fragmentIndex = fragmentIndex
        self.fragmentCount = fragmentCount; self.envelopeLength = envelopeLength; self.fragment = fragment
    }

    init(session: SessionID, reader r: inout ByteReader) throws(WireFormatError) {
        self.session = session
        let family = try r.u8("address family")
        guard let f = AddressFamily(rawValue: family) else { throw WireFormatError(.invalidField, "address family \(family)") }
        feedbackFamily = f
        let flags = try r.u8("flags")
        guard flags & ~1 == 0 else { throw WireFormatError(.reservedNotZero, "announce flags \(flags)") }
        carousel = flags & 1 == 1
        feedbackPort = try r.u16("feedback port")
        feedbackAddress = try r.bytes(16, "feedback address")
        rateKilobytesPerSecond = try r.u32("rate")
        grttMicroseconds = try r.u32("GRTT")
        groupSize = try r.u32("group size")
        interleaveWindow = try r.u16("interleave window")
        fragmentIndex = try r.u16("fragment index")
        fragmentCount = try r.u16("fragment count")
        try r.zero(2, "announce reserved")
        envelopeLength = try r.u32("envelope length")
        root = try r.bytes(Self.hashByteCount, "envelope root")
        let depth = Int(try r.u8("path length"))
        guard depth <= Self.pathLengthMax else { throw WireFormatError(.invalidField, "a path of \(depth) levels exceeds \(Self.pathLengthMax)") }
        try r.need(depth * Self.hashByteCount, "path")
        var path: [[UInt8]] = []
        for _ in 0..<depth { path.append(try r.bytes(Self.hashByteCount, "path")) }
        self.path = path
        guard interleaveWindow >= 1 else { throw WireFormatError(.invalidField, "interleave window 0") }
        guard fragmentCount >= 1, fragmentIndex < fragmentCount else {
            throw WireFormatError(.invalidField, "fragment \(fragmentIndex) of \(fragmentCount)")
        }
        guard UInt64(fragmentCount) * UInt64(Self.fragmentByteCountMax) >= UInt64(envelopeLength),
              UInt64(fragmentCount - 1) * UInt64(Self.fragmentByteCountMax) < UInt64(envelopeLength) else {
            throw WireFormatError(.invalidField, "\(fragmentCount) fragments cannot hold \(envelopeLength) bytes")
        }
        let expected = min(Self.fragmentByteCountMax, Int(envelopeLength) - Int(fragmentIndex) * Self.fragmentByteCountMax)
        guard r.remaining == expected else {
            throw WireFormatError(r.remaining < expected ? .truncated : .trailingBytes, "fragment \(fragmentIndex) has \(r.remaining) bytes, expected \(expected)")
        }
        fragment = r.rest()
    }

    func write(to w: inout ByteWriter) {
        w.u8(feedbackFamily.rawValue)
        w.u8(carousel ? 1 : 0)
        w.u16(feedbackPort)
        w.append(feedbackAddress)
        w.u32(rateKilobytesPerSecond)
        w.u32(grttMicroseconds)
        w.u32(groupSize)
        w.u16(interleaveWindow)
        w.u16(fragmentIndex)
        w.u16(fragmentCount)
        w.u16(0)
        w.u32(envelopeLength)
        w.append(root)
        w.u8(UInt8(path.count))
        for p in path { w.append(p) }
        w.append(fragment)
    }

    /// Cuts an envelope into ANNOUNCE fragments.
    public static func fragments(of envelope: [UInt8]) -> [(index: UInt16, count: UInt16, bytes: [UInt8])] {
        let count = max(1, (envelope.count + fragmentByteCountMax - 1) / fragmentByteCountMax)
        return (0..<count).map { i in
            (UInt16(i), UInt16(count), Array(envelope[(i * fragmentByteCountMax)..<min(envelope.count, (i + 1) * fragmentByteCountMax)]))
        }
    }
}

/// DATA (Specs/protocol.md §3.2): one source or repair symbol.
public struct DataSymbol: Equatable, Sendable {
    public static let headerByteCount = 16
    public var session: SessionID
    public var object: ObjectID
    public var symbolIndex: UInt8
    /// Repair symbols the sender still has queued for this block in this round
    /// (0 outside repair): lets receivers skip NACKs already covered (P-18a).
    public var pendingRepair: UInt16
    public var block: UInt32
    /// A slice of the datagram it was parsed from: parsing copies no symbol bytes.
    public var symbol: ArraySlice<UInt8>

    public init(session: SessionID, object: ObjectID, block: UInt32, symbolIndex: UInt8, pendingRepair: UInt16 = 0, symbol: [UInt8]) {
        self.init(session: session, object: object, block: block, symbolIndex: symbolIndex, pendingRepair: pendingRepair, symbol: symbol[...])
    }

    public init(session: SessionID, object: ObjectID, block: UInt32, symbolIndex: UInt8, pendingRepair: UInt16 = 0, symbol: ArraySlice<UInt8>) {
        self.session = session; self.object = object; self.block = block; self.symbolIndex = symbolIndex
        self.pendingRepair = pendingRepair; self.symbol = symbol
    }

    init(session: SessionID, reader r: inout ByteReader) throws(WireFormatError) {
        self.session = session
        let o = try r.u8("object")
        guard let object = ObjectID(rawValue: o) else { throw WireFormatError(.invalidField, "object \(o)") }
        self.object = object
        symbolIndex = try r.u8("symbol index")
        pendingRepair = try r.u16("pending repair")
        block = try r.u32("block")
        guard r.remaining > 0 else { throw WireFormatError(.truncated, "data without a symbol") }
        symbol = r.restSlice()
    }

    func write(to w: inout ByteWriter) {
        w.u8(object.rawValue)
        w.u8(symbolIndex)
        w.u16(pendingRepair)
        w.u32(block)
        w.append(symbol)
    }
}

/// POLL (Specs/protocol.md §3.3): end of a pass; NACK now.
public struct Poll: Equatable, Sendable {
    public var session: SessionID
    public var round: UInt32
    public var sentAtMicroseconds: UInt64
    public var grttMicroseconds: UInt32
    public var groupSize: UInt32
    /// The session's POLL chain value of this round (Specs/protocol.md P-31); all zero
    /// in an unauthenticated session.
    public var chainValue: [UInt8]
    public init(session: SessionID, round: UInt32, sentAtMicroseconds: UInt64, grttMicroseconds: UInt32, groupSize: UInt32,
                chainValue: [UInt8] = SessionRecord.noChainValue) {
        precondition(chainValue.count == SessionRecord.chainValueByteCount)
        self.session = session; self.round = round; self.sentAtMicroseconds = sentAtMicroseconds
        self.grttMicroseconds = grttMicroseconds; self.groupSize = groupSize; self.chainValue = chainValue
    }
    init(session: SessionID, reader r: inout ByteReader) throws(WireFormatError) {
        self.session = session
        round = try r.u32("round")
        sentAtMicroseconds = try r.u64("sent-at")
        grttMicroseconds = try r.u32("GRTT")
        groupSize = try r.u32("group size")
        chainValue = try r.bytes(SessionRecord.chainValueByteCount, "chain value")
    }
    func write(to w: inout ByteWriter) { w.u32(round); w.u64(sentAtMicroseconds); w.u32(grttMicroseconds); w.u32(groupSize); w.append(chainValue) }
}

/// CLOSE (Specs/protocol.md §3.4).
public struct Close: Equatable, Sendable {
    public enum Reason: UInt8, Sendable, CaseIterable { case allDone = 0, deadline, idle, aborted }
    public var session: SessionID
    public var reason: Reason
    /// The POLL chain's value of round `round` (P-31): one past the last POLL's, so
    /// that only the sender can close; zero in an unauthenticated session.
    public var round: UInt32
    public var chainValue: [UInt8]
    public init(session: SessionID, reason: Reason, round: UInt32 = 0, chainValue: [UInt8] = SessionRecord.noChainValue) {
        precondition(chainValue.count == SessionRecord.chainValueByteCount)
        self.session = session; self.reason = reason; self.round = round; self.chainValue = chainValue
    }
    init(session: SessionID, reader r: inout ByteReader) throws(WireFormatError) {
        self.session = session
        let raw = try r.u8("reason")
        guard let reason = Reason(rawValue: raw) else { throw WireFormatError(.invalidField, "close reason \(raw)") }
        self.reason = reason
        try r.zero(3, "close reserved")
        round = try r.u32("round")
        chainValue = try r.bytes(SessionRecord.chainValueByteCount, "chain value")
    }
    func write(to w: inout ByteWriter) { w.u8(reason.rawValue); w.zero(3); w.u32(round); w.append(chainValue) }
}

/// REGISTER (Specs/protocol.md §3.5).
public struct Register: Equatable, Sendable {
    public static let textByteCountMax = 64
    public var session: SessionID
    public var receiver: ReceiverID
    /// The cookie the sender gave for this receiver and address; `.none` asks for one.
    public var cookie: FeedbackCookie
    public var installedSequence: UInt64
    public var deviceID: String
    public var version: String
    public init(session: SessionID, receiver: ReceiverID, cookie: FeedbackCookie = .none, installedSequence: UInt64, deviceID: String, version: String) {
        precondition(deviceID.utf8.count <= Self.textByteCountMax && version.utf8.count <= Self.textByteCountMax)
        self.session = session; self.receiver = receiver; self.cookie = cookie; self.installedSequence = installedSequence
        self.deviceID = deviceID; self.version = version
    }
    init(session: SessionID, reader r: inout ByteReader) throws(WireFormatError) {
        self.session = session
        receiver = ReceiverID(try r.u64("receiver ID"))
        cookie = try FeedbackCookie.read(&r)
        installedSequence = try r.u64("installed sequence")
        deviceID = try Self.text(&r, "device ID")
        version = try Self.text(&r, "version")
    }
    /// At most `textByteCountMax` bytes of UTF-8 of `text`, cut between characters.
    public static func fitting(_ text: String) -> String {
        var out = "", bytes = 0
        for scalar in text.unicodeScalars {
            let n = String(scalar).utf8.count
            guard bytes + n <= textByteCountMax else { break }
            out.unicodeScalars.append(scalar)
            bytes += n
        }
        return out
    }

    static func text(_ r: inout ByteReader, _ what: StaticString) throws(WireFormatError) -> String {
        let n = Int(try r.u8(what))
        guard n <= textByteCountMax else { throw WireFormatError(.invalidField, "\(what) of \(n) bytes exceeds \(textByteCountMax)") }
        guard let s = String(validating: try r.bytes(n, what), as: UTF8.self) else { throw WireFormatError(.invalidField, "\(what) is not UTF-8") }
        return s
    }
    func write(to w: inout ByteWriter) {
        w.u64(receiver.rawValue)
        w.append(cookie.bytes)
        w.u64(installedSequence)
        w.u8(UInt8(deviceID.utf8.count)); w.append(Array(deviceID.utf8))
        w.u8(UInt8(version.utf8.count)); w.append(Array(version.utf8))
    }
}

/// NACK (Specs/protocol.md §3.6): per block, how many more symbols are needed.
public struct Nack: Equatable, Sendable {
    public static let entryCountMax = 128
    public static let fixedByteCount = 52
    public static let entryByteCount = 8

    public struct Entry: Equatable, Sendable {
        public var object: ObjectID
        public var needed: UInt8
        public var block: UInt32
        public init(object: ObjectID, block: UInt32, needed: UInt8) { self.object = object; self.block = block; self.needed = needed }
    }

    public var session: SessionID
    public var receiver: ReceiverID
    public var cookie: FeedbackCookie
    public var round: UInt32
    public var echoedSentAtMicroseconds: UInt64
    public var holdMicroseconds: UInt32
    public var entries: [Entry]

    public init(session: SessionID, receiver: ReceiverID, cookie: FeedbackCookie = .none, round: UInt32, echoedSentAtMicroseconds: UInt64,
                holdMicroseconds: UInt32, entries: [Entry]) {
        precondition(!entries.isEmpty && entries.count <= Self.entryCountMax)
        self.session = session; self.receiver = receiver; self.cookie = cookie; self.round = round
        self.echoedSentAtMicroseconds = echoedSentAtMicroseconds; self.holdMicroseconds = holdMicroseconds; self.entries = entries
    }

    init(session: SessionID, reader r: inout ByteReader) throws(WireFormatError) {
        self.session = session
        receiver = ReceiverID(try r.u64("receiver ID"))
        cookie = try FeedbackCookie.read(&r)
        round = try r.u32("round")
        echoedSentAtMicroseconds = try r.u64("echoed sent-at")
        holdMicroseconds = try r.u32("hold time")
        let count = Int(try r.u16("entry count"))
        try r.zero(2, "nack reserved")
        guard count >= 1, count <= Self.entryCountMax else { throw WireFormatError(.invalidField, "\(count) NACK entries, allowed 1...\(Self.entryCountMax)") }
        try r.need(count * Self.entryByteCount, "NACK entries")
        entries = []
        entries.reserveCapacity(count)
        for _ in 0..<count {
            let o = try r.u8("entry object")
            guard let object = ObjectID(rawValue: o) else { throw WireFormatError(.invalidField, "entry object \(o)") }
            let needed = try r.u8("entry needed")
            guard needed >= 1 else { throw WireFormatError(.invalidField, "entry needs 0 symbols") }
            try r.zero(2, "entry reserved")
            entries.append(Entry(object: object, block: try r.u32("entry block"), needed: needed))
        }
    }

    func write(to w: inout ByteWriter) {
        w.u64(receiver.rawValue); w.append(cookie.bytes); w.u32(round); w.u64(echoedSentAtMicroseconds); w.u32(holdMicroseconds)
        w.u16(UInt16(entries.count)); w.u16(0)
        for e in entries { w.u8(e.object.rawValue); w.u8(e.needed); w.u16(0); w.u32(e.block) }
    }
}

/// STATUS (Specs/protocol.md §3.7).
public struct Status: Equatable, Sendable {
    /// `received`: every block is in and durable, step 2 runs; `complete`: step 2
    /// passed, the update is verified (Specs/protocol.md §3.7, P-21). A device agent
    /// goes on (Specs/agent.md §6): `installed` (written to the spare side and read
    /// back), `activating` (on trial, rebooting), then `confirmed` or `rolledBack`.
    public enum State: UInt8, Sendable, CaseIterable {
        case receiving = 1, complete, failed, received, installed, activating, confirmed, rolledBack
    }
    public enum Reason: UInt8, Sendable, CaseIterable {
        case none = 0, expired, incompatibleHardware, rollback, notARecipient, storage, sessionClosed, timedOut
        /// Step 2 found a hash or size that disagrees with the signed manifest.
        case verificationFailed
        /// Step 2 could not decrypt or decompress the payload.
        case decryptionFailed
        /// The device's own decision (its embedder's policy, no room, not now).
        case declined
        /// Rolled back: the health check failed.
        case unhealthy
        /// Rolled back: the new side never came up; the bootloader fell back.
        case didNotBoot
        /// Failed: the install was cut (power, kill) before it was verified.
        case interrupted
        /// Failed: no slot for a component, one too small for it, or its write or read-back failed.
        case slot
        /// Failed: the reboot into the update could not be started; the activation was undone.
        case rebootFailed
        /// Failed: the session's sender is not authorized for this update (its delegation
        /// expired, or covers other products), Specs/protocol.md P-31b.
        case unauthorized
    }
    public var session: SessionID
    public var receiver: ReceiverID
    public var cookie: FeedbackCookie
    public var state: State
    public var reason: Reason
    public var blocksDone: UInt32
    public var blocksTotal: UInt32
    public var bytesReceived: UInt64
    public var nacksSent: UInt32

    public init(session: SessionID, receiver: ReceiverID, cookie: FeedbackCookie = .none, state: State, reason: Reason, blocksDone: UInt32, blocksTotal: UInt32,
                bytesReceived: UInt64, nacksSent: UInt32) {
        self.session = session; self.receiver = receiver; self.cookie = cookie; self.state = state; self.reason = reason
        self.blocksDone = blocksDone; self.blocksTotal = blocksTotal; self.bytesReceived = bytesReceived; self.nacksSent = nacksSent
    }

    init(session: SessionID, reader r: inout ByteReader) throws(WireFormatError) {
        self.session = session
        receiver = ReceiverID(try r.u64("receiver ID"))
        cookie = try FeedbackCookie.read(&r)
        let s = try r.u8("state")
        guard let state = State(rawValue: s) else { throw WireFormatError(.invalidField, "state \(s)") }
        self.state = state
        let re = try r.u8("reason")
        guard let reason = Reason(rawValue: re), (state == .failed || state == .rolledBack) == (reason != .none) else {
            throw WireFormatError(.invalidField, "reason \(re) with state \(s)")
        }
        self.reason = reason
        try r.zero(2, "status reserved")
        blocksDone = try r.u32("blocks done")
        blocksTotal = try r.u32("blocks total")
        bytesReceived = try r.u64("bytes received")
        nacksSent = try r.u32("NACKs sent")
    }

    func write(to w: inout ByteWriter) {
        w.u64(receiver.rawValue); w.append(cookie.bytes); w.u8(state.rawValue); w.u8(reason.rawValue); w.u16(0)
        w.u32(blocksDone); w.u32(blocksTotal); w.u64(bytesReceived); w.u32(nacksSent)
    }
}

/// ACK (Specs/protocol.md §3.8): the sender heard a final STATUS. It carries the
/// receiver's cookie, which only the sender and that receiver know: a forged ACK
/// cannot silence a receiver (P-30c).
public struct Ack: Equatable, Sendable {
    public var session: SessionID
    public var receiver: ReceiverID
    public var cookie: FeedbackCookie
    public var state: Status.State
    public init(session: SessionID, receiver: ReceiverID, cookie: FeedbackCookie = .none, state: Status.State) {
        self.session = session; self.receiver = receiver; self.cookie = cookie; self.state = state
    }
    init(session: SessionID, reader r: inout ByteReader) throws(WireFormatError) {
        self.session = session
        receiver = ReceiverID(try r.u64("receiver ID"))
        cookie = try FeedbackCookie.read(&r)
        let s = try r.u8("state")
        guard let state = Status.State(rawValue: s) else { throw WireFormatError(.invalidField, "state \(s)") }
        self.state = state
        try r.zero(3, "ack reserved")
    }
    func write(to w: inout ByteWriter) { w.u64(receiver.rawValue); w.append(cookie.bytes); w.u8(state.rawValue); w.zero(3) }
}

/// COOKIE (Specs/protocol.md §3.9, P-30): the sender's answer to a REGISTER without a
/// valid cookie, unicast to where it came from. Never larger than the REGISTER it
/// answers (no amplification), and the sender keeps no state for it.
public struct Cookie: Equatable, Sendable {
    public static let byteCount = 32
    public var session: SessionID
    public var receiver: ReceiverID
    public var cookie: FeedbackCookie
    public init(session: SessionID, receiver: ReceiverID, cookie: FeedbackCookie) {
        precondition(!cookie.isNone, "a COOKIE carries a cookie")
        self.session = session; self.receiver = receiver; self.cookie = cookie
    }
    init(session: SessionID, reader r: inout ByteReader) throws(WireFormatError) {
        self.session = session
        receiver = ReceiverID(try r.u64("receiver ID"))
        cookie = try FeedbackCookie.read(&r)
        guard !cookie.isNone else { throw WireFormatError(.invalidField, "COOKIE without a cookie") }
    }
    func write(to w: inout ByteWriter) { w.u64(receiver.rawValue); w.append(cookie.bytes) }
}

/// SESSION (Specs/protocol.md §3.10): what the sender says about its session,
/// signed by a sender key that a vendor delegated (Specs/bundle.md §11). It binds
/// the session ID to its feedback address, its interleave window, the envelope it
/// announces (by hash) and the anchor of the POLL chain, so that a forged or
/// replayed ANNOUNCE, POLL or CLOSE changes nothing at a receiver that requires
/// authenticated sessions. Numbered: a receiver takes only newer ones.
///
/// ```
/// | common header (type 10) | number u32 | flags u8 | addr family u8 | feedback port u16 |
/// | feedback address (16) | interleave window u16 | reserved u16 | envelope length u32 |
/// | envelope root (32) | chain round u32 | chain value (32) | chain last round u32 |
/// | delegation length u16 | delegation | signature length u8 | signature |
/// ```
/// The signature covers "fleetcast session" followed by every byte from the common
/// header up to the signature length.
public struct SessionRecord: Equatable, Sendable {
    public static let chainValueByteCount = 32
    public static let noChainValue = [UInt8](repeating: 0, count: chainValueByteCount)
    public static let signatureContext = Array("fleetcast session".utf8)
    /// Named limits: the delegation's size (Specs/bundle.md §11) and a signature's.
    public static let delegationByteCountMax = 768
    public static let signatureByteCountMax = 64

    public var session: SessionID
    public var number: UInt32
    public var carousel: Bool
    public var feedbackFamily: Announce.AddressFamily
    public var feedbackPort: UInt16
    public var feedbackAddress: [UInt8]
    public var interleaveWindow: UInt16
    public var envelopeLength: UInt32
    /// The Merkle root over the envelope's fragments (P-3d): it binds the envelope.
    public var envelopeRoot: [UInt8]
    /// The latest POLL chain value disclosed, and its round (0: the anchor).
    public var chainRound: UInt32
    public var chainValue: [UInt8]
    /// The chain's last round: no POLL or CLOSE beyond it.
    public var chainLastRound: UInt32
    public var delegation: [UInt8]
    public var signature: [UInt8]

    public init(session: SessionID, number: UInt32, carousel: Bool, feedbackFamily: Announce.AddressFamily, feedbackPort: UInt16, feedbackAddress: [UInt8],
                interleaveWindow: UInt16, envelopeLength: UInt32, envelopeRoot: [UInt8], chainRound: UInt32, chainValue: [UInt8], chainLastRound: UInt32,
                delegation: [UInt8], signature: [UInt8] = []) {
        precondition(feedbackAddress.count == 16 && envelopeRoot.count == 32 && chainValue.count == Self.chainValueByteCount)
        precondition(delegation.count <= Self.delegationByteCountMax && signature.count <= Self.signatureByteCountMax)
        self.session = session; self.number = number; self.carousel = carousel; self.feedbackFamily = feedbackFamily
        self.feedbackPort = feedbackPort; self.feedbackAddress = feedbackAddress; self.interleaveWindow = interleaveWindow
        self.envelopeLength = envelopeLength; self.envelopeRoot = envelopeRoot; self.chainRound = chainRound; self.chainValue = chainValue
        self.chainLastRound = chainLastRound; self.delegation = delegation; self.signature = signature
    }

    init(session: SessionID, reader r: inout ByteReader) throws(WireFormatError) {
        self.session = session
        number = try r.u32("record number")
        let flags = try r.u8("flags")
        guard flags & ~1 == 0 else { throw WireFormatError(.reservedNotZero, "session flags \(flags)") }
        carousel = flags & 1 == 1
        let family = try r.u8("address family")
        guard let f = Announce.AddressFamily(rawValue: family) else { throw WireFormatError(.invalidField, "address family \(family)") }
        feedbackFamily = f
        feedbackPort = try r.u16("feedback port")
        feedbackAddress = try r.bytes(16, "feedback address")
        interleaveWindow = try r.u16("interleave window")
        guard interleaveWindow >= 1 else { throw WireFormatError(.invalidField, "interleave window 0") }
        try r.zero(2, "session reserved")
        envelopeLength = try r.u32("envelope length")
        envelopeRoot = try r.bytes(32, "envelope root")
        chainRound = try r.u32("chain round")
        chainValue = try r.bytes(Self.chainValueByteCount, "chain value")
        chainLastRound = try r.u32("chain last round")
        guard chainRound <= chainLastRound else { throw WireFormatError(.invalidField, "chain round \(chainRound) beyond its last \(chainLastRound)") }
        let d = Int(try r.u16("delegation length"))
        guard d <= Self.delegationByteCountMax else { throw WireFormatError(.invalidField, "delegation of \(d) bytes exceeds \(Self.delegationByteCountMax)") }
        delegation = try r.bytes(d, "delegation")
        let n = Int(try r.u8("signature length"))
        guard n <= Self.signatureByteCountMax else { throw WireFormatError(.invalidField, "signature of \(n) bytes exceeds \(Self.signatureByteCountMax)") }
        signature = try r.bytes(n, "signature")
    }

    func write(to w: inout ByteWriter) {
        writeSigned(to: &w)
        w.u8(UInt8(signature.count))
        w.append(signature)
    }

    private func writeSigned(to w: inout ByteWriter) {
        w.u32(number)
        w.u8(carousel ? 1 : 0)
        w.u8(feedbackFamily.rawValue)
        w.u16(feedbackPort)
        w.append(feedbackAddress)
        w.u16(interleaveWindow)
        w.u16(0)
        w.u32(envelopeLength)
        w.append(envelopeRoot)
        w.u32(chainRound)
        w.append(chainValue)
        w.u32(chainLastRound)
        w.u16(UInt16(delegation.count))
        w.append(delegation)
    }

    /// What the sender key signs: the context, the common header and every field before the signature.
    public var signedBytes: [UInt8] {
        var w = ByteWriter(capacity: 512)
        w.append(Self.signatureContext)
        w.u8(Datagram.version); w.u8(Datagram.Kind.session.rawValue); w.u16(0); w.u32(session.rawValue)
        writeSigned(to: &w)
        return w.bytes
    }
}
