import DeliveryCore
import FleetCrypto
import UpdateBundle
import WireFormat
#if canImport(Glibc)
import Glibc
#endif

/// A receiver's durable state in one directory (Specs/protocol.md §8.2):
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
/// Given a payload file name (Specs/protocol.md P-29a: the component file that
/// the payload is, B-16a), the payload is staged there, in the output directory,
/// and `bundle.partial` keeps the header, the envelope and the auth chain around
/// a hole: every payload byte is written once.
///
/// Given a device agent's spare slot (P-29b: a lone plain component is the payload
/// and goes to that slot), the payload is staged in the slot itself, written in
/// place, and staging holds no copy of the image at all.
///
/// Every file is reached under the directory's descriptor and never through a
/// link (P-26b); the staging directory must be this user's and not writable by
/// others, since what it holds is trusted once verified.
public final class StagingArea {
    /// Where the payload is staged when it is not inside `bundle.partial`.
    public enum PayloadPlace {
        /// Specs/protocol.md P-29a: the component file to be, `<name>.partial` in the
        /// output directory, created and reserved here and renamed at the release.
        case outputFile(SafeDirectory, String)
        /// Specs/protocol.md P-29b: a device agent's spare slot, which exists and whose
        /// size is its capacity; written in place, never created, truncated or removed.
        case slot(File, path: String)

        var path: String {
            switch self {
            case .outputFile(let dir, let name): dir.file(name)
            case .slot(_, let path): path
            }
        }
    }

    /// The staging directory, held open.
    public let directory: SafeDirectory
    static let partialName = "bundle.partial", journalName = "journal", bundleName = "bundle"
    /// `<staging>/bundle.partial`: the bundle as it arrives.
    public var partialPath: String { directory.file(Self.partialName) }
    /// `<staging>/bundle`: the complete bundle, once renamed.
    public var bundlePath: String { directory.file(Self.bundleName) }
    private var file: File?
    /// The prepared bundle's header, once `prepare` has run.
    public private(set) var header: BundleHeader?
    /// The envelope `file` was prepared for (a header only gives sizes).
    private var envelope: [UInt8]?
    /// The prepared session's payload file (P-29a, P-29b), and where it is.
    private var payload: (place: PayloadPlace, file: File)?
    /// Named limit: a journal file larger than this is refused as corrupt
    /// (the envelope's limit plus two bitmaps for the largest payload).
    public static let journalByteCountMax = BundleLimits.envelopeByteCountMax + 4 << 20

    /// Opens (creating, mode 0700) the staging directory; refuses one that another
    /// user owns or may write.
    public init(directory path: String) throws(StorageError) {
        do { directory = try SafeDirectory(path: path, create: 0o700, requirePrivate: true) } catch { throw StorageError(error.reason) }
    }

    /// This device's receiver ID (Specs/protocol.md §3.5): random, made once and kept
    /// in the staging directory, so that two devices never share one by their names
    /// and a restarted receiver is the same device to the sender.
    public func receiverID() throws(StorageError) -> ReceiverID {
        let name = "receiver-id"
        if let bytes = directory.readWhole(name, limit: 64), let text = String(validating: bytes, as: UTF8.self),
           let id = UInt64(text.trimmingCharacters(in: " \n"), radix: 16), id != 0 {
            return ReceiverID(id)
        }
        var id: UInt64 = 0
        do { id = UInt64(bytes: try SecureRandom.bytes(8)) | 1 } catch { throw StorageError("no randomness for a receiver ID: \(error)") }
        do { try directory.writeAtomically(Array((String(id, radix: 16) + "\n").utf8), to: name) } catch { throw StorageError(error.reason) }
        return ReceiverID(id)
    }

    /// The payload file of the prepared session, if it is staged on its own (P-29a, P-29b).
    public var payloadPath: String? { payload?.place.path }
    /// Where the prepared session's payload is staged, if on its own.
    public var payloadPlace: PayloadPlace? { payload?.place }

    private func closeFiles() {
        file = nil
        payload = nil
        header = nil
        envelope = nil
    }

    // MARK: Journal

    /// The journal and whether it staged the payload in a file of its own (P-29a, P-29b);
    /// nil with the reason when it cannot be used, nil without one when there is none.
    public func loadJournal() -> (journal: (ProgressJournal, payloadApart: Bool)?, note: String?) {
        guard let bytes = directory.readWhole(Self.journalName, limit: Self.journalByteCountMax) else { return (nil, nil) }
        do { return (try JournalCodec.decode(bytes), nil) } catch { return (nil, "journal unusable: \(error.reason)") }
    }

    /// Resume state for the core: the journal plus the auth-chain blocks it lists, read back.
    /// Nil (start afresh) if the payload was staged elsewhere than `payloadFile` says now,
    /// or the partial files do not match the journal's envelope.
    public func resumeState(journal: ProgressJournal, payloadApart: Bool, manifest: Manifest, payloadFile: PayloadPlace?) -> ResumeState? {
        guard payloadApart == (payloadFile != nil) else { return nil }
        let expected = BundleHeader(envelopeLength: journal.envelope.count, payloadLength: manifest.payload.size, authLength: manifest.authentication.size)
        guard (try? open(for: expected, envelope: journal.envelope, payloadFile: payloadFile, create: false)) != nil, let file else { return nil }
        let auth = BlockGeometry(payloadSize: manifest.authentication.size, profile: manifest.transport)
        var blocks: [Int: [UInt8]] = [:]
        for b in journal.authBlocks where b < auth.blockCount {
            let range = auth.byteRange(ofBlock: b)
            guard let bytes = try? file.read(at: expected.authOffset + range.lowerBound, count: range.count) else { return nil }
            blocks[b] = bytes
        }
        return ResumeState(progress: journal, authBlockBytes: blocks)
    }

    /// Specs/protocol.md P-26: stored bytes made durable, then the journal replaced atomically.
    public func commit(_ journal: ProgressJournal) throws(StorageError) {
        guard let file else { throw StorageError("commit before the staging file was prepared") }
        do {
            try file.syncData()
            try payload?.file.syncData()
            try directory.writeAtomically(JournalCodec.encode(journal, payloadApart: payload != nil), to: Self.journalName)
        } catch { throw StorageError(error.reason) }
    }

    // MARK: Bundle file

    /// Opens the staging files for a session's envelope: reuses partial files whose
    /// header and envelope match (true), otherwise starts new ones, reserved (P-26a),
    /// and removes the journal that described the old ones (false).
    /// `reservesPayload` false (P-29c: a payload staged through a window) reserves
    /// the header, the envelope and the auth chain only, and leaves the payload's
    /// range sparse: blocks take space as they come and give it back when released.
    @discardableResult
    public func prepare(envelope: [UInt8], manifest: Manifest, payloadFile: PayloadPlace?, reservesPayload: Bool = true) throws(StorageError) -> Bool {
        let h = BundleHeader(envelopeLength: envelope.count, payloadLength: manifest.payload.size, authLength: manifest.authentication.size)
        if header == h, self.envelope == envelope, file != nil, payload?.place.path == payloadFile?.path { return try reserveReused(reservesPayload) }
        if (try? open(for: h, envelope: envelope, payloadFile: payloadFile, create: false)) != nil { return try reserveReused(reservesPayload) }
        directory.remove(Self.journalName)
        do { try open(for: h, envelope: envelope, payloadFile: payloadFile, create: true, reservesPayload: reservesPayload) } catch {
            // A failed reservation leaves no partial file behind to hold the space.
            directory.remove(Self.partialName)
            if case .outputFile(let dir, let name)? = payloadFile { dir.remove(name) }
            throw StorageError(error.reason)
        }
        return false
    }

    /// A reused bundle.partial may have been left sparse by a windowed session (P-29c):
    /// one that stages its payload whole reserves the payload's range now (P-26a).
    private func reserveReused(_ reservesPayload: Bool) throws(StorageError) -> Bool {
        guard reservesPayload, payload == nil, let h = header, let file else { return true }
        do { _ = try file.reserve(offset: h.payloadOffset, length: UInt64(h.payloadLength), what: "for the \(h.totalSize)-byte bundle in \(directory.path)") }
        catch { throw StorageError(error.reason) }
        return true
    }

    /// Bytes the files `prepare` would replace hold on disk now (a stale download's
    /// reservation): free space a new bundle may count on, in the staging directory
    /// and (the payload file) in the output directory.
    public func reclaimableBytes(payloadFile: PayloadPlace?) -> (staging: UInt64, output: UInt64) {
        guard case .outputFile(let dir, let name)? = payloadFile else { return (directory.allocatedBytes(Self.partialName), 0) }
        return (directory.allocatedBytes(Self.partialName), dir.allocatedBytes(name))
    }

    private func open(for h: BundleHeader, envelope: [UInt8], payloadFile: PayloadPlace?, create: Bool, reservesPayload: Bool = true) throws(BundleError) {
        closeFiles()
        let f = create ? try directory.createExclusive(Self.partialName, mode: 0o600, readable: true) : try directory.open(Self.partialName, writable: true)
        var p: File?
        switch payloadFile {
        case .outputFile(let dir, let name)?:
            p = create ? try dir.createExclusive(name, mode: 0o600, readable: true) : try dir.open(name, writable: true)
        case .slot(let slot, let path)?:
            // P-29b: the slot is what it is; it must hold the payload.
            let capacity = try slot.extent().size
            guard capacity >= UInt64(h.payloadLength) else {
                throw BundleError(.io, "slot \(path) (\(capacity) bytes) cannot stage the \(h.payloadLength)-byte payload")
            }
            p = slot
        case nil: break
        }
        let prefix = h.encoded() + envelope
        if create {
            // Specs/protocol.md P-26a: reserve the whole file now, so that a disk too small
            // is known at join, not after minutes of transfer; a file system that cannot
            // reserve gets a sparse file of the right size instead. A payload staged on its
            // own (P-29a) is reserved in its file, and bundle.partial keeps a hole for it.
            let total = "for the \(h.totalSize)-byte bundle"
            if payloadFile == nil && !reservesPayload {
                _ = try f.reserve(offset: 0, length: h.payloadOffset, what: "\(total) in \(directory.path)")
                _ = try f.reserve(offset: h.authOffset, length: UInt64(h.authLength), what: "\(total) in \(directory.path)")
            } else if let p, let place = payloadFile {
                _ = try f.reserve(offset: 0, length: h.payloadOffset, what: "\(total) in \(directory.path)")
                _ = try f.reserve(offset: h.authOffset, length: UInt64(h.authLength), what: "\(total) in \(directory.path)")
                if case .outputFile = place {
                    _ = try p.reserve(offset: 0, length: UInt64(h.payloadLength), what: "\(total) for its \(h.payloadLength)-byte payload in \(place.path)")
                    try p.truncate(to: UInt64(h.payloadLength))
                }
            } else {
                _ = try f.reserve(offset: 0, length: h.totalSize, what: "\(total) in \(directory.path)")
            }
            try f.truncate(to: h.totalSize)
            try f.write(prefix, at: 0)
        } else {
            let payloadFits: Bool
            switch payloadFile {
            case .outputFile?: payloadFits = try p!.size == UInt64(h.payloadLength)
            case .slot?, nil: payloadFits = true  // a slot's size was checked above
            }
            guard try f.size == h.totalSize, (try? f.read(at: 0, count: prefix.count)) == prefix, payloadFits else {
                throw BundleError(.io, "\(partialPath) belongs to another bundle")
            }
        }
        file = f
        header = h
        self.envelope = envelope
        if let p, let payloadFile { payload = (payloadFile, p) }
    }

    /// Writes a verified block (Specs/protocol.md P-20: only verified bytes reach staging).
    public func store(_ object: ObjectID, offset: UInt64, bytes: [UInt8]) throws(StorageError) {
        guard let h = header, let file else { throw StorageError("store before the staging file was prepared") }
        let limit = object == .payload ? h.payloadLength : h.authLength
        guard offset + UInt64(bytes.count) <= limit else { throw StorageError("block beyond the end of the \(object)") }
        let (target, base) = object == .payload ? payloadPlace(h, file) : (file, h.authOffset)
        do { try target.write(bytes, at: base + offset) } catch { throw StorageError(error.reason) }
    }

    /// Reads back `count` payload bytes from `offset` (a staged block).
    public func readPayload(offset: UInt64, count: Int) throws(StorageError) -> [UInt8] {
        guard let h = header, let file else { throw StorageError("read before the staging file was prepared") }
        guard offset + UInt64(count) <= h.payloadLength else { throw StorageError("read beyond the end of the payload") }
        let (source, base) = payloadPlace(h, file)
        do { return try source.read(at: base + offset, count: count) } catch { throw StorageError(error.reason) }
    }

    /// Specs/protocol.md P-29c: frees the staged payload bytes `[offset, offset +
    /// count)`, which step 2 has consumed and no durable journal lists any more.
    /// Only a payload staged in bundle.partial. False where the file system cannot
    /// punch holes (the bytes then stay).
    @discardableResult
    public func releasePayload(offset: UInt64, count: UInt64) -> Bool {
        guard payload == nil, let h = header, let file, offset + count <= h.payloadLength else { return false }
        return file.releaseSpace(offset: h.payloadOffset + offset, length: count)
    }

    /// Bytes bundle.partial holds on disk now (P-29c's window, measured).
    public var partialAllocatedBytes: UInt64 { directory.allocatedBytes(Self.partialName) }

    /// Where payload byte 0 lies: its own file (P-29a), or bundle.partial at the payload offset.
    private func payloadPlace(_ h: BundleHeader, _ file: File) -> (File, UInt64) {
        if let payload { return (payload.file, 0) }
        return (file, h.payloadOffset)
    }

    /// What `finish()` leaves: the bundle, or the payload in a file of its own (P-29a),
    /// or in the slot it was staged in (P-29b), or nothing: the payload went to step 2
    /// through a window and its staging was freed (P-29c).
    public enum Staged: Sendable {
        case bundle(String)
        case payload(String)
        case slot(String)
        case released
    }

    /// Makes the complete file durable and renames it to `bundle`; or, when the payload
    /// was staged on its own (P-29a), makes that file durable and removes the rest
    /// (bundle.partial has a hole where the payload would be: it is no bundle). With
    /// `payloadReleased` (P-29c: holes where step 2 consumed), bundle.partial is no
    /// bundle either and goes.
    public func finish(payloadReleased: Bool = false) throws(StorageError) -> Staged {
        guard let file else { throw StorageError("nothing staged") }
        do {
            if payloadReleased && payload == nil {
                closeFiles()
                directory.remove(Self.journalName)
                directory.remove(Self.partialName)
                try directory.sync()
                return .released
            }
            if let payload {
                try payload.file.sync()
                let place = payload.place
                closeFiles()
                directory.remove(Self.journalName)
                directory.remove(Self.partialName)
                try directory.sync()
                if case .slot(_, let path) = place { return .slot(path) }
                return .payload(place.path)
            }
            try file.sync()
            closeFiles()
            try directory.rename(Self.partialName, to: Self.bundleName)
            directory.remove(Self.journalName)
            try directory.sync()
            return .bundle(bundlePath)
        } catch { throw StorageError(error.reason) }
    }
}

/// Verified segments that left the receiver's memory are read back from the staged
/// auth chain (Specs/protocol.md P-5c); the core hashes them again.
extension StagingArea: AuthChainReader {
    /// Staged auth-chain bytes, or nil when they cannot be read.
    public func readAuthChain(offset: UInt64, count: Int) -> [UInt8]? {
        guard let h = header, let file, offset + UInt64(count) <= UInt64(h.authLength) else { return nil }
        return try? file.read(at: h.authOffset + offset, count: count)
    }
}

/// The journal's bytes (Specs/protocol.md §8.2): magic "FCJ2", where the payload
/// is staged (flags: bit 0 = in its own file, P-29a), the envelope, two block
/// bitmaps (auth chain, payload), and a SHA-256 of all before it.
public enum JournalCodec {
    static let magic: [UInt8] = Array("FCJ2".utf8)

    /// The journal's bytes, checksum last.
    public static func encode(_ j: ProgressJournal, payloadApart: Bool) -> [UInt8] {
        var w = ByteWriter()
        w.append(magic)
        w.u8(payloadApart ? 1 : 0)
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

    /// A journal from untrusted bytes: checked whole, or refused.
    public static func decode(_ bytes: [UInt8]) throws(WireFormatError) -> (ProgressJournal, payloadApart: Bool) {
        guard bytes.count >= 4 + 1 + 4 + 8 + 32 else { throw WireFormatError(.truncated, "journal of \(bytes.count) bytes") }
        let body = Array(bytes.dropLast(32))
        guard SHA256.hash(body) == Array(bytes.suffix(32)) else { throw WireFormatError(.invalidField, "journal checksum differs (torn or corrupted)") }
        var r = ByteReader(body)
        guard try r.bytes(4, "journal magic") == magic else { throw WireFormatError(.invalidField, "not a Fleetcast journal of this version") }
        let flags = try r.u8("journal flags")
        guard flags & ~1 == 0 else { throw WireFormatError(.reservedNotZero, "journal flags \(flags)") }
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
        return (ProgressJournal(envelope: envelope, authBlocks: lists[0], payloadBlocks: lists[1]), flags & 1 != 0)
    }
}

/// The receiver's spill (Specs/protocol.md P-5a): a sparse scratch file in the
/// staging directory, unlinked at once, so nothing is left behind. Symbol
/// (object, block, index) lives at byte ((block x 256 + index) x T), plus
/// 2^40 for the payload object: a block's symbols are contiguous (an evicted
/// block is one write, a reload one read), no layout is needed, and the gaps
/// between blocks take no disk space.
public final class FileSpill: SymbolSpill {
    private let file: File

    /// A fresh scratch file in `directory`, already unlinked.
    public init(directory: SafeDirectory) throws(StorageError) {
        do { file = try directory.scratch("symbols") } catch { throw StorageError(error.reason) }
    }

    private func offset(_ object: ObjectID, _ block: Int, _ index: Int, _ size: Int) -> UInt64 {
        (object == .payload ? 1 << 40 : 0) + UInt64(block * BundleLimits.symbolIndexCountMax + index) * UInt64(size)
    }

    /// Stores symbols at their slots.
    public func write(object: ObjectID, block: Int, index: Int, symbolSize: Int, bytes: UnsafeRawBufferPointer) throws(StorageError) {
        do { try file.write(bytes, at: offset(object, block, index, symbolSize)) } catch { throw StorageError("write the spill file: \(error.reason)") }
    }

    /// Frees the block's slots (a hole again): over a long transfer the spill would
    /// otherwise keep every block that ever went there.
    public func release(object: ObjectID, block: Int, symbolSize: Int) {
        file.releaseSpace(offset: offset(object, block, 0, symbolSize), length: UInt64(BundleLimits.symbolIndexCountMax * symbolSize))
    }

    /// Reads symbols back from their slots.
    public func read(object: ObjectID, block: Int, index: Int, symbolSize: Int, into buffer: UnsafeMutableRawBufferPointer) throws(StorageError) {
        // Slots never written read as zeros: a sparse file's holes, or past its end.
        let at = offset(object, block, index, symbolSize)
        let n = pread(file.fd, buffer.baseAddress, buffer.count, off_t(at))
        if n < 0 { throw StorageError("read the spill file: \(String(cString: strerror(errno)))") }
        if n < buffer.count { buffer.baseAddress!.advanced(by: n).initializeMemory(as: UInt8.self, repeating: 0, count: buffer.count - n) }
    }
}

fileprivate extension UInt64 {
    /// The first 8 bytes, big-endian.
    init(bytes b: [UInt8]) { self = b.prefix(8).reduce(0) { $0 << 8 | UInt64($1) } }
}

fileprivate extension String {
    /// Without leading and trailing characters of `set`.
    func trimmingCharacters(in set: String) -> String {
        let chars = Set(set)
        return String(drop { chars.contains($0) }.reversed().drop { chars.contains($0) }.reversed())
    }
}
