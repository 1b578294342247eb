import DeliveryCore
import FleetCrypto
import UpdateBundle
import WireFormat
#if canImport(Glibc)
import Glibc
#endif

/// The receiver a device agent embeds: steps 1 and 2 on a staging directory,
/// without sockets. Feed it datagrams and time (from your socket loop, or
/// Transport's `ReceiverPump`); carry out nothing yourself but answer its
/// offers. It judges every offer with the current time and the currently
/// installed software, stages verified blocks with a resume journal, runs
/// step 2 as blocks arrive, releases the components only once every check
/// passed (the policy judged again), and only then tells the sender the
/// device is complete.
///
/// ```
/// let receiver = try UpdateReceiver(configuration: config, installed: { store.installed })
/// // in your loop:
/// receiver.handleDatagram(bytes, from: peer, at: now)
/// while let t = receiver.pollTransmit() { send(t.bytes, to: t.destination) }
/// while let e = receiver.pollEvent() {
///     if case .offer(let offer) = e { receiver.accept(offer, at: now) }
/// }
/// if receiver.hasPendingWork { receiver.performPendingWork(at: now) }
/// ```
///
/// Not thread-safe: one loop owns it. Time comes in as `Instant`s of the
/// caller's monotonic clock; wall-clock time (for expiry) from `unixTime`.
/// Every answer and report is safe to give late: `accept` or `decline` of an
/// offer no longer pending returns false and does nothing.
public final class UpdateReceiver: DatagramEndpoint {
    /// How the receiver stages, verifies and releases.
    public struct Configuration: Sendable {
        /// Who the device is, what it trusts, its keys.
        public var identity: DeviceIdentity
        /// Staged blocks, the resume journal, the spill and the receiver ID (created
        /// 0700; refused if another user owns it or may write it).
        public var stagingDirectory: String
        /// Where verified components are released (created 0755 if missing; refused,
        /// like staging, if others may write it: a file swapped in there would be
        /// released as verified). Nil keeps only the bundle. Not the staging directory.
        public var outputDirectory: String?
        /// Keep `<staging>/bundle` even when the payload could be staged as the component
        /// itself and written once (Specs/protocol.md P-29a).
        public var keepBundle = false
        /// Step 2 block by block as blocks arrive (Specs/bundle.md B-15b), or after the
        /// transfer from the staged bundle.
        public var verifyDuringTransfer = true
        /// Step 2 on a thread of its own, reading the staged blocks back as they come
        /// in order, so that hashing, decryption, inflation and the components' writes
        /// do not hold up the socket (`fleetcast receive` and `agent` set it). False:
        /// it runs in bounded slices of `performPendingWork`, in the caller's loop, and
        /// everything is deterministic.
        public var stepTwoThread = false
        /// Specs/protocol.md P-29c: how a payload staged in staging while step 2 runs
        /// during the transfer (compressed, encrypted or of several components; no
        /// bundle kept) is staged: whole, or through a window ahead of step 2.
        public var stagingWindow: StagingWindow = .automatic
        /// Named limit: a window holds this many blocks at least (twice the sender's
        /// default interleave window of 8), whatever `stagingWindow` says.
        public static let stagingWindowBlockCountMin = 16
        /// Named limit: what `.automatic` leaves free on the staging file system for
        /// the rest (the journal, the spill of incomplete blocks, other programs).
        public static let stagingFreeSpaceMarginBytes: UInt64 = 4 << 20
        /// Mode of released component files.
        public var componentMode: mode_t = 0o600
        /// After a session ends (its final STATUS acknowledged), listen for the next one,
        /// as a long-running agent does; false leaves the receiver done. A bundle once
        /// completed is not offered again while this receiver lives.
        public var listensAfterSession = false
        /// The protocol's knobs; the identity fields in it are overwritten.
        public var tuning: ReceiverConfig

        /// The defaults: step 2 during the transfer, no bundle kept when the payload is
        /// the component, components 0600, one session.
        public init(identity: DeviceIdentity, stagingDirectory: String, outputDirectory: String? = nil) {
            self.identity = identity
            self.stagingDirectory = stagingDirectory
            self.outputDirectory = outputDirectory
            tuning = ReceiverConfig(receiverID: ReceiverID(1), deviceID: identity.deviceID, installedVersion: "",
                                    installedSequence: 0, trust: identity.trust, seed: 0)
        }
    }

    /// Specs/protocol.md P-29c: staging a payload that is not staged apart (P-29a, P-29b).
    public enum StagingWindow: Sendable, Equatable {
        /// The whole payload, reserved, when staging has room for it at the offer (less
        /// `stagingFreeSpaceMarginBytes`); otherwise a window as large as that room, so
        /// that a device without room for the bundle still installs it, at the cost of
        /// blocks sent again whenever step 2 falls a window behind.
        case automatic
        /// Blocks of at most this many bytes ahead of step 2 (16 blocks at least),
        /// whatever the room.
        case bytes(UInt64)
        /// The whole payload, reserved: a device without room for it declines.
        case whole
    }

    /// What to do with an offer the policy admitted.
    public enum OfferDecision: Sendable {
        case accept
        case decline(String)
        /// Declined for a reason the sender should hear as such (`slot`: no slot fits).
        case refuse(String, Status.Reason)
        /// Ask later: the offer waits as an `.offer` event (DATA meanwhile is buffered,
        /// a bounded amount, Specs/protocol.md P-3b).
        case later
    }

    /// As given at `init`.
    public let configuration: Configuration
    /// This device's receiver ID on the wire: the identity's, or the one kept in staging.
    public let receiverID: ReceiverID
    /// The delegation of the key that signed the joined session's records (P-31); nil:
    /// an unauthenticated session, or none joined.
    public private(set) var joinedSenderDelegation: SenderDelegation?
    /// Why a journal found at start was not used, if it was not.
    public private(set) var resumeNote: String?
    /// Payload blocks the journal found at start had verified.
    public private(set) var resumedBlocks = 0
    /// Bytes of every datagram handed in.
    public private(set) var bytesHeard: UInt64 = 0
    /// Specs/protocol.md P-29c: the most bytes the staged bundle of the current or
    /// last session held on disk, seen before each release of consumed blocks (0
    /// without a window).
    public private(set) var stagingAllocatedBytesMax: UInt64 = 0

    /// Decides offers as they come, once each, without waiting for the embedder's
    /// loop: a device that installs whatever its policy admits (`fleetcast receive`,
    /// an agent's automatic trigger) accepts here, so no DATA waits. Nil: every
    /// offer waits as an `.offer` event. It may not call `accept` or `decline` itself.
    public var decideOffer: ((UpdateOffer) -> OfferDecision)?

    /// Where an accepted update's components go instead of the output directory: a
    /// device agent's sink writes them into its spare slots as step 2 releases them
    /// (Specs/agent.md A-4). Asked once per accepted offer, with whether the payload is
    /// staged in the slot already (P-29b: the sink then only makes it durable and reads
    /// it back).
    public var makeSink: ((VerifiedManifest, _ stagedInSlot: Bool) throws(ReceiveFailure) -> ComponentSink)?

    /// Bundles the embedder has already (installed, on trial, rolled back): an announce
    /// of one is ignored without a word, before the policy, whose anti-rollback check
    /// would refuse it aloud once it is installed. The manifest's signatures verified.
    public var ignoresBundle: ((Manifest, SessionID) -> Bool)?

    private let staging: StagingArea
    private let output: SafeDirectory?
    private let payloadSlot: ((Manifest) -> StagingArea.PayloadPlace?)?
    private let installed: () -> InstalledSoftware
    private let unixTime: () -> UInt64
    private let spill: FileSpill
    private var core: Receiver
    private var seed: UInt64
    private var events: [UpdateEvent] = []
    /// The offer the core holds, admitted by the policy, and whether `decideOffer` was asked.
    /// With it, its staging window (P-29c), judged once at the offer and kept for the accept.
    private var offer: (offer: Offer, verified: VerifiedManifest, asked: Bool, window: Int?)?
    private var transfer: Transfer?
    /// What the core was given to resume, if anything.
    private var resume: ResumeState?
    /// Envelopes (SHA-256) of the bundles completed while this receiver lives: a
    /// listening receiver does not take one of them again.
    private var completedEnvelopes: [[UInt8]] = []
    static let completedEnvelopeCountMax = 16

    /// The accepted session: its manifest, staging and step 2.
    private final class Transfer {
        let verified: VerifiedManifest
        let envelope: [UInt8]
        /// Payload blocks staged (this run or journalled before).
        var stored: [Bool]
        var verification: PayloadVerification?
        /// With `stepTwoThread`: the thread that owns `verification` while it runs, and
        /// how far the payload is staged without a gap.
        var worker: StepTwoWorker?
        var stagedUpTo = 0
        /// P-29c: blocks staged ahead of step 2 at most, the window's end given to the
        /// core, and the blocks whose staging was freed (nil: no window).
        let windowBlocks: Int?
        let geometry: BlockGeometry
        var windowEnd = 0
        var released = 0
        /// Every block is in: step 2 is to finish.
        var complete = false
        /// The outcome was emitted (once); nothing of the session is carried out after it.
        var ended = false
        init(verified: VerifiedManifest, envelope: [UInt8], windowBlocks: Int?) {
            self.verified = verified
            self.envelope = envelope
            self.windowBlocks = windowBlocks
            geometry = BlockGeometry(payloadSize: verified.manifest.payload.size, profile: verified.manifest.transport)
            stored = [Bool](repeating: false, count: geometry.blockCount)
            windowEnd = windowBlocks ?? stored.count
        }

        /// Payload blocks step 2 has consumed, in order.
        var consumed: Int { worker?.progress.consumed ?? verification?.nextBlock ?? 0 }
    }

    deinit { transfer?.worker?.stop() }

    /// `installed` is asked at every offer and again before release; `unixTime` is the
    /// wall clock that expiry is judged by (injected for tests); `seed` (default: from
    /// the system's randomness) draws the NACK backoff. `payloadSlot` (a device
    /// agent's) gives the spare slot that a manifest's lone plain component would go
    /// to, where the payload is then staged (Specs/protocol.md P-29b), or nil.
    public init(configuration: Configuration, installed: @escaping () -> InstalledSoftware,
                unixTime: @escaping () -> UInt64 = { UInt64(time(nil)) }, seed: UInt64? = nil,
                payloadSlot: ((Manifest) -> StagingArea.PayloadPlace?)? = nil) throws(ReceiveFailure) {
        self.configuration = configuration
        self.payloadSlot = payloadSlot
        self.installed = installed
        self.unixTime = unixTime
        do {
            self.seed = try seed ?? Self.randomWord()
            staging = try StagingArea(directory: configuration.stagingDirectory)
            spill = try FileSpill(directory: staging.directory)
            receiverID = try configuration.identity.receiverID ?? staging.receiverID()
            output = try configuration.outputDirectory.map { (path) throws(BundleError) in
                try SafeDirectory(path: path, create: 0o755, requirePrivate: true)
            }
        } catch let error as StorageError { throw ReceiveFailure(.storage, error.reason) }
        catch let error as BundleError { throw ReceiveFailure(.storage, error.reason) }
        catch { throw ReceiveFailure(.storage, "\(error)") }
        if let output, let a = output.directoryIdentity, let b = staging.directory.directoryIdentity, a == b {
            throw ReceiveFailure(.storage, "the output directory is the staging directory: a component could overwrite the journal")
        }
        core = Receiver(config: configuration.tuning)  // replaced below, once `self` may be used
        resume = loadResume()
        core = makeCore(resume: resume)
    }

    private static func randomWord() throws -> UInt64 {
        do { return try SecureRandom.bytes(8).reduce(0) { $0 << 8 | UInt64($1) } } catch { throw StorageError("no randomness: \(error)") }
    }

    // MARK: Queries

    /// The offer awaiting `accept` or `decline`, if any.
    public var pendingOffer: UpdateOffer? { offer.map { makeOffer($0.offer, $0.verified, window: $0.window) } }
    /// The receiver's counters (drops by reason, work done), for the current session.
    public var stats: ReceiverStats { core.stats }
    /// Payload blocks verified and staged in the current session.
    public var blocksDone: Int { core.blocksDone }
    /// NACK datagrams sent in the current session.
    public var nacksSent: Int { core.nacksSent }
    /// The accepted session's manifest.
    public var manifest: Manifest? { transfer?.verified.manifest }
    /// Every block is in and step 2 is finishing.
    public var isVerifying: Bool { transfer.map { $0.complete && !$0.ended } ?? false }
    /// The last offer declined (by the policy or the embedder), and why.
    public var lastDecline: (reason: Status.Reason, text: String)? { core.lastDecline }

    // MARK: DatagramEndpoint

    /// A datagram from the group or the sender, with its source address, at `now`
    /// (your monotonic clock); `arrivedAt` is when the host received it (kernel
    /// timestamps), `now` if you do not know.
    public func handleDatagram(_ bytes: [UInt8], from peer: PeerAddress, at now: Instant, arrivedAt: Instant) {
        lastNow = now
        bytesHeard += UInt64(bytes.count)
        core.handleDatagram(bytes, from: peer, at: now, arrivedAt: arrivedAt)
        carryOut(at: now)
    }

    /// Call when `nextDeadline` has passed.
    public func handleTimeout(at now: Instant) {
        lastNow = now
        core.handleTimeout(at: now)
        carryOut(at: now)
    }

    /// The next datagram to send (always unicast to the sender: `.peer(address)`), or nil.
    public func pollTransmit() -> Transmit? { core.pollTransmit() }
    /// The next event for the embedder, or nil.
    public func pollEvent() -> UpdateEvent? { events.isEmpty ? nil : events.removeFirst() }
    /// When `handleTimeout` next has something to do (or, while step 2's thread
    /// finishes a complete transfer, when to look at it again).
    public var nextDeadline: Instant? {
        // Also while a window follows step 2's thread (P-29c): it moves as the thread consumes.
        guard let t = transfer, !t.ended, t.complete || t.windowBlocks != nil, t.worker != nil, let lastNow else { return core.nextDeadline }
        let look = lastNow + Self.stepTwoPollInterval
        return core.nextDeadline.map { min($0, look) } ?? look
    }

    /// How often the loop looks at step 2's thread once every block is in.
    public static let stepTwoPollInterval = Interval.milliseconds(5)
    private var lastNow: Instant?

    /// Whether step 2 has staged blocks to read back, or is to finish: call `performPendingWork`.
    public var hasPendingWork: Bool {
        guard let t = transfer, !t.ended else { return false }
        if let w = t.worker {
            let p = w.progress
            return p.failure != nil || (t.complete && p.consumed == t.stored.count)
        }
        if t.complete { return true }
        guard let v = t.verification else { return false }
        return v.nextBlock < v.blockCount && t.stored[v.nextBlock]
    }

    /// Read-backs per call: step 2 keeps pace without keeping the sockets waiting
    /// (about 4.5 MB of the default profile, a few milliseconds of hashing and writing).
    public static let verificationBlocksPerCall = 16

    /// A bounded slice of step 2 (`verificationBlocksPerCall` read-backs, or its end).
    public func performPendingWork(at now: Instant) {
        guard let t = transfer, !t.ended else { return }
        lastNow = now
        do throws(ReceiveFailure) {
            if let w = t.worker {
                let p = w.progress
                if let failure = p.failure { throw failure }
                guard t.complete && p.consumed == t.stored.count else { return }
                // Every block consumed: the verification is this loop's again.
                w.stop()
                t.worker = nil
            }
            try feedStaged(t, blockCountMax: Self.verificationBlocksPerCall)
            if t.complete, let v = t.verification, v.nextBlock == v.blockCount { try finishStepTwo(t, at: now) }
        } catch {
            end(t, failure: error, at: now)
        }
        carryOut(at: now)
    }

    /// The session is over and reported (its final STATUS acknowledged); never, with
    /// `listensAfterSession`. A receiver that only ever declines is never done either:
    /// its embedder decides how long to listen.
    public var isDone: Bool { !configuration.listensAfterSession && core.isFinished && (transfer?.ended ?? true) }

    /// Removes the bundle a completed session left in staging (`ReceivedUpdate.bundlePath`):
    /// an embedder that installed the components from it, or as they were released,
    /// needs no copy. Call it before the next session is accepted.
    public func removeStagedBundle() { staging.directory.remove(StagingArea.bundleName) }

    // MARK: The embedder's answer

    /// Accepts the pending offer: staging is prepared (reserved, P-26a) and the
    /// transfer starts, with the blocks buffered since the announce. False, and
    /// nothing done, when that offer is no longer pending.
    @discardableResult
    public func accept(_ offer: UpdateOffer, at now: Instant) -> Bool {
        guard let pending = self.offer, pending.offer.session == offer.session, pending.verified.manifestBytes == offer.manifest.manifestBytes else { return false }
        self.offer = nil
        let t = Transfer(verified: pending.verified, envelope: pending.offer.envelope, windowBlocks: pending.window)
        var resuming = pending.offer.resumes
        do throws(ReceiveFailure) {
            let payloadFile = try stagedPayloadFile(pending.verified.manifest)
            do {
                resuming = try staging.prepare(envelope: pending.offer.envelope, manifest: pending.verified.manifest, payloadFile: payloadFile,
                                               reservesPayload: t.windowBlocks == nil) && resuming
            }
            catch { throw ReceiveFailure(.storage, error.reason) }
            if t.windowBlocks != nil {
                try startWindow(t, resuming: resuming)
            } else if resuming, let resume {
                // Journalled blocks are staged already (in the files just reused); step 2 reads them back.
                for b in resume.progress.payloadBlocks where b < t.stored.count { t.stored[b] = true }
            }
            if configuration.verifyDuringTransfer { startVerification(t, try makeVerification(t.verified, staged: payloadFile)) }
        } catch {
            core.decline(error.statusReason, error.text, at: now)
            events.append(.refused(session: offer.session, error))
            carryOut(at: now)
            return true
        }
        transfer = t
        stagingAllocatedBytesMax = 0
        joinedSenderDelegation = offer.senderDelegation
        events.append(.joined(session: offer.session, manifest: t.verified.manifest))
        core.accept(pending.verified, resuming: resuming, payloadWindowEnd: t.windowBlocks, at: now)
        carryOut(at: now)
        return true
    }

    /// Declines the pending offer; the sender hears reason `declined`. False, and
    /// nothing done, when that offer is no longer pending.
    @discardableResult
    public func decline(_ offer: UpdateOffer, reason text: String, code: Status.Reason = .declined, at now: Instant) -> Bool {
        guard let pending = self.offer, pending.offer.session == offer.session, pending.verified.manifestBytes == offer.manifest.manifestBytes else { return false }
        self.offer = nil
        core.decline(code == .none ? .declined : code, text, at: now)
        carryOut(at: now)
        return true
    }

    // MARK: Carrying out the core's actions

    private func carryOut(at now: Instant) {
        while let action = core.pollAction() {
            switch action {
            case .offer(let o): judge(o, at: now)
            case .store(let object, let block, let offset, let bytes): store(object, block, offset, bytes, at: now)
            case .commit(let journal):
                // Once a store failed, no journal may list what it did not write (P-20).
                guard let t = transfer, !t.ended else { continue }
                do { try staging.commit(journal) } catch { end(t, failure: ReceiveFailure(.storage, error.reason), at: now) }
            case .verify:
                guard let t = transfer, !t.ended else { continue }
                t.complete = true
                events.append(.received(session: core.session ?? SessionID(0)))
                if t.verification == nil {
                    do { startVerification(t, try makeVerification(t.verified, staged: staging.payloadPlace)) } catch { end(t, failure: error, at: now) }
                }
            case .failed(let reason, let text):
                if let t = transfer { end(t, failure: ReceiveFailure(status: reason, text), at: now, toldCore: true) }
            }
        }
        if let t = transfer, !t.ended, let w = t.windowBlocks { moveWindow(t, blocks: w, at: now) }
        askAboutOffer(at: now)
        if configuration.listensAfterSession, core.isFinished, transfer?.ended ?? true { listenAgain() }
    }

    /// Specs/protocol.md P-29c: the window follows step 2, and what step 2 consumed is
    /// freed at once (a windowed session's journals list no payload block).
    private func moveWindow(_ t: Transfer, blocks: Int, at now: Instant) {
        let consumed = t.consumed
        if consumed > t.released { releaseStaged(t, upTo: consumed) }
        let end = min(t.stored.count, consumed + blocks)
        guard end > t.windowEnd else { return }
        t.windowEnd = end
        core.setPayloadWindow(end: end, at: now)
    }

    /// Frees the staging of payload blocks `released..<n` (consumed, in no journal).
    private func releaseStaged(_ t: Transfer, upTo n: Int) {
        // The most staging holds is just before a release.
        stagingAllocatedBytesMax = max(stagingAllocatedBytesMax, staging.partialAllocatedBytes)
        let start = t.geometry.byteRange(ofBlock: t.released).lowerBound, end = t.geometry.byteRange(ofBlock: n - 1).upperBound
        staging.releasePayload(offset: start, count: end - start)
        t.released = n
    }

    /// `decideOffer`, once per offer, outside the loop over actions.
    private func askAboutOffer(at now: Instant) {
        guard let decide = decideOffer, let pending = offer, !pending.asked else { return }
        offer?.asked = true
        let o = makeOffer(pending.offer, pending.verified, window: pending.window)
        switch decide(o) {
        case .accept: accept(o, at: now)
        case .decline(let text): decline(o, reason: text, at: now)
        case .refuse(let text, let code): decline(o, reason: text, code: code, at: now)
        case .later: if self.offer != nil { events.append(.offer(o)) }
        }
    }

    /// Specs/protocol.md P-29c at the accept: a windowed session resumes its auth chain
    /// only, so the payload staged by an earlier session goes: first a journal that lists
    /// none of it is made durable, then its room is freed. Freeing the (empty or stale)
    /// payload range also tells whether this file system can punch holes; a window
    /// without that would free nothing, and is refused.
    private func startWindow(_ t: Transfer, resuming: Bool) throws(ReceiveFailure) {
        let auth = resuming ? resume?.progress.authBlocks ?? [] : []
        do { try staging.commit(ProgressJournal(envelope: t.envelope, authBlocks: auth, payloadBlocks: [])) }
        catch { throw ReceiveFailure(.storage, error.reason) }
        guard staging.releasePayload(offset: 0, count: t.verified.manifest.payload.size) else {
            throw ReceiveFailure(.storage, "the staging file system cannot free space (no hole punching), which a staging window needs: set the staging window to 'whole', or stage on another file system")
        }
    }

    /// The device's policy at this moment: the wall clock, the software installed now.
    private func currentPolicy() -> DevicePolicy {
        DevicePolicy(now: unixTime(), hardwareID: configuration.identity.hardwareID, installedSequence: installed().sequence,
                     productID: configuration.identity.productID)
    }

    /// Specs/protocol.md P-3c: the device's policy at this moment, then whether its keys
    /// open the bundle and whether staging has room. What passes becomes the embedder's
    /// offer; a bundle this receiver completed already is dismissed without a word.
    private func judge(_ o: Offer, at now: Instant) {
        if completedEnvelopes.contains(SHA256.hash(o.envelope)) || ignoresBundle?(o.manifest.manifest, o.session) == true {
            core.dismiss(at: now)
            return
        }
        let verified: VerifiedManifest
        let window: Int?
        do {
            verified = try o.manifest.admit(under: currentPolicy())
            // Specs/protocol.md P-31b: the sender key's delegation, judged like the manifest, now.
            if let d = o.senderDelegation, let why = d.permits(product: verified.manifest.productID, at: unixTime()) {
                core.decline(.unauthorized, why, at: now)
                events.append(.refused(session: o.session, ReceiveFailure(.unauthorized, why)))
                return
            }
            try verified.checkRecipient(keys: configuration.identity.keys)
            window = windowBlocks(verified.manifest, envelopeBytes: o.envelope.count)
            if !o.resumes || window != nil {
                try checkRoom(needs(o, verified.manifest, window: window), payloadFile: try? stagedPayloadFile(verified.manifest))
            }
        } catch {
            let failure = ReceiveFailure(error)
            core.decline(failure.statusReason, failure.text, at: now)
            events.append(.refused(session: o.session, failure))
            return
        }
        offer = (o, verified, false, window)
        if decideOffer == nil { events.append(.offer(makeOffer(o, verified, window: window))) }
    }

    private func makeOffer(_ o: Offer, _ verified: VerifiedManifest, window: Int?) -> UpdateOffer {
        let n = needs(o, verified.manifest, window: window)
        return UpdateOffer(session: o.session, manifest: verified, stagingBytes: n.staging, outputBytes: n.output, resumes: o.resumes,
                           sender: o.sender, senderDelegation: o.senderDelegation)
    }

    /// Bytes the bundle needs in staging and in the output directory: the payload
    /// staged as the component (P-29a) counts in the output only, in a slot (P-29b)
    /// nowhere, and through a window (P-29c) as the window's footprint.
    private func needs(_ o: Offer, _ m: Manifest, window: Int?) -> (total: UInt64, staging: UInt64, output: UInt64) {
        let total = BundleHeader(envelopeLength: o.envelope.count, payloadLength: m.payload.size, authLength: m.authentication.size).totalSize
        let separate = Self.stagesPayloadAsComponent(configuration, m) || stagesPayloadInSlot(m)
        let output = configuration.outputDirectory == nil ? 0 : m.components.reduce(UInt64(0)) { $0 + $1.size }
        if !separate, let w = window { return (total, total - m.payload.size + Self.windowFootprint(w, m), output) }
        return (total, separate ? total - m.payload.size : total, output)
    }

    /// P-29c: the most a window of `blocks` holds in staging: each of its blocks staged,
    /// or in flight with up to k + R symbols, in memory or in the spill (P-5a).
    static func windowFootprint(_ blocks: Int, _ m: Manifest) -> UInt64 {
        let perBlock = UInt64((m.transport.sourceSymbolsPerBlock + m.transport.repairSymbolsPerBlock) * m.transport.symbolSize)
        return min(m.payload.size, UInt64(blocks) * perBlock)
    }

    /// Specs/protocol.md P-26a at the offer: a device without room for the bundle and
    /// its components declines it before a byte is staged. Space that the stale files
    /// of an earlier download hold counts as free: preparing replaces them. (The
    /// reservation at the join still decides: free space can go meanwhile.)
    private func checkRoom(_ n: (total: UInt64, staging: UInt64, output: UInt64), payloadFile: StagingArea.PayloadPlace?) throws(BundleError) {
        let stale = staging.reclaimableBytes(payloadFile: payloadFile)
        var byFileSystem: [UInt: (path: String, free: UInt64, need: UInt64)] = [:]
        let places = [(configuration.stagingDirectory, n.staging, stale.staging)] + (configuration.outputDirectory.map { [($0, n.output, stale.output)] } ?? [])
        for (path, need, reclaimable) in places {
            var fs = statvfs()
            guard statvfs(path, &fs) == 0 else { continue }  // the reservation will tell
            // A file system's free space counts once, however many places share it.
            if byFileSystem[fs.f_fsid] == nil { byFileSystem[fs.f_fsid] = (path, UInt64(fs.f_bavail) * UInt64(fs.f_frsize), 0) }
            byFileSystem[fs.f_fsid]!.free += reclaimable
            byFileSystem[fs.f_fsid]!.need += need
        }
        for (_, place) in byFileSystem where place.need > place.free {
            throw BundleError(.io, "no room for the \(n.total)-byte bundle in \(place.path): \(place.free) bytes free, \(place.need) needed")
        }
    }

    private func store(_ object: ObjectID, _ block: Int, _ offset: UInt64, _ bytes: [UInt8], at now: Instant) {
        guard let t = transfer, !t.ended else { return }
        do { try staging.store(object, offset: offset, bytes: bytes) } catch {
            end(t, failure: ReceiveFailure(.storage, error.reason), at: now)
            return
        }
        core.handleStored(object, block: block)
        guard object == .payload, block < t.stored.count else { return }
        t.stored[block] = true
        if let w = t.worker {
            if block == t.stagedUpTo {
                while t.stagedUpTo < t.stored.count && t.stored[t.stagedUpTo] { t.stagedUpTo += 1 }
                w.staged(upTo: t.stagedUpTo)
            }
            return
        }
        // Step 2 takes the block straight from memory when it is the next one.
        if let v = t.verification, v.nextBlock == block { consume(t, v, block: block, bytes, at: now) }
    }

    /// Step 2 begins: in this loop, or on its own thread (`stepTwoThread`) from the
    /// blocks staged so far.
    private func startVerification(_ t: Transfer, _ v: PayloadVerification) {
        t.verification = v
        guard configuration.stepTwoThread else { return }
        let staging = staging
        let w = StepTwoWorker(blockCount: v.blockCount) { (b) throws(ReceiveFailure) in try Self.feedStaged(block: b, to: v, from: staging) }
        t.stagedUpTo = 0
        while t.stagedUpTo < t.stored.count && t.stored[t.stagedUpTo] { t.stagedUpTo += 1 }
        w.start(stagedUpTo: t.stagedUpTo)
        t.worker = w
    }

    private func consume(_ t: Transfer, _ v: PayloadVerification, block: Int, _ bytes: [UInt8], at now: Instant) {
        let result = bytes.withUnsafeBytes { p in Result { () throws(BundleError) in try v.consume(block: block, bytes: p) } }
        if case .failure(let error) = result { end(t, failure: ReceiveFailure(error), at: now) }
    }

    /// Feeds step 2 up to `blockCountMax` staged blocks that are next in order, read back.
    private func feedStaged(_ t: Transfer, blockCountMax: Int) throws(ReceiveFailure) {
        guard let v = t.verification else { return }
        var fed = 0
        while fed < blockCountMax, !t.ended, v.nextBlock < v.blockCount, t.stored[v.nextBlock] {
            try Self.feedStaged(block: v.nextBlock, to: v, from: staging)
            fed += 1
        }
    }

    /// Staged block `b` read back and consumed by step 2 (in this loop, or on step 2's thread).
    private static func feedStaged(block b: Int, to v: PayloadVerification, from staging: StagingArea) throws(ReceiveFailure) {
        let range = v.byteRange(ofBlock: b)
        let bytes: [UInt8]
        do { bytes = try staging.readPayload(offset: range.lowerBound, count: range.count) } catch { throw ReceiveFailure(.storage, error.reason) }
        let result = bytes.withUnsafeBytes { p in Result { () throws(BundleError) in try v.consume(block: b, bytes: p) } }
        if case .failure(let error) = result { throw ReceiveFailure(error) }
    }

    /// The end of step 2 (Specs/bundle.md §8 step 7, B-11): staging made durable, the
    /// manifest judged again by the policy of now (a transfer may outlast its expiry,
    /// or another update may have been installed meanwhile), the final checks, the
    /// release; only then is the sender told "complete". What fails leaves nothing.
    private func finishStepTwo(_ t: Transfer, at now: Instant) throws(ReceiveFailure) {
        guard let v = t.verification else { return }
        let staged: StagingArea.Staged
        do { staged = try staging.finish(payloadReleased: t.windowBlocks != nil) } catch { throw ReceiveFailure(.storage, error.reason) }
        do {
            try currentPolicy().check(t.verified.manifest)
            let result = try v.finish()
            t.ended = true
            core.handleVerdict(.verified, at: now)
            rememberCompleted(t.envelope)
            var bundlePath: String?
            if case .bundle(let path) = staged { bundlePath = path }
            events.append(.completed(ReceivedUpdate(session: core.session ?? SessionID(0), verified: result, bundlePath: bundlePath)))
        } catch {
            // Nothing is released: the payload staged as the component goes too (B-16a),
            // and the bundle that failed.
            switch staged {
            case .payload(let path): output?.remove(String(path.split(separator: "/").last ?? ""))
            case .bundle: staging.directory.remove(StagingArea.bundleName)
            case .slot: break  // the slot stays, not bootable (Specs/agent.md A-3)
            case .released: break  // nothing was kept (P-29c)
            }
            throw ReceiveFailure(error)
        }
    }

    private func rememberCompleted(_ envelope: [UInt8]) {
        if completedEnvelopes.count >= Self.completedEnvelopeCountMax { completedEnvelopes.removeFirst() }
        completedEnvelopes.append(SHA256.hash(envelope))
    }

    /// Ends the accepted session without a verified update, once.
    private func end(_ t: Transfer, failure: ReceiveFailure, at now: Instant, toldCore: Bool = false) {
        guard !t.ended else { return }
        t.ended = true
        // The session as the embedder knew it: an aborted core forgets it.
        let session = core.session ?? SessionID(0)
        // Step 2's thread stops before its verification goes.
        t.worker?.stop()
        t.worker = nil
        // Step 2's temporaries go with it (B-11: a failed verification leaves nothing).
        t.verification = nil
        if !toldCore {
            if core.isVerifying { core.handleVerdict(.failed(failure.statusReason, failure.text), at: now) }
            else { core.abort(failure.statusReason, failure.text, at: now) }
        }
        events.append(.failed(session: session, failure))
    }

    // MARK: Set-up

    /// Specs/protocol.md P-29a: the payload is staged as the component file (written
    /// once) when components go to an output directory, no bundle is kept, step 2 runs
    /// during the transfer, and the only component is the plain payload (B-16).
    static func stagesPayloadAsComponent(_ c: Configuration, _ m: Manifest) -> Bool {
        c.outputDirectory != nil && stagesPayloadApart(c, m)
    }

    /// P-29a and P-29b alike: no bundle kept, step 2 during the transfer, and the only
    /// component is the plain payload (B-16).
    static func stagesPayloadApart(_ c: Configuration, _ m: Manifest) -> Bool {
        !c.keepBundle && c.verifyDuringTransfer && PayloadVerification.componentIsPayload(m)
    }

    /// Specs/protocol.md P-29c: the staging window in blocks, when step 2 runs during
    /// the transfer and releases into an output directory or a sink, no bundle is
    /// kept (without either, the bundle is what the receiver makes), the payload is
    /// staged in staging (not apart, P-29a, P-29b), and it is larger than the
    /// window; nil otherwise (staged whole).
    func windowBlocks(_ m: Manifest, envelopeBytes: Int) -> Int? {
        guard !configuration.keepBundle, configuration.verifyDuringTransfer, configuration.outputDirectory != nil || makeSink != nil,
              !Self.stagesPayloadAsComponent(configuration, m), !stagesPayloadInSlot(m) else { return nil }
        let blockBytes = UInt64(m.transport.blockByteCount)
        var bytes: UInt64
        switch configuration.stagingWindow {
        case .whole: return nil
        case .bytes(let b): bytes = b
        case .automatic:
            // The room staging has for payload blocks: free space, less the rest of the
            // bundle, one commit interval, and the margin.
            guard let free = stagingFreeBytes(m) else { return nil }  // unknown: the reservation decides
            let rest = BundleHeader(envelopeLength: envelopeBytes, payloadLength: m.payload.size, authLength: m.authentication.size).totalSize
                - m.payload.size + Configuration.stagingFreeSpaceMarginBytes
            if free >= rest + m.payload.size { return nil }
            // The room, as payload bytes: a window's footprint is (k + R) / k of its blocks.
            let room = free > rest ? free - rest : 0
            bytes = room / UInt64(m.transport.sourceSymbolsPerBlock + m.transport.repairSymbolsPerBlock) * UInt64(m.transport.sourceSymbolsPerBlock)
        }
        let blocks = max(Configuration.stagingWindowBlockCountMin, Int(min(bytes / blockBytes, UInt64(Int32.max))))
        let payloadBlocks = BlockGeometry(payloadSize: m.payload.size, profile: m.transport).blockCount
        return payloadBlocks > blocks ? blocks : nil
    }

    /// Free bytes on the staging file system (stale partial files count as free, P-28),
    /// less what the components need there when the output directory shares it; nil
    /// when it cannot be told.
    private func stagingFreeBytes(_ m: Manifest) -> UInt64? {
        var fs = statvfs()
        guard statvfs(configuration.stagingDirectory, &fs) == 0 else { return nil }
        var free = UInt64(fs.f_bavail) * UInt64(fs.f_frsize) + staging.reclaimableBytes(payloadFile: nil).staging
        var out = statvfs()
        if let o = configuration.outputDirectory, statvfs(o, &out) == 0, out.f_fsid == fs.f_fsid {
            let components = m.components.reduce(UInt64(0)) { $0 + $1.size }
            free = free > components ? free - components : 0
        }
        return free
    }


    /// Specs/protocol.md P-29b: a device agent's payload that is its lone plain
    /// component is staged in the spare slot itself (step 2 during the transfer, no
    /// bundle kept): the slot is then written once, and staging holds no copy.
    func stagesPayloadInSlot(_ m: Manifest) -> Bool {
        payloadSlot != nil && Self.stagesPayloadApart(configuration, m)
    }

    private func stagedPayloadFile(_ m: Manifest) throws(ReceiveFailure) -> StagingArea.PayloadPlace? {
        if Self.stagesPayloadAsComponent(configuration, m), let output { return .outputFile(output, m.components[0].name + Manifest.temporarySuffix) }
        if stagesPayloadInSlot(m) { return payloadSlot?(m) }
        return nil
    }

    private func makeVerification(_ verified: VerifiedManifest, staged: StagingArea.PayloadPlace?) throws(ReceiveFailure) -> PayloadVerification {
        var inSlot = false
        if case .slot? = staged { inSlot = true }
        if inSlot && makeSink == nil { throw ReceiveFailure(.storage, "a payload staged in a slot needs a sink to read it back (makeSink)") }
        let sink = try makeSink.map { (make) throws(ReceiveFailure) in try make(verified, inSlot) }
        do {
            return try PayloadVerification(verified, keys: configuration.identity.keys, outputDirectory: sink == nil ? configuration.outputDirectory : nil,
                                           componentStaged: staged != nil && sink == nil, componentMode: configuration.componentMode, sink: sink)
        } catch { throw ReceiveFailure(error) }
    }

    /// Specs/protocol.md P-27: a journal whose bundle still verifies (signatures, and
    /// the policy as of now) and whose staging files match resumes; anything else
    /// starts afresh, and `resumeNote` says why.
    private func loadResume() -> ResumeState? {
        let (loaded, note) = staging.loadJournal()
        resumeNote = note
        resumedBlocks = 0
        guard let (journal, payloadApart) = loaded else { return nil }
        do {
            let verified = try ManifestVerifier.verify(envelope: journal.envelope, trust: configuration.identity.trust, device: currentPolicy())
            let payloadFile = try? stagedPayloadFile(verified.manifest)
            guard let resume = staging.resumeState(journal: journal, payloadApart: payloadApart, manifest: verified.manifest, payloadFile: payloadFile) else {
                resumeNote = "staging files do not match the journal; starting afresh"
                return nil
            }
            resumedBlocks = resume.progress.payloadBlocks.count
            return resume
        } catch {
            resumeNote = "journal's bundle is no longer acceptable (\(error.reason)); starting afresh"
            return nil
        }
    }

    private func makeCore(resume: ResumeState?) -> Receiver {
        var c = configuration.tuning
        let software = installed()
        c.receiverID = receiverID
        c.deviceID = configuration.identity.deviceID
        c.trust = configuration.identity.trust
        c.installedVersion = software.version
        c.installedSequence = software.sequence ?? 0
        c.seed = seed
        return Receiver(config: c, resume: resume, spill: spill, authReader: staging)
    }

    /// A long-running receiver's next session: a fresh core, which reports the
    /// software installed now.
    private func listenAgain() {
        seed &+= 0x9E37_79B9_7F4A_7C15
        transfer = nil
        offer = nil
        resume = loadResume()
        core = makeCore(resume: resume)
    }
}
