import DeliveryCore
import SeededRandom
import UpdateBundle
import WireFormat
#if canImport(Glibc)
import Glibc
#endif

/// Where a receiver listens (Specs/protocol.md §2).
public struct ReceiverEndpoint: Sendable {
    /// Group and port the sender multicasts to.
    public var group: SocketAddress
    public var interface: NetworkInterface?
    /// Large enough to ride out a scheduling hiccup at full rate.
    public var receiveBufferBytes = TransportLimits.socketBufferByteCountDefault
    /// Wake-up coalescing: after a wake that found the socket nearly empty,
    /// the next read waits at least this long, so that each system call
    /// carries a batch and the process is not woken per datagram: with many
    /// receivers sharing few cores, wake-ups dominate their CPU time. At
    /// 1 Gbit/s 5 ms is about 450 datagrams, a thirtieth of what the 16 MiB
    /// socket buffer holds; protocol timers work in multiples of the GRTT.
    /// Measured (16 receivers, 64 MiB, 5% loss): 2 ms -> 5 ms took receiver
    /// CPU from 0.57 s to 0.52 s.
    public var readIntervalMin = Interval.milliseconds(5)
    /// Take data coalesced by the kernel (UDP GRO) where it can: one message
    /// and one copy-out per run of datagrams instead of per datagram.
    public var coalesce = true
    public init(group: SocketAddress, interface: NetworkInterface?) { self.group = group; self.interface = interface }
}

/// A snapshot for the progress line.
public struct ReceiverProgress: Sendable {
    public var elapsed: Interval
    public var joined: Bool
    public var blocksDone: Int
    public var blocksTotal: Int
    public var payloadBytes: UInt64
    public var bytesReceived: UInt64
    public var blocksRepaired: UInt64
    /// Incomplete blocks moved to the spill file when the memory budget was full (P-5a).
    public var blocksSpilled: UInt64
    public var nacksSent: Int
    /// Datagrams refused, by reason (the core's counter names, without the "dropped." prefix).
    public var rejected: [(String, UInt64)]
    public var cpuSeconds: Double
}

/// How a receive ended.
public enum ReceiveOutcome: Sendable {
    /// Every block verified and durable: the bundle file (or, Specs/protocol.md P-29a,
    /// the payload staged as the component's `.partial` file) awaits step 2.
    case completed(StagingArea.Staged)
    case failed(Status.Reason, String)
    /// No session joined within the time allowed.
    case timedOut
    case stopped
}

/// Drives the sans-I/O `Receiver` on real sockets and a staging directory:
/// multicast in on the group socket, feedback out (and ACKs in) on a unicast
/// socket of its own, storage events to `StagingArea`.
public final class ReceiverDriver {
    public private(set) var receiver: Receiver
    public let staging: StagingArea
    public let groupSocket: UDPSocket
    public let feedbackSocket: UDPSocket
    public let grantedReceiveBuffer: Int
    private let spill: FileSpill
    /// Feedback goes here: the announce's source address, or the address it names.
    public private(set) var senderAddress: SocketAddress?
    private let endpoint: ReceiverEndpoint
    private let keys: DecryptionKeys
    /// Test and demo aid: drop this share of incoming DATA at random, to make repair visible.
    private let simulatedLoss: Double
    private var lossRandom: SeededRandom
    /// Data arrives coalesced where the kernel can (UDP GRO); feedback singly.
    private let groupIncoming: ReceiveBatch
    private let feedbackIncoming = ReceiveBatch(capacity: 16)
    /// Whether the group socket hands over coalesced datagrams (P-24a).
    public let coalescing: Bool
    /// Datagrams read from the group socket, and the messages they came in
    /// (fewer when the kernel coalesced them).
    public private(set) var groupDatagrams: UInt64 = 0
    public private(set) var groupMessages: UInt64 = 0
    private let outgoing = SendBatch(capacity: 16)
    private var received: UInt64 = 0
    /// The joined session's manifest (nil until the receiver joins one).
    private var manifest: Manifest? { receiver.manifest }
    private var startedAt = MonotonicClock.now()
    private let cpuAtStart = MonotonicClock.processCPUSeconds()
    private var lastReadAt: Instant?
    private var lastReadWasSparse = false
    public private(set) var resumedBlocks = 0
    /// Step 2 during the transfer (Specs/bundle.md B-15b), when asked for: each payload
    /// block is fed to it once it and every block before it are staged.
    public private(set) var verification: PayloadVerification?
    /// Why step 2 failed during the transfer; feeding stops, the transfer goes on, and
    /// the caller reports this instead of a verified bundle.
    public private(set) var verificationError: BundleError?
    private var verifyDuringTransfer = false
    private var verificationOutput: String?
    /// Why a journal found at start was not used, if it was not.
    public private(set) var resumeNote: String?

    public init(config: ReceiverConfig, endpoint: ReceiverEndpoint, staging: StagingArea, keys: DecryptionKeys,
                simulatedLoss: Double = 0, seed: UInt64 = 1) throws(TransportError) {
        guard endpoint.group.isMulticast else { throw TransportError(.invalidAddress, "\(endpoint.group) is not a multicast group") }
        self.endpoint = endpoint
        self.staging = staging
        self.keys = keys
        self.simulatedLoss = simulatedLoss
        lossRandom = SeededRandom(seed: seed ^ 0x5EED)
        // Specs/protocol.md P-20: resume from the journal when it names a bundle this device still accepts.
        var resume: ResumeState?
        let (journal, note) = staging.loadJournal()
        resumeNote = note
        if let journal {
            do {
                let verified = try ManifestVerifier.verify(envelope: journal.envelope, trust: config.trust, device: config.device)
                resume = staging.resumeState(journal: journal, manifest: verified.manifest)
                if resume == nil { resumeNote = "staging file does not match the journal; starting afresh" }
                resumedBlocks = resume?.progress.payloadBlocks.count ?? 0
            } catch { resumeNote = "journal's bundle is no longer acceptable (\(error.reason)); starting afresh" }
        }
        spill = try FileSpill(directory: staging.directory)
        receiver = Receiver(config: config, resume: resume, spill: spill, authReader: staging)

        groupSocket = try UDPSocket(family: endpoint.group.family)
        try groupSocket.allowAddressReuse()
        grantedReceiveBuffer = try groupSocket.setBuffers(receive: endpoint.receiveBufferBytes, send: 0).receive
        // Bound to the group address, so only this group's datagrams arrive.
        try groupSocket.bind(endpoint.group)
        try groupSocket.join(group: endpoint.group, on: endpoint.interface)
        coalescing = endpoint.coalesce && groupSocket.enableCoalescing()
        groupIncoming = coalescing ? ReceiveBatch(coalesced: true) : ReceiveBatch()
        feedbackSocket = try UDPSocket(family: endpoint.group.family)
        try feedbackSocket.bind(.any(endpoint.group.family, port: 0))
    }

    /// Runs step 2 during the transfer (Specs/bundle.md B-15b), writing the
    /// components into `outputDirectory`; call before `run`. When the run
    /// completes, `finishVerification()` gives the verified bundle.
    public func verifyDuringTransfer(outputDirectory: String?) {
        verifyDuringTransfer = true
        verificationOutput = outputDirectory
    }

    /// The final checks of step 2, once `run` has completed: releases the
    /// components if every check passes.
    public func finishVerification() throws(BundleError) -> VerifiedBundle {
        // `run` fed every staged block before it closed staging.
        guard let verification else { throw verificationError ?? BundleError(.io, "no verification ran during the transfer") }
        if let verificationError { throw verificationError }
        return try verification.finish()
    }

    /// Read-backs per loop turn: step 2 keeps pace without keeping the sockets
    /// waiting (about 1.4 MB, a few milliseconds of hashing and writing).
    static let verificationBlocksPerTurn = 16

    /// Whether step 2 has staged blocks waiting for it.
    private var verificationBacklog: Bool {
        guard let v = verification, verificationError == nil else { return false }
        return v.nextBlock < v.blockCount && receiver.isPayloadBlockDone(v.nextBlock)
    }

    /// Feeds step 2 the block just staged when it is the next one (from memory).
    private func feedVerification(stored block: Int, _ bytes: [UInt8]) {
        guard let v = verification, verificationError == nil, v.nextBlock == block else { return }
        consume(v, block: block, bytes)
    }

    /// Feeds step 2 up to `blockCountMax` staged blocks that are next in order, read back from staging.
    private func advanceVerification(blockCountMax: Int) throws(TransportError) {
        var fed = 0
        while fed < blockCountMax, verificationBacklog, let v = verification {
            let range = v.byteRange(ofBlock: v.nextBlock)
            consume(v, block: v.nextBlock, try staging.readPayload(offset: range.lowerBound, count: range.count))
            fed += 1
        }
    }

    private func consume(_ v: PayloadVerification, block: Int, _ bytes: [UInt8]) {
        let result = bytes.withUnsafeBytes { p in Result { () throws(BundleError) in try v.consume(block: block, bytes: p) } }
        if case .failure(let error) = result { verificationError = error }
    }

    /// Runs until the receiver is finished (complete or failed, final status
    /// acknowledged), `joinTimeout` passes without a session, or `shouldStop`.
    ///
    /// A validly signed announce that this device refuses (expired, other
    /// hardware, rollback) ends the run after `refusalGrace`, long enough to
    /// tell the sender a few times (one STATUS per announce); nil keeps
    /// listening for an acceptable session, as a device agent would.
    public func run(joinTimeout: Interval? = nil, refusalGrace: Interval? = .seconds(2.5), progressInterval: Interval = .milliseconds(250),
                    progress: (ReceiverProgress) -> Void = { _ in }, shouldStop: () -> Bool = { false }) throws(TransportError) -> ReceiveOutcome {
        startedAt = MonotonicClock.now()
        var nextProgress = startedAt
        let giveUpAt = joinTimeout.map { startedAt + $0 }
        var refusedAt: Instant?
        while !receiver.isFinished {
            if shouldStop() { return .stopped }
            let now = MonotonicClock.now()
            if manifest == nil, let giveUpAt, now >= giveUpAt { return .timedOut }
            if manifest == nil, let refusal = receiver.lastRefusal, let refusalGrace {
                if refusedAt == nil { refusedAt = now }
                if now >= refusedAt! + refusalGrace { return .failed(refusal.0, refusal.1) }
            }
            var wake = [receiver.nextDeadline, nextProgress, giveUpAt, refusedAt.map { $0 + (refusalGrace ?? .seconds(0)) }].compactMap { $0 }.min()!
            if wake < now { wake = now }
            // Step 2 has staged blocks to take: look at the sockets without waiting, then feed it.
            let backlog = verificationBacklog
            if backlog { wake = now }
            if !backlog, lastReadWasSparse, let last = lastReadAt, now < last + endpoint.readIntervalMin {
                let pause = min(last + endpoint.readIntervalMin, wake) - now
                if pause.microseconds > 0 { usleep(UInt32(pause.microseconds)) }
            }
            let ready = waitReadable([groupSocket, feedbackSocket], until: wake)
            lastReadAt = MonotonicClock.now()
            lastReadWasSparse = true
            for i in ready {
                if i == 0 { try drain(groupSocket, groupIncoming) } else { try drain(feedbackSocket, feedbackIncoming) }
            }
            let after = MonotonicClock.now()
            if let d = receiver.nextDeadline, after >= d {
                receiver.handleTimeout(at: after)
                try process()
            }
            try flushFeedback()
            do { try advanceVerification(blockCountMax: Self.verificationBlocksPerTurn) } catch {
                receiver.abort(.storage, error.reason, at: MonotonicClock.now())
            }
            if let failure = spill.failure, !receiver.isFinished, !receiver.isFailed {
                receiver.abort(.storage, failure.reason, at: after)
            }
            if after >= nextProgress {
                progress(snapshot(at: after))
                nextProgress = after + progressInterval
            }
        }
        progress(snapshot(at: MonotonicClock.now()))
        if receiver.isComplete {
            try advanceVerification(blockCountMax: Int.max)  // step 2 takes the rest while staging is open
            return .completed(try staging.finish())
        }
        let (reason, text) = receiver.failure ?? (.sessionClosed, "session ended")
        return .failed(reason, text)
    }

    private func drain(_ socket: UDPSocket, _ incoming: ReceiveBatch) throws(TransportError) {
        // Bounded per wake: timers and feedback get their turn under a flood.
        for _ in 0..<8 {
            guard try socket.receive(into: incoming) > 0 else { return }
            if socket === groupSocket { groupDatagrams += UInt64(incoming.count); groupMessages += UInt64(incoming.messageCount) }
            let now = MonotonicClock.now()
            for i in 0..<incoming.count {
                guard let bytes = incoming.datagram(i) else { continue }
                received += UInt64(bytes.count)
                // Before a session is joined, feedback (hello, refusal STATUS) goes to whoever
                // announces or sends data; the join pins it (Specs/protocol.md P-23). The kind is
                // checked first, so the per-datagram path does not ask the core about the join.
                if bytes.count > 1 {
                    if bytes[1] == Datagram.Kind.announce.rawValue, manifest == nil {
                        senderAddress = feedbackAddress(announce: bytes, source: incoming.source(i))
                    } else if senderAddress == nil && bytes[1] == Datagram.Kind.data.rawValue, manifest == nil {
                        senderAddress = incoming.source(i)
                    }
                }
                if simulatedLoss > 0, bytes.count > 1, bytes[1] == Datagram.Kind.data.rawValue, lossRandom.unit() < simulatedLoss { continue }
                receiver.handleDatagram(bytes, at: now)
                try process()
            }
            try flushFeedback()
            if incoming.messageCount < incoming.capacity / 2 { return }
            lastReadWasSparse = false
        }
    }

    /// Executes the core's storage events and queues its feedback.
    private func process() throws(TransportError) {
        while let e = receiver.pollEvent() {
            switch e {
            case .joined(_, let m):
                // The core verified the envelope; the manifest it verified answers the recipient check.
                do { try staging.prepare(envelope: receiver.envelope!, manifest: m) } catch {
                    receiver.abort(.storage, error.reason, at: MonotonicClock.now())
                    continue
                }
                do { try receiver.verifiedManifest!.checkRecipient(keys: keys) } catch {
                    receiver.abort(error.code == .notARecipient ? .notARecipient : .storage, error.reason, at: MonotonicClock.now())
                    continue
                }
                // A new session of the same bundle keeps the verification fed so far.
                if verifyDuringTransfer, verification?.verified.manifest.bundleID != m.bundleID {
                    verificationError = nil
                    do {
                        // Blocks resumed from the journal are read back as the loop turns.
                        // P-29a: a payload staged as the component file is only hashed here.
                        verification = try PayloadVerification(receiver.verifiedManifest!, keys: keys, outputDirectory: verificationOutput,
                                                               componentStaged: staging.payloadPath != nil)
                    } catch {
                        receiver.abort(.storage, error.reason, at: MonotonicClock.now())
                    }
                }
            case .store(let object, let block, let offset, let bytes):
                do {
                    try staging.store(object, offset: offset, bytes: bytes)
                    if object == .payload { feedVerification(stored: block, bytes) }
                } catch {
                    receiver.abort(.storage, error.reason, at: MonotonicClock.now())
                }
            case .commit(let journal):
                do { try staging.commit(journal) } catch { receiver.abort(.storage, error.reason, at: MonotonicClock.now()) }
            case .completed, .failed:
                break  // read from the receiver's state when the loop ends
            }
        }
        while let t = receiver.pollTransmit() {
            guard case .sender = t.destination, let to = senderAddress else { continue }
            if outgoing.isFull { try flushFeedback() }
            outgoing.append(t.bytes, to: to)
        }
    }

    private func flushFeedback() throws(TransportError) {
        guard outgoing.count > 0 else { return }
        // Feedback is best effort: what the kernel will not take now is dropped (the core repeats what matters).
        _ = try? feedbackSocket.send(outgoing)
        outgoing.removeFirst(outgoing.count)
    }

    /// Specs/protocol.md §3.1: address family 0 means "reply to the announce's source".
    private func feedbackAddress(announce bytes: [UInt8], source: SocketAddress) -> SocketAddress {
        guard case .announce(let a)? = try? Datagram(parsing: bytes) else { return source }
        switch a.feedbackFamily {
        case .sourceAddress: return source
        case .ipv4:
            let host = a.feedbackAddress.prefix(4).map(String.init).joined(separator: ".")
            return (try? SocketAddress(host: host, port: a.feedbackPort)) ?? source
        case .ipv6:
            let host = stride(from: 0, to: 16, by: 2).map { String(UInt16(a.feedbackAddress[$0]) << 8 | UInt16(a.feedbackAddress[$0 + 1]), radix: 16) }.joined(separator: ":")
            return (try? SocketAddress(host: host, port: a.feedbackPort)) ?? source
        }
    }

    public func snapshot(at now: Instant) -> ReceiverProgress {
        let total = manifest.map { BlockGeometry(payloadSize: $0.payload.size, profile: $0.transport).blockCount } ?? 0
        let rejected = receiver.counters.all.filter { $0.0.hasPrefix("dropped.") && $0.0 != "dropped.data.duplicate" && $0.0 != "dropped.data.blockDone" }
            .map { (String($0.0.dropFirst("dropped.".count)), $0.1) }
        return ReceiverProgress(elapsed: now - startedAt, joined: manifest != nil, blocksDone: receiver.blocksDone, blocksTotal: total,
                                payloadBytes: manifest?.payload.size ?? 0, bytesReceived: received,
                                blocksRepaired: receiver.counters["blocks.repaired"], blocksSpilled: receiver.blocksSpilled, nacksSent: receiver.nacksSent,
                                rejected: rejected, cpuSeconds: MonotonicClock.processCPUSeconds() - cpuAtStart)
    }
}
