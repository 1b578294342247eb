import BundleFormat
import FleetCrypto
import WireFormat

/// Reads back auth-chain bytes that the receiver handed to storage in `.store`
/// actions, so that verified segments can leave memory (Specs/protocol.md P-5c).
/// Nil for bytes it cannot read.
public protocol AuthChainReader: AnyObject {
    func readAuthChain(offset: UInt64, count: Int) -> [UInt8]?
}

/// The authentication chain of one session (Specs/protocol.md P-16, P-5b, P-5c;
/// Specs/bundle.md §7.3): the auth-chain object's blocks as they decode, the
/// segments they verify in order from the manifest's head, the tags those
/// segments hold for checking payload symbols on arrival, and the chain tags
/// that check the next segment's own symbols on arrival (B-13a).
struct SegmentStore {
    let layout: AuthChainLayout
    /// The auth-chain object (object 1), assembled like the payload.
    var auth: ObjectState
    /// Decoded auth-chain blocks not yet wholly behind the verified part of the chain.
    private var authBytes: [Int: [UInt8]] = [:]
    private(set) var segments: [Int: AuthSegment] = [:]
    /// The next segment to verify, and the hash it must have.
    private(set) var nextSegment = 0
    private var expectedSegmentHash: [UInt8]
    /// The chain tags of `nextSegment`'s auth-chain symbols (B-13a): the manifest's for
    /// segment 0, then those the last verified segment carries. Nil once all verified.
    private var nextSegmentTags: ChainTags?
    /// A segment verified since the driver last looked: held payload symbols can be checked.
    var segmentsAdvanced = false
    /// Auth blocks whose every segment verified, not yet handed to storage, with their bytes.
    private var verifiedAuthBlocks: [(Int, [UInt8])] = []
    private var authBlocksEmitted = Set<Int>()
    /// Auth blocks whose `.store` the driver reported done (P-5c).
    private var authBlocksStored = Set<Int>()
    /// P-5c: bytes of `segments`, the segments that left memory, the hash each had when it
    /// verified (to check a reload), and when each was last used (least recently used leaves).
    private var segmentBytesHeld = 0
    private var evictedSegments = Set<Int>()
    private var segmentHashes: [Int: [UInt8]] = [:]
    private var segmentUse: [Int: UInt64] = [:]
    private var useClock: UInt64 = 0
    private var lastUsedSegment = -1

    init(manifest m: Manifest) {
        let payloadGeometry = BlockGeometry(payloadSize: m.payload.size, profile: m.transport)
        layout = AuthChainLayout(geometry: payloadGeometry, blocksPerSegment: m.authentication.blocksPerSegment)
        auth = ObjectState(layout: ObjectLayout(object: .authChain, size: m.authentication.size, profile: m.transport))
        expectedSegmentHash = m.authentication.head
        nextSegmentTags = ChainTags(segment: 0, tags: m.authentication.firstTags[...], layout: layout)
    }

    var segmentsHeld: Int { segments.count }
    /// Every auth-chain block handed to storage, for the journal.
    var emittedBlocks: [Int] { authBlocksEmitted.sorted() }
    var isComplete: Bool { nextSegment >= layout.segmentCount }

    mutating func markAuthBlock(_ b: Int, bytes: [UInt8]) {
        auth.markDone(b)
        authBytes[b] = bytes
    }

    mutating func markStored(_ b: Int) { authBlocksStored.insert(b) }

    /// The verified blocks to hand to storage now (each once).
    mutating func takeVerifiedBlocks() -> [(Int, [UInt8])] {
        defer { verifiedAuthBlocks.removeAll() }
        return verifiedAuthBlocks
    }

    /// At resume: the blocks verified from the journal are in storage already.
    mutating func forgetVerifiedBlocks() { verifiedAuthBlocks.removeAll() }

    private func byteRange(ofSegment j: Int) -> Range<UInt64> {
        layout.segmentOffset(j)..<(layout.segmentOffset(j) + UInt64(layout.segmentSize(j)))
    }

    // MARK: Checking symbols

    /// Whether a symbol's tag matches its authenticated record (Specs/protocol.md P-5;
    /// Specs/bundle.md B-13a for auth-chain symbols); nil while the segment holding that
    /// record, or the segment before an auth-chain symbol's, is not authenticated yet.
    ///
    /// A released segment's blocks are all done: their symbols pass here and are
    /// dropped as symbols of a done block (the data path drops them before asking).
    func tagMatches(_ d: DataSymbol) -> Bool? {
        let b = Int(d.block), i = Int(d.symbolIndex)
        if d.object == .authChain {
            let j = layout.segment(ofAuthBlock: b)
            // A verified segment's blocks are all done: the symbol is dropped as one of a done block.
            if j < nextSegment { return true }
            guard j == nextSegment, let tags = nextSegmentTags else { return nil }
            let tag = d.symbol.withUnsafeBytes { BlockAuthentication.tag(.authChain, block: b, symbol: i, bytes: $0) }
            return tag[...] == tags.tag(authBlock: b, symbol: i)
        }
        let j = b / layout.blocksPerSegment
        // A segment that left memory (P-5c) must be read back first: unknown until then.
        guard let segment = segments[j] else { return j < nextSegment && !evictedSegments.contains(j) ? true : nil }
        let tag = d.symbol.withUnsafeBytes { BlockAuthentication.tag(block: b, symbol: i, bytes: $0) }
        return tag[...] == segment.tag(block: b, symbol: i)
    }

    /// The verified segment holding block b's record; it must be in memory.
    func segment(containing b: Int) -> AuthSegment {
        let j = b / layout.blocksPerSegment
        precondition(j < nextSegment, "a payload block decodes only once its segment verified")
        return segments[j]!
    }

    /// A payload block whose segment is not authenticated yet: its symbols cannot be checked (P-16b).
    func awaitsSegment(_ object: ObjectID, _ b: Int) -> Bool {
        object == .payload && b / layout.blocksPerSegment >= nextSegment
    }

    /// The segment whose span holds auth-chain block m.
    func segment(ofAuthBlock m: Int) -> Int { layout.segment(ofAuthBlock: m) }

    // MARK: Verifying segments

    /// Specs/protocol.md P-16, Specs/bundle.md B-13: authenticate segments in order.
    mutating func advanceSegments(payloadDone: [Bool], stats: inout ReceiverStats) {
        while nextSegment < layout.segmentCount {
            let j = nextSegment
            let blocks = layout.authBlocks(inSegment: j)
            guard blocks.allSatisfy({ auth.done[$0] && authBytes[$0] != nil }) else { return }
            let bytes = blocks.reduce(into: [UInt8]()) { $0 += authBytes[$1]! }
            // Every symbol matched its chain tag on arrival (B-13a), so this holds unless the
            // bundle is wrong; checked all the same, as B-13 says.
            guard bytes.count == layout.segmentSize(j), SHA256.hash(bytes) == expectedSegmentHash,
                  let segment = try? AuthSegment(parsing: bytes, index: j, layout: layout) else {
                stats.segmentFailures += 1
                for b in blocks { auth.clear(b); authBytes[b] = nil }
                return
            }
            precondition(segment.blocks == layout.blocks(inSegment: j), "a verified segment covers its own blocks")
            segments[j] = segment
            segmentBytesHeld += bytes.count
            segmentHashes[j] = expectedSegmentHash
            expectedSegmentHash = segment.nextHash
            nextSegment += 1
            nextSegmentTags = nextSegment < layout.segmentCount ? ChainTags(segment: nextSegment, tags: Array(segment.nextTags)[...], layout: layout) : nil
            if !payloadDone.isEmpty { releaseSegmentIfDone(containing: layout.blocks(inSegment: j).lowerBound, payloadDone: payloadDone) }
            segmentsAdvanced = true
            emitWhollyVerifiedBlocks(blocks)
            stats.segmentsVerified += 1
        }
    }

    /// A verified segment's auth-chain blocks go to storage (each lies in one segment's
    /// span, B-13a) and leave the decoded-block store. Nothing unverified is ever staged.
    private mutating func emitWhollyVerifiedBlocks(_ blocks: Range<Int>) {
        for b in blocks where !authBlocksEmitted.contains(b) {
            if let data = authBytes.removeValue(forKey: b) { verifiedAuthBlocks.append((b, data)); authBlocksEmitted.insert(b) }
        }
    }

    // MARK: Memory (P-5b, P-5c)

    /// Frees the tags of segment j once every payload block it covers is done: they are
    /// only needed to check symbols of incomplete blocks, and kept they would grow with
    /// the payload (1.5% of it: 15.8 MB for 1 GiB; Specs/protocol.md P-5b).
    mutating func releaseSegmentIfDone(containing b: Int, payloadDone: [Bool]) {
        let j = b / layout.blocksPerSegment
        guard j < nextSegment, segments[j] != nil || evictedSegments.contains(j),
              layout.blocks(inSegment: j).allSatisfy({ payloadDone[$0] }) else { return }
        if let released = segments.removeValue(forKey: j) { segmentBytesHeld -= released.bytes.count }
        evictedSegments.remove(j)
        segmentHashes[j] = nil
        segmentUse[j] = nil
    }

    /// Specs/protocol.md P-5c: while the segments held exceed the budget, the least
    /// recently used one whose bytes are all staged leaves memory (its hash stays).
    mutating func evictIfNeeded(budget: Int, stats: inout ReceiverStats) {
        while segmentBytesHeld > budget {
            let staged = segments.keys.filter { j in layout.authBlocks(inSegment: j).allSatisfy { authBlocksStored.contains($0) } }
            // Least recently used first; among segments no symbol has used yet (the chain
            // arrives before the payload), the last ones, which the payload needs last.
            guard let j = staged.min(by: { (segmentUse[$0, default: 0], -$0) < (segmentUse[$1, default: 0], -$1) }) else { return }
            segmentBytesHeld -= segments[j]!.bytes.count
            segments[j] = nil
            evictedSegments.insert(j)
            stats.segmentsEvicted += 1
        }
    }

    /// Notes the use of block b's segment and reads it back from staging if it left
    /// memory, checking it against the hash it verified with. False if it cannot be.
    mutating func reloadIfEvicted(block b: Int, from reader: AuthChainReader?, stats: inout ReceiverStats) -> Bool {
        let j = b / layout.blocksPerSegment
        // Symbols come in runs of one segment: stamping the first of a run keeps the order
        // of last use without a dictionary write per symbol on this hot path.
        if lastUsedSegment != j {
            useClock += 1
            segmentUse[j] = useClock
            lastUsedSegment = j
        }
        guard evictedSegments.contains(j) else { return true }
        let range = byteRange(ofSegment: j)
        guard let bytes = reader?.readAuthChain(offset: range.lowerBound, count: range.count), bytes.count == range.count,
              SHA256.hash(bytes) == segmentHashes[j], let segment = try? AuthSegment(parsing: bytes, index: j, layout: layout) else {
            stats.segmentReloadFailures += 1
            return false
        }
        evictedSegments.remove(j)
        segments[j] = segment
        segmentBytesHeld += range.count
        stats.segmentsReloaded += 1
        return true
    }
}
