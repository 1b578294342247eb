import DeliveryCore
import FleetCrypto
import UpdateBundle
import WireFormat
#if canImport(Glibc)
import Glibc
#endif

/// A receiver's durable state in one directory (Specs/protocol.md §8):
///
/// - `bundle.partial`: the bundle file as it will be (header, envelope,
///   payload, auth chain at the offsets of Specs/bundle.md §3), filled block
///   by block as blocks verify; sparse until then.
/// - `journal`: the last progress journal, replaced atomically
///   (write `journal.tmp`, fsync, rename, fsync the directory).
/// - `bundle`: the complete bundle, renamed from `bundle.partial` at the end.
///
/// Blocks are made durable (fdatasync) before the journal that lists them,
/// so after a crash every listed block is on disk (P-20).
///
/// Given `payloadFile`, a manifest whose payload is to be kept as a file of its
/// own (Specs/protocol.md P-29a: the component file that the payload is, B-16a)
/// has its payload staged there instead, and `bundle.partial` keeps the header,
/// the envelope and the auth chain around a hole: every payload byte is written
/// once.
public final class StagingArea {
    public let directory: String
    public var partialPath: String { directory + "/bundle.partial" }
    public var journalPath: String { directory + "/journal" }
    public var bundlePath: String { directory + "/bundle" }
    private var fd: Int32 = -1
    public private(set) var header: BundleHeader?
    /// Where the payload of a manifest is staged on its own, if anywhere (P-29a).
    private let payloadFile: ((Manifest) -> String?)?
    /// The prepared session's payload file, when its payload is staged on its own.
    public private(set) var payloadPath: String?
    private var payloadFD: Int32 = -1
    /// Named limit: a journal file larger than this is refused as corrupt
    /// (the envelope's limit plus two bitmaps for the largest payload).
    public static let journalByteCountMax = BundleLimits.envelopeByteCountMax + 4 << 20

    /// `payloadFile` (P-29a) is for a `ReceiverDriver` that verifies during the transfer
    /// into the same output directory: that verification releases the file.
    public init(directory: String, payloadFile: ((Manifest) -> String?)? = nil) throws(TransportError) {
        self.directory = directory
        self.payloadFile = payloadFile
        if mkdir(directory, 0o700) != 0 && errno != EEXIST { throw .system(.storage, "create \(directory)", -errno) }
    }

    deinit { closeFiles() }

    private func closeFiles() {
        if fd >= 0 { close(fd); fd = -1 }
        if payloadFD >= 0 { close(payloadFD); payloadFD = -1 }
        header = nil
        payloadPath = nil
    }

    // MARK: Journal

    /// The journal, or nil with the reason it cannot be used.
    public func loadJournal() -> (ProgressJournal?, String?) {
        guard let bytes = readWhole(journalPath, limit: Self.journalByteCountMax) else { return (nil, nil) }
        do { return (try JournalCodec.decode(bytes), nil) } catch { return (nil, "journal unusable: \(error.reason)") }
    }

    /// Resume state for the core: the journal plus the auth-chain blocks it lists, read back.
    /// Nil (start afresh) if the partial file does not match the journal's envelope.
    public func resumeState(journal: ProgressJournal, manifest: Manifest) -> ResumeState? {
        let expected = BundleHeader(envelopeLength: journal.envelope.count, payloadLength: manifest.payload.size, authLength: manifest.authentication.size)
        guard (try? open(for: expected, envelope: journal.envelope, payloadPath: payloadFile?(manifest), create: false)) != nil else { return nil }
        let auth = BlockGeometry(payloadSize: manifest.authentication.size, profile: manifest.transport)
        var blocks: [Int: [UInt8]] = [:]
        for b in journal.authBlocks where b < auth.blockCount {
            let range = auth.byteRange(ofBlock: b)
            guard let bytes = try? read(at: expected.authOffset + range.lowerBound, count: range.count) else { return nil }
            blocks[b] = bytes
        }
        return ResumeState(progress: journal, authBlockBytes: blocks)
    }

    public func commit(_ journal: ProgressJournal) throws(TransportError) {
        guard fd >= 0 else { throw TransportError(.journal, "commit before the staging file was prepared") }
        guard fdatasync(fd) == 0 else { throw .system(.storage, "fdatasync \(partialPath)", -errno) }
        if payloadFD >= 0, let payloadPath { guard fdatasync(payloadFD) == 0 else { throw .system(.storage, "fdatasync \(payloadPath)", -errno) } }
        try writeAtomically(JournalCodec.encode(journal), to: journalPath)
    }

    // MARK: Bundle file

    /// Opens the staging file for a session's envelope: reuses a partial file
    /// whose header and envelope match, otherwise starts a new one.
    public func prepare(envelope: [UInt8], manifest: Manifest) throws(TransportError) {
        let h = BundleHeader(envelopeLength: envelope.count, payloadLength: manifest.payload.size, authLength: manifest.authentication.size)
        let separate = payloadFile?(manifest)
        if header == h, fd >= 0, payloadPath == separate { return }
        if (try? open(for: h, envelope: envelope, payloadPath: separate, create: false)) != nil { return }
        unlink(journalPath)
        try open(for: h, envelope: envelope, payloadPath: separate, create: true)
    }

    private func open(for h: BundleHeader, envelope: [UInt8], payloadPath separate: String?, create: Bool) throws(TransportError) {
        closeFiles()
        let flags = create ? (O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC) : (O_RDWR | O_CLOEXEC)
        let f = Glibc.open(partialPath, flags, 0o600)
        guard f >= 0 else { throw .system(.storage, "open \(partialPath)", -errno) }
        fd = f
        var p: Int32 = -1
        if let separate {
            p = Glibc.open(separate, flags, 0o600)
            guard p >= 0 else { closeFiles(); throw .system(.storage, "open \(separate)", -errno) }
            payloadFD = p
        }
        let prefix = h.encoded() + envelope
        if create {
            // Specs/protocol.md P-26a: reserve the whole file now, so that a disk too small
            // is known at join, not after minutes of transfer; a file system that cannot
            // reserve gets a sparse file of the right size instead. A payload staged on its
            // own (P-29a) is reserved in its file, and bundle.partial keeps a hole for it.
            var ranges: [(file: Int32, offset: UInt64, length: UInt64)] = []
            if separate == nil {
                ranges.append((f, 0, h.totalSize))
            } else {
                ranges.append((f, 0, h.payloadOffset))
                ranges.append((f, h.authOffset, UInt64(h.authLength)))
                ranges.append((p, 0, UInt64(h.payloadLength)))
            }
            for (file, offset, length) in ranges where length > 0 {
                let rc = posix_fallocate(file, off_t(offset), off_t(length))
                if rc == ENOSPC || rc == EFBIG {
                    closeFiles()
                    let place = file == p ? "for its \(h.payloadLength)-byte payload in \(separate!)" : "in \(directory)"
                    throw .system(.storage, "no room for the \(h.totalSize)-byte bundle \(place)", -rc)
                }
            }
            guard ftruncate(f, off_t(h.totalSize)) == 0 else { closeFiles(); throw .system(.storage, "allocate \(partialPath)", -errno) }
            if p >= 0 { guard ftruncate(p, off_t(h.payloadLength)) == 0 else { closeFiles(); throw .system(.storage, "allocate \(separate!)", -errno) } }
            header = h
            payloadPath = separate
            try write(prefix, at: 0)
        } else {
            var st = stat()
            var payloadStat = stat()
            guard fstat(f, &st) == 0, UInt64(st.st_size) == h.totalSize, (try? read(at: 0, count: prefix.count)) == prefix,
                  p < 0 || (fstat(p, &payloadStat) == 0 && UInt64(payloadStat.st_size) == h.payloadLength) else {
                closeFiles()
                throw TransportError(.storage, "\(partialPath) belongs to another bundle")
            }
            header = h
            payloadPath = separate
        }
    }

    /// Writes a verified block (Specs/protocol.md P-20: only verified bytes reach staging).
    public func store(_ object: ObjectID, offset: UInt64, bytes: [UInt8]) throws(TransportError) {
        guard let h = header else { throw TransportError(.storage, "store before the staging file was prepared") }
        let limit = object == .payload ? h.payloadLength : h.authLength
        guard offset + UInt64(bytes.count) <= limit else { throw TransportError(.storage, "block beyond the end of the \(object)") }
        let place = object == .payload ? payloadPlace(h) : (fd: fd, path: partialPath, base: h.authOffset)
        try write(bytes, at: place.base + offset, to: place.fd, path: place.path)
    }

    /// Reads back `count` payload bytes from `offset` (a staged block).
    public func readPayload(offset: UInt64, count: Int) throws(TransportError) -> [UInt8] {
        guard let h = header else { throw TransportError(.storage, "read before the staging file was prepared") }
        guard offset + UInt64(count) <= h.payloadLength else { throw TransportError(.storage, "read beyond the end of the payload") }
        let place = payloadPlace(h)
        return try read(at: place.base + offset, count: count, from: place.fd, path: place.path)
    }

    /// Where payload byte 0 lies: its own file (P-29a), or bundle.partial at the payload offset.
    private func payloadPlace(_ h: BundleHeader) -> (fd: Int32, path: String, base: UInt64) {
        if payloadFD >= 0, let payloadPath { return (payloadFD, payloadPath, 0) }
        return (fd, partialPath, h.payloadOffset)
    }

    /// What `finish()` leaves: the bundle, or (P-29a) the payload in a file of its own.
    public enum Staged: Sendable {
        case bundle(String)
        case payload(String)
    }

    /// Makes the complete file durable and renames it to `bundle`; or, when the payload
    /// was staged on its own (P-29a), makes that file durable and removes the rest
    /// (bundle.partial has a hole where the payload would be: it is no bundle).
    public func finish() throws(TransportError) -> Staged {
        guard fd >= 0 else { throw TransportError(.storage, "nothing staged") }
        if payloadFD >= 0, let payload = payloadPath {
            guard fsync(payloadFD) == 0 else { throw .system(.storage, "fsync \(payload)", -errno) }
            closeFiles()
            unlink(journalPath)
            unlink(partialPath)
            syncDirectory()
            return .payload(payload)
        }
        guard fsync(fd) == 0 else { throw .system(.storage, "fsync \(partialPath)", -errno) }
        closeFiles()
        guard rename(partialPath, bundlePath) == 0 else { throw .system(.storage, "rename to \(bundlePath)", -errno) }
        syncDirectory()
        unlink(journalPath)
        syncDirectory()
        return .bundle(bundlePath)
    }

    // MARK: I/O helpers

    /// Writes to bundle.partial unless told another file (the payload's, P-29a).
    private func write(_ bytes: [UInt8], at offset: UInt64, to f: Int32? = nil, path: String? = nil) throws(TransportError) {
        let rc = bytes.withUnsafeBytes { pwriteFully(f ?? fd, $0, at: offset) }
        guard rc == 0 else { throw .system(.storage, "write \(path ?? partialPath)", rc) }
    }

    private func read(at offset: UInt64, count: Int, from f: Int32? = nil, path: String? = nil) throws(TransportError) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        let rc = out.withUnsafeMutableBytes { preadFully(f ?? fd, $0, at: offset) }
        guard rc == 0 else { throw .system(.storage, "read \(path ?? partialPath)", rc) }
        return out
    }

    private func writeAtomically(_ bytes: [UInt8], to path: String) throws(TransportError) {
        let temporary = path + ".tmp"
        let f = Glibc.open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard f >= 0 else { throw .system(.journal, "create \(temporary)", -errno) }
        defer { close(f) }
        let rc = bytes.withUnsafeBytes { pwriteFully(f, $0, at: 0) }
        guard rc == 0 else { throw .system(.journal, "write \(temporary)", rc) }
        guard fsync(f) == 0 else { throw .system(.journal, "fsync \(temporary)", -errno) }
        guard rename(temporary, path) == 0 else { throw .system(.journal, "rename \(temporary)", -errno) }
        syncDirectory()
    }

    private func syncDirectory() {
        let d = Glibc.open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if d >= 0 { fsync(d); close(d) }
    }

    private func readWhole(_ path: String, limit: Int) -> [UInt8]? {
        let f = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard f >= 0 else { return nil }
        defer { close(f) }
        var st = stat()
        guard fstat(f, &st) == 0, st.st_size <= limit else { return nil }
        var out = [UInt8](repeating: 0, count: Int(st.st_size))
        let n = out.withUnsafeMutableBytes { Glibc.read(f, $0.baseAddress!, $0.count) }
        return n == out.count ? out : nil
    }
}

/// Verified segments that left the receiver's memory are read back from the staged
/// auth chain (Specs/protocol.md P-5c); the core hashes them again.
extension StagingArea: AuthChainReader {
    public func readAuthChain(offset: UInt64, count: Int) -> [UInt8]? {
        guard let h = header, offset + UInt64(count) <= UInt64(h.authLength) else { return nil }
        return try? read(at: h.authOffset + offset, count: count)
    }
}

/// The journal's bytes (Specs/protocol.md §8.2): magic "FCJ1", the envelope,
/// two block bitmaps (auth chain, payload), and a SHA-256 of all before it.
public enum JournalCodec {
    static let magic: [UInt8] = Array("FCJ1".utf8)

    public static func encode(_ j: ProgressJournal) -> [UInt8] {
        var w = ByteWriter()
        w.append(magic)
        w.u32(UInt32(j.envelope.count))
        w.append(j.envelope)
        for list in [j.authBlocks, j.payloadBlocks] {
            let count = (list.max() ?? -1) + 1
            var bitmap = [UInt8](repeating: 0, count: (count + 7) / 8)
            for b in list { bitmap[b / 8] |= 1 << (b % 8) }
            w.u32(UInt32(count))
            w.append(bitmap)
        }
        let body = w.bytes
        return body + SHA256.hash(body)
    }

    public static func decode(_ bytes: [UInt8]) throws(WireFormatError) -> ProgressJournal {
        guard bytes.count >= 4 + 4 + 8 + 32 else { throw WireFormatError(.truncated, "journal of \(bytes.count) bytes") }
        let body = Array(bytes.dropLast(32))
        guard SHA256.hash(body) == Array(bytes.suffix(32)) else { throw WireFormatError(.invalidField, "journal checksum differs (torn or corrupted)") }
        var r = ByteReader(body)
        guard try r.bytes(4, "journal magic") == magic else { throw WireFormatError(.invalidField, "not a Fleetcast journal") }
        let envelopeLength = Int(try r.u32("envelope length"))
        guard envelopeLength <= BundleLimits.envelopeByteCountMax else { throw WireFormatError(.invalidField, "journal envelope of \(envelopeLength) bytes") }
        let envelope = try r.bytes(envelopeLength, "envelope")
        var lists: [[Int]] = []
        for _ in 0..<2 {
            let count = Int(try r.u32("block count"))
            let bitmap = try r.bytes((count + 7) / 8, "block bitmap")
            lists.append((0..<count).filter { bitmap[$0 / 8] & (1 << ($0 % 8)) != 0 })
        }
        try r.end()
        return ProgressJournal(envelope: envelope, authBlocks: lists[0], payloadBlocks: lists[1])
    }
}

/// The receiver's spill (Specs/protocol.md P-5a): a sparse scratch file in the
/// staging directory, unlinked at once, so nothing is left behind. Symbol
/// (object, block, index) lives at byte ((block x 256 + index) x T), plus
/// 2^40 for the payload object: a block's symbols are contiguous (an evicted
/// block is one write, a reload one read), no layout is needed, and the gaps
/// between blocks take no disk space.
public final class FileSpill: SymbolSpill {
    private let fd: Int32
    /// The first write error; the driver aborts the session with reason `storage`.
    public private(set) var failure: TransportError?

    public init(directory: String) throws(TransportError) {
        var template = Array((directory + "/.symbols-XXXXXX").utf8CString)
        let f = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        guard f >= 0 else { throw .system(.storage, "create a spill file in \(directory)", -errno) }
        template.withUnsafeBufferPointer { _ = unlink($0.baseAddress!) }
        fd = f
    }

    deinit { close(fd) }

    private func offset(_ object: ObjectID, _ block: Int, _ index: Int, _ size: Int) -> UInt64 {
        (object == .payload ? 1 << 40 : 0) + UInt64(block * BundleLimits.symbolIndexCountMax + index) * UInt64(size)
    }

    public func write(object: ObjectID, block: Int, index: Int, symbolSize: Int, bytes: UnsafeRawBufferPointer) {
        let rc = pwriteFully(fd, bytes, at: offset(object, block, index, symbolSize))
        if rc != 0 && failure == nil { failure = .system(.storage, "write the spill file", rc) }
    }

    public func read(object: ObjectID, block: Int, index: Int, symbolSize: Int, into buffer: UnsafeMutableRawBufferPointer) {
        // A short read leaves zeros: the block then fails its hash and is fetched again (B-14).
        let n = pread(fd, buffer.baseAddress, buffer.count, off_t(offset(object, block, index, symbolSize)))
        if n < buffer.count { buffer.baseAddress!.advanced(by: max(n, 0)).initializeMemory(as: UInt8.self, repeating: 0, count: buffer.count - max(n, 0)) }
    }
}
