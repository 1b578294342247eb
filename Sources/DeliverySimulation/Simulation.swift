import DeliveryCore
import FleetCrypto
import Foundation
import SeededRandom
import UpdateBundle
import WireFormat

/// A bundle built for simulation: packed once with a fixed key and seeded
/// randomness, held in memory.
public struct SimulationBundle: Sendable {
    public let envelope: [UInt8]
    public let manifest: Manifest
    public let authChain: [UInt8]
    public let payload: [UInt8]
    public let trustedKey: PublicKey
    public static let createdAt: UInt64 = 1_700_000_000
    public static let hardwareID = "sim-board"

    /// Packs `payloadBytes` of seeded bytes (stored, not compressed, so the payload has exactly that size).
    public static func make(payloadBytes: Int, seed: UInt64, sequence: UInt64 = 10,
                            profile: TransportProfile = Scenario.compactProfile, blocksPerSegment: Int? = nil) throws -> SimulationBundle {
        var rng = SeededRandom(seed: seed)
        let key = try PrivateKey(raw: [UInt8](repeating: 7, count: 32), algorithm: .ed25519)
        // Unique per call: tests pack the same size concurrently (with other segment lengths).
        let dir = NSTemporaryDirectory() + "fleetcast-sim-\(getpid())-\(seed)-\(sequence)-\(payloadBytes)-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let image = (0..<payloadBytes).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
        FileManager.default.createFile(atPath: dir + "/image", contents: Data(image))
        var request = PackRequest(productID: "sim", hardwareIDs: [hardwareID], version: "\(sequence).0", sequence: sequence,
                                  createdAt: createdAt, expiresAt: createdAt + 10 * 365 * 86_400,
                                  components: [.init(name: "image", path: dir + "/image", installTarget: "rootfs")], signingKeys: [key])
        request.compression = .none
        request.transport = profile
        request.blocksPerSegment = blocksPerSegment
        var packRNG = rng.split()
        let manifest = try Packer.pack(request, to: dir + "/bundle", random: { n in (0..<n).map { _ in UInt8(truncatingIfNeeded: packRNG.next()) } })
        let bundle = try UnverifiedBundle(path: dir + "/bundle")
        let bytes = [UInt8](FileManager.default.contents(atPath: dir + "/bundle")!)
        let payload = Array(bytes[Int(bundle.header.payloadOffset)..<Int(bundle.header.authOffset)])
        let auth = Array(bytes[Int(bundle.header.authOffset)...])
        return SimulationBundle(envelope: bundle.envelope, manifest: manifest, authChain: auth, payload: payload, trustedKey: key.publicKey)
    }
}

/// One receiver's situation in a scenario.
public struct ReceiverSpec: Sendable {
    public var downlink: LinkModel
    public var uplink: LinkModel
    /// When the device starts listening.
    public var joinAt = Interval(microseconds: 0)
    /// Power cuts (staged but unjournalled data is lost), each followed by a restart after `restartDelay`.
    public var powerLossAt: [Interval] = []
    public var restartDelay = Interval.milliseconds(50)
    /// Feedback sent before this time is lost: the receiver hears the session but the
    /// sender does not hear it, as when the sender's ARP replies are lost on the
    /// receiver's lossy downlink (Specs/protocol.md P-12).
    public var feedbackLostUntil: Interval?
    public init(downlink: LinkModel = .init(), uplink: LinkModel = .init(), joinAt: Interval = .init(microseconds: 0), powerLossAt: [Interval] = []) {
        self.downlink = downlink; self.uplink = uplink; self.joinAt = joinAt; self.powerLossAt = powerLossAt
    }
}

/// Everything that defines a run. With the seed, it replays exactly.
public struct Scenario: Sendable {
    /// The catalog's profile: scenario payloads are a few hundred KB so that a run takes
    /// milliseconds, and this profile's 90 KB blocks still give them several blocks and
    /// interleave windows. The product's default (280 KB blocks) is drawn by the sweep and
    /// used where payloads are large.
    public static let compactProfile = try! TransportProfile(symbolSize: 1400, sourceSymbolsPerBlock: 64, repairSymbolsPerBlock: 32)

    public var name: String
    public var seed: UInt64
    public var payloadBytes = 200_000
    public var profile = Scenario.compactProfile
    /// Nil: the packer's default for the profile (Specs/bundle.md §7.4).
    public var blocksPerSegment: Int?
    public var receivers: [ReceiverSpec]
    public var rateBytesPerSecond = 50_000_000.0
    public var proactiveRepairFraction = 0.05
    /// First-pass NACK epoch length, sender and receivers alike (Specs/protocol.md P-19a).
    public var nackEpochBlocks: Int?
    /// Receivers' P-18a promise lifetime; nil keeps the default.
    public var repairPromiseLifetimeGRTTs: Double?
    /// Every receiver loses the last symbol of each batch of NACKed repair (pending repair
    /// 0 after 1), so that the promise is never closed: the fault behind P-18a's lapse.
    public var dropsClosingRepair = false
    public var carousel = false
    public var deadline: Interval?
    /// The sender's wait for expected receivers still unheard (P-12); nil keeps the default.
    public var expectedReceiverWaitMax: Interval?
    /// Incomplete blocks a receiver holds in memory before spilling (Specs/protocol.md P-5a).
    public var blocksInMemoryMax: Int?
    /// Bytes of verified segments a receiver holds before they leave memory (P-5c).
    public var segmentBytesInMemoryMax: Int?
    /// Forged DATA datagrams per second, sprayed at every receiver with the real session ID.
    public var forgedDataPerSecond = 0.0
    /// Share of forged datagrams aimed at the auth-chain object (checked per symbol too, Specs/bundle.md B-13a).
    public var forgedAuthFraction = 0.0
    /// Replays a recorded older session (an older bundle, validly signed) at the receivers.
    public var replayOldSession = false
    /// The sender signs SESSION records with a delegated key and every receiver requires
    /// it (Specs/protocol.md P-31); the attacker then also forges POLLs and CLOSEs.
    public var authenticated = false
    public var timeLimit = Interval.seconds(120)
    /// Stated bound: data wire bytes <= factor x minimum, the minimum being object bytes / (1 - worst loss).
    public var wireFactorMax = 1.6
    /// Stated bound: feedback bytes <= this fraction of data bytes, plus a fixed
    /// allowance per receiver for its REGISTER, STATUS reports and their repeats.
    public var feedbackFractionMax = 0.05
    public var feedbackBytesPerReceiver = 1024.0

    public init(name: String, seed: UInt64, receivers: [ReceiverSpec]) {
        self.name = name; self.seed = seed; self.receivers = receivers
    }

    /// The command that replays this run, with whatever differs from the catalog's scenario.
    public var replayCommand: String {
        var command = "swift run -c release fleetcast simulate --scenario '\(name)' --seed \(seed)"
        let catalog = ScenarioCatalog.scenario(named: name, seed: seed)
        if payloadBytes != catalog?.payloadBytes { command += " --payload-bytes \(payloadBytes)" }
        if profile != catalog?.profile {
            command += " --symbols-per-block \(profile.sourceSymbolsPerBlock) --repair \(profile.repairSymbolsPerBlock)"
        }
        return command
    }
}

/// What a run produced, and which invariants it broke.
public struct SimulationResult: Sendable, CustomStringConvertible {
    public var scenario: String
    public var seed: UInt64
    public var receiverCount: Int
    public var completed: [Bool]
    public var completionTimes: [Interval?]
    public var restarts = 0
    /// Data-carrying bytes the sender multicast (source + repair), with headers.
    public var dataWireBytes: UInt64 = 0
    public var controlWireBytes: UInt64 = 0
    public var feedbackWireBytes: UInt64 = 0
    public var nackWireBytes: UInt64 = 0
    /// Bytes of the two objects (payload and auth chain), without headers.
    public var objectBytes: UInt64 = 0
    public var payloadBytes: UInt64 = 0
    public var worstLoss = 0.0
    public var duration = Interval(microseconds: 0)
    public var senderStats = SenderStats()
    /// The sum over every receiver's last incarnation.
    public var receiverStats = ReceiverStats()
    public var violations: [String] = []
    public var replayCommand = ""
    /// SHA-256 (hex, first 16 bytes) over every datagram delivered (when, to whom, the
    /// bytes) and every storage event a receiver emitted, in order: two runs with equal
    /// digests behaved identically on the wire and on disk. Refactors of the cores are
    /// checked with it (`fleetcast simulate --digests`).
    public var traceDigest = ""

    /// The information-theoretic minimum: the object bytes over the fraction the worst receiver's link let through.
    public var idealWireBytes: Double {
        Double(objectBytes) / (1 - worstLoss)
    }
    public var wireRatio: Double { Double(dataWireBytes) / Double(payloadBytes) }
    public var nackRatio: Double { Double(nackWireBytes) / Double(payloadBytes) }

    public var description: String {
        let done = completed.filter { $0 }.count
        var s = "\(scenario) seed=\(seed): \(done)/\(receiverCount) complete in \(String(format: "%.3f", duration.seconds)) s; "
        s += "data \(dataWireBytes) B (\(String(format: "%.3f", Double(dataWireBytes) / idealWireBytes))x ideal), feedback \(feedbackWireBytes) B (NACK \(String(format: "%.4f", nackRatio)) of payload); restarts \(restarts)"
        if !violations.isEmpty { s += "\n  VIOLATIONS:\n    " + violations.prefix(10).joined(separator: "\n    ") + "\n  replay: \(replayCommand)" }
        return s
    }
}

/// A deterministic discrete-event run of one sender and N receivers
/// (Specs/protocol.md), on virtual time, with faults from the scenario and
/// randomness from its seed. The production state machines run unchanged.
public final class Simulation {
    /// The pending-repair count of the sender's latest DATA per payload block (`dropsClosingRepair`).
    private var lastPendingRepair: [UInt32: UInt16] = [:]
    enum Event {
        case senderWake
        case deliverToReceiver(Int, [UInt8], from: PeerAddress)
        case deliverToSender(Int, [UInt8])
        case receiverWake(Int)
        case join(Int)
        case powerLoss(Int)
        case restart(Int)
        case attack
        case replay(Int)
    }

    /// A receiver's durable and volatile storage (Specs/protocol.md P-20).
    struct Storage {
        var journal: ProgressJournal?
        let auth: AuthStorage
        var storedPayloadBlocks = Set<Int>()
    }

    /// Auth-chain blocks a node stored, durable (journalled) and not yet, and the
    /// receiver's `AuthChainReader` over them (P-5c). A class, so that the receiver can
    /// read it while the node holding it is being mutated.
    final class AuthStorage: AuthChainReader {
        var durable: [Int: [UInt8]] = [:]
        var volatile: [Int: [UInt8]] = [:]
        let blockBytes: UInt64
        init(blockBytes: Int) { self.blockBytes = UInt64(blockBytes) }

        /// Either kind of block serves: a power cut resets the receiver too.
        func readAuthChain(offset: UInt64, count: Int) -> [UInt8]? {
            var out: [UInt8] = []
            out.reserveCapacity(count)
            var at = offset
            while out.count < count {
                let b = Int(at / blockBytes)
                guard let block = volatile[b] ?? durable[b] else { return nil }
                let start = Int(at - UInt64(b) * blockBytes)
                guard start < block.count else { return nil }
                let n = min(block.count - start, count - out.count)
                out += block[start..<(start + n)]
                at += UInt64(n)
            }
            return out
        }
    }

    struct Node {
        var spec: ReceiverSpec
        var receiver: Receiver?
        var down: LinkState
        var up: LinkState
        var storage: Storage
        var wake: Instant?
        var completedAt: Instant?
        var journalledAtRestart: Set<Int> = []
        var incarnation = 0
        /// Joined at least once (a node that has not started yet is not finished).
        var started = false
    }

    public let scenario: Scenario
    let bundle: SimulationBundle
    let oldSession: [[UInt8]]
    var rng: SeededRandom
    var queue = EventQueue<Event>()
    var now = Instant.zero
    var sender: Sender
    var senderWake: Instant?
    var nodes: [Node]
    var result: SimulationResult
    let session: SessionID
    /// Which node an address is (the sender's ACKs go by address).
    let nodeIndex: [PeerAddress: Int]
    /// Hashes the run's observable behaviour (`SimulationResult.traceDigest`).
    private var trace = SHA256()

    private func record(_ tag: UInt8, _ node: Int, _ bytes: [UInt8] = []) {
        var header: [UInt8] = [tag]
        for shift in stride(from: 56, through: 0, by: -8) { header.append(UInt8(truncatingIfNeeded: now.microseconds >> UInt64(shift))) }
        header += [UInt8(truncatingIfNeeded: node >> 8), UInt8(truncatingIfNeeded: node), UInt8(truncatingIfNeeded: bytes.count >> 16),
                   UInt8(truncatingIfNeeded: bytes.count >> 8), UInt8(truncatingIfNeeded: bytes.count)]
        trace.update(header)
        trace.update(bytes)
        if Simulation.dump { print("T \(tag) \(now) n\(node) \(bytes.count) \(bytes.map { String($0, radix: 16) }.joined(separator: ","))") }
    }
    nonisolated(unsafe) static let dump = ProcessInfo.processInfo.environment["FLEETCAST_SIM_DUMP"] != nil

    public init(scenario: Scenario, bundle: SimulationBundle, oldSession: [[UInt8]] = []) {
        precondition(bundle.manifest.transport == scenario.profile, "the bundle was packed with another profile than the scenario's")
        precondition(bundle.manifest.authentication.blocksPerSegment == scenario.blocksPerSegment ?? AuthChainLayout.defaultBlocksPerSegment(scenario.profile),
                     "the bundle was packed with other segments than the scenario's")
        self.scenario = scenario
        self.bundle = bundle
        self.oldSession = oldSession
        rng = SeededRandom(seed: scenario.seed)
        session = SessionID(UInt32(truncatingIfNeeded: rng.next()) | 1)
        // The cookie key comes from the seed too: a run stays a function of its seed.
        var cookieSecret: [UInt8] = []
        for _ in 0..<4 { let word = rng.next(); cookieSecret += (0..<8).map { UInt8(truncatingIfNeeded: word >> (8 * UInt64($0))) } }
        var config = SenderConfig(session: session, rateBytesPerSecond: scenario.rateBytesPerSecond, cookieSecret: cookieSecret)
        config.proactiveRepairFraction = scenario.proactiveRepairFraction
        config.nackEpochBlocks = scenario.nackEpochBlocks
        config.carousel = scenario.carousel
        config.deadline = scenario.deadline
        config.expectedReceivers = scenario.receivers.filter { !$0.downlink.isDead }.count
        if let wait = scenario.expectedReceiverWaitMax { config.expectedReceiverWaitMax = wait }
        config.grttInitial = Interval.milliseconds(2)
        config.announceInterval = Interval.milliseconds(200)
        if scenario.authenticated {
            // The vendor's key is the bundle's (SimulationBundle.make); the sender key and the
            // chain's last value come from the seed.
            let vendor = try! PrivateKey(raw: [UInt8](repeating: 7, count: 32), algorithm: .ed25519)
            var raw: [UInt8] = [], chainLast: [UInt8] = []
            for _ in 0..<4 { let w = rng.next(); raw += (0..<8).map { UInt8(truncatingIfNeeded: w >> (8 * UInt64($0))) } }
            for _ in 0..<4 { let w = rng.next(); chainLast += (0..<8).map { UInt8(truncatingIfNeeded: w >> (8 * UInt64($0))) } }
            let key = try! PrivateKey(raw: raw, algorithm: .ed25519)
            let delegation = try! SenderDelegation.make(senderKey: key.publicKey, signer: vendor, notBefore: 0, expires: 300 * 86_400)
            config.authentication = SenderAuthentication(key: key, delegation: delegation.encoded, chainLast: chainLast)
            config.feedbackAddress = Self.senderAddress
        }
        sender = Sender(config: config, envelope: bundle.envelope, manifest: bundle.manifest,
                        source: InMemoryObjects(authChain: bundle.authChain, payload: bundle.payload))
        nodeIndex = Dictionary(uniqueKeysWithValues: scenario.receivers.indices.map { (Self.address(ofReceiver: $0), $0) })
        nodes = scenario.receivers.map {
            Node(spec: $0, down: LinkState(model: $0.downlink), up: LinkState(model: $0.uplink),
                 storage: Storage(auth: AuthStorage(blockBytes: scenario.profile.blockByteCount)))
        }
        result = SimulationResult(scenario: scenario.name, seed: scenario.seed, receiverCount: scenario.receivers.count,
                                  completed: [Bool](repeating: false, count: scenario.receivers.count),
                                  completionTimes: [Interval?](repeating: nil, count: scenario.receivers.count))
        result.replayCommand = scenario.replayCommand
        result.payloadBytes = UInt64(bundle.payload.count)
        result.objectBytes = UInt64(bundle.payload.count + bundle.authChain.count)
        result.worstLoss = 0
    }

    /// Every simulated device: the bundle's hardware, sequence 9 installed, the clock just after the bundle was made.
    public static let devicePolicy = DevicePolicy(now: SimulationBundle.createdAt + 1, hardwareID: SimulationBundle.hardwareID, installedSequence: 9)

    /// The sender's address and each receiver's, in 198.18.0.0/15 (addresses route
    /// nothing here: every receiver's feedback reaches the one sender).
    static let senderAddress = PeerAddress.benchmark(1)
    static func address(ofReceiver i: Int) -> PeerAddress { .benchmark(UInt16(i + 2)) }
    /// Forged and replayed traffic comes from here.
    static let attackerAddress = PeerAddress.benchmark(0xFFFF)

    func receiverConfig(_ i: Int) -> ReceiverConfig {
        var c = ReceiverConfig(receiverID: ReceiverID(UInt64(i + 1)), deviceID: "device-\(i)", installedVersion: "9.0", installedSequence: 9,
                               trust: TrustPolicy(trustedKeys: [bundle.trustedKey]),
                               seed: scenario.seed &+ UInt64(i) &* 0x9E37_79B9 &+ UInt64(nodes[i].incarnation) << 48)
        c.commitBlockCount = 4
        c.blocksInMemoryMax = scenario.blocksInMemoryMax
        if let budget = scenario.segmentBytesInMemoryMax { c.segmentBytesInMemoryMax = budget }
        c.nackEpochBlocks = scenario.nackEpochBlocks
        if let lifetime = scenario.repairPromiseLifetimeGRTTs { c.repairPromiseLifetimeGRTTs = lifetime }
        c.inactivityTimeout = Interval.seconds(3)
        c.statusInterval = Interval.milliseconds(500)
        if scenario.authenticated { c.sessionAuthentication = .required }
        return c
    }

    /// Runs to the end: the sender finished and every receiver settled, or the time limit.
    public func run() -> SimulationResult {
        // The replayed old session starts first, so receivers meet it before the real one.
        if scenario.replayOldSession && !oldSession.isEmpty { queue.push(now, .replay(0)) }
        queue.push(now, .senderWake)
        for (i, node) in nodes.enumerated() {
            queue.push(Instant.zero + node.spec.joinAt, .join(i))
            for cut in node.spec.powerLossAt { queue.push(Instant.zero + cut, .powerLoss(i)) }
        }
        if scenario.forgedDataPerSecond > 0 { queue.push(Instant(microseconds: 1000), .attack) }
        let limit = Instant.zero + scenario.timeLimit
        var steps = 0
        while let (t, event) = queue.pop() {
            steps += 1
            if steps % 200_000 == 0, ProcessInfo.processInfo.environment["FLEETCAST_SIM_TRACE"] != nil {
                print("sim step \(steps) t=\(t) queue=\(queue.count) event=\(event)")
            }
            if t > limit { result.violations.append("time limit \(scenario.timeLimit.seconds) s reached"); break }
            now = t
            handle(event)
            if sender.isFinished && nodes.allSatisfy({ $0.receiver?.isFinished ?? ($0.spec.downlink.isDead || $0.started) }) { break }
        }
        finish()
        return result
    }

    private func handle(_ event: Event) {
        switch event {
        case .senderWake:
            if senderWake == now { senderWake = nil }
            driveSender()
        case .deliverToReceiver(let i, let bytes, let source):
            guard nodes[i].receiver != nil else { return }
            record(1, i, bytes)
            nodes[i].receiver!.handleDatagram(bytes, from: source, at: now)
            drainReceiver(i)
        case .deliverToSender(let i, let bytes):
            record(2, i, bytes)
            sender.handleDatagram(bytes, from: Self.address(ofReceiver: i), at: now)
            driveSender()
        case .receiverWake(let i):
            guard nodes[i].receiver != nil else { return }
            if nodes[i].wake == now { nodes[i].wake = nil }
            nodes[i].receiver!.handleTimeout(at: now)
            drainReceiver(i)
        case .join(let i):
            start(i)
        case .powerLoss(let i):
            guard nodes[i].receiver != nil, !(nodes[i].receiver!.isComplete) else { return }
            nodes[i].receiver = nil
            nodes[i].wake = nil
            nodes[i].storage.auth.volatile = [:]
            result.restarts += 1
            queue.push(now + nodes[i].spec.restartDelay, .restart(i))
        case .restart(let i):
            nodes[i].incarnation += 1
            start(i)
        case .attack:
            // Forged DATA with the real session ID, a valid-looking header and random bytes.
            let object: ObjectID = rng.unit() < scenario.forgedAuthFraction ? .authChain : .payload
            let blocks = object == .payload ? BlockGeometry(payloadSize: UInt64(bundle.payload.count), profile: scenario.profile).blockCount
                : BlockGeometry(payloadSize: UInt64(bundle.authChain.count), profile: scenario.profile).blockCount
            let symbol = (0..<scenario.profile.symbolSize).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            // One forgery in ten is a CLOSE, which must not end a live session (Specs/protocol.md P-13a);
            // in an authenticated session one more in ten is a POLL, with a made-up chain value (P-31b).
            // (Keyless runs draw exactly what they drew before authenticated ones existed.)
            let kind = rng.next() % 10
            func chainValue() -> [UInt8] { (0..<SessionRecord.chainValueByteCount).map { _ in UInt8(truncatingIfNeeded: rng.next()) } }
            let forged = kind == 0 ? Datagram.close(scenario.authenticated
                ? Close(session: session, reason: .aborted, round: UInt32(1 + rng.next() % 8), chainValue: chainValue())
                : Close(session: session, reason: .aborted)).encoded()
                : kind == 1 && scenario.authenticated
                ? Datagram.poll(Poll(session: session, round: UInt32(1 + rng.next() % 8), sentAtMicroseconds: rng.next() % 1_000_000,
                                     grttMicroseconds: UInt32(100 + rng.next() % 2_000_000), groupSize: 1, chainValue: chainValue())).encoded()
                : Datagram.data(DataSymbol(session: session, object: object, block: UInt32(rng.next() % UInt64(max(blocks, 1))),
                                           symbolIndex: UInt8(rng.next() % UInt64(scenario.profile.sourceSymbolsPerBlock)), symbol: symbol)).encoded()
            for i in nodes.indices { deliver(forged, to: i, from: Self.attackerAddress) }
            queue.push(now + Interval(microseconds: UInt64(1e6 / scenario.forgedDataPerSecond)), .attack)
        case .replay(let n):
            for i in nodes.indices { deliver(oldSession[n], to: i, from: Self.attackerAddress) }
            if n + 1 < oldSession.count { queue.push(now + Interval(microseconds: 20), .replay(n + 1)) }
        }
    }

    private func start(_ i: Int) {
        let resume: ResumeState? = nodes[i].storage.journal.map { journal in
            ResumeState(progress: journal, authBlockBytes: nodes[i].storage.auth.durable.filter { journal.authBlocks.contains($0.key) })
        }
        nodes[i].journalledAtRestart = Set(resume?.progress.payloadBlocks ?? [])
        nodes[i].storage.storedPayloadBlocks = []
        nodes[i].receiver = Receiver(config: receiverConfig(i), resume: resume, authReader: nodes[i].storage.auth)
        nodes[i].started = true
    }

    /// `Scenario.dropsClosingRepair`: is this the last symbol of a batch of NACKed repair
    /// (pending 0 right after pending 1 for the same block)? Tracks the sender's stream.
    private func closesRepairBatch(_ bytes: [UInt8]) -> Bool {
        guard case .data(let d)? = try? Datagram(parsing: bytes), d.object == .payload else { return false }
        let previous = lastPendingRepair.updateValue(d.pendingRepair, forKey: d.block)
        return d.pendingRepair == 0 && previous == 1
    }

    private func deliver(_ bytes: [UInt8], to i: Int, from source: PeerAddress = Simulation.senderAddress) {
        for (delay, corrupt) in nodes[i].down.transmit(&rng) {
            var b = bytes
            if corrupt { b[Int(rng.next() % UInt64(b.count))] ^= UInt8(1 << (rng.next() % 8)) }
            queue.push(now + delay, .deliverToReceiver(i, b, from: source))
        }
    }

    private func driveSender() {
        sender.handleTimeout(at: now)
        var sent = 0
        while let t = sender.pollTransmit(at: now) {
            sent += 1
            switch t.destination {
            case .group:
                if scenario.dropsClosingRepair && closesRepairBatch(t.bytes) { continue }
                for i in nodes.indices { deliver(t.bytes, to: i) }
            case .peer(let address):
                if let i = nodeIndex[address] { deliver(t.bytes, to: i) }
            }
            if sent > 10_000 { break }  // bounded per wake; the rest on the next wake
        }
        if let next = sender.nextDeadline(at: now) {
            let at = max(next, now + Interval(microseconds: 1))
            if senderWake == nil || at < senderWake! {
                senderWake = at
                queue.push(at, .senderWake)
            }
        }
    }

    private func drainReceiver(_ i: Int) {
        guard var r = nodes[i].receiver else { return }
        // Actions can queue datagrams (accepting an offer sends REGISTER) and datagrams
        // none: carry both out until neither is left.
        var more = true
        while more {
            more = false
            while let t = r.pollTransmit() {
                more = true
                // Every receiver datagram is feedback for the one sender, whatever address the
                // (possibly forged) announce named.
                guard case .peer = t.destination else { continue }
                // Feedback that cannot reach the sender is left out of the feedback bound,
                // which is about what a sender hears: an unheard receiver NACKs after every
                // POLL, as it should, and the sender's idle rounds are short.
                if let until = nodes[i].spec.feedbackLostUntil, now < Instant.zero + until { continue }
                result.feedbackWireBytes += UInt64(t.bytes.count + 28)
                if t.bytes.count > 1 && t.bytes[1] == Datagram.Kind.nack.rawValue { result.nackWireBytes += UInt64(t.bytes.count + 28) }
                for (delay, corrupt) in nodes[i].up.transmit(&rng) {
                    var b = t.bytes
                    if corrupt { b[Int(rng.next() % UInt64(b.count))] ^= 0x10 }
                    queue.push(now + delay, .deliverToSender(i, b))
                }
            }
            while let a = r.pollAction() {
                more = true
                apply(a, to: &r, node: i)
            }
        }
        nodes[i].receiver = r
        if let next = r.nextDeadline {
            let at = max(next, now + Interval(microseconds: 1))
            if nodes[i].wake == nil || at < nodes[i].wake! || nodes[i].wake! < now {
                nodes[i].wake = at
                queue.push(at, .receiverWake(i))
            }
        }
    }

    /// Carries out a receiver's actions as a device would, and checks the invariants
    /// on everything it accepts: offers are judged by `devicePolicy`, storage is
    /// memory that a power cut clears down to the last commit, and step 2's verdict
    /// comes at once (the bytes were checked as they were stored).
    private func apply(_ action: ReceiverAction, to r: inout Receiver, node i: Int) {
        switch action {
        case .offer(let offer):
            do {
                let verified = try offer.manifest.admit(under: Self.devicePolicy)
                record(3, i)
                if verified.manifest != bundle.manifest { result.violations.append("receiver \(i) joined a session with another manifest (sequence \(verified.manifest.sequence))") }
                r.accept(verified, at: now)
            } catch {
                r.decline(Status.Reason(refusing: error), error.reason, at: now)
            }
        case .store(let object, let block, let offset, let bytes):
            record(4, i, [object.rawValue] + withUnsafeBytes(of: UInt64(block).bigEndian, Array.init) + withUnsafeBytes(of: offset.bigEndian, Array.init))
            let truth = object == .payload ? bundle.payload : bundle.authChain
            let end = Int(offset) + bytes.count
            if end > truth.count || Array(truth[Int(offset)..<end]) != bytes {
                result.violations.append("receiver \(i) accepted wrong bytes for \(object) block \(block)")
            }
            if object == .payload {
                if nodes[i].journalledAtRestart.contains(block) {
                    result.violations.append("receiver \(i) fetched journalled block \(block) again after a restart")
                }
                nodes[i].storage.storedPayloadBlocks.insert(block)
            } else {
                nodes[i].storage.auth.volatile[block] = bytes
            }
            r.handleStored(object, block: block)
        case .commit(let progress):
            record(5, i, progress.authBlocks.flatMap { withUnsafeBytes(of: UInt32($0).bigEndian, Array.init) } + [0xFF]
                   + progress.payloadBlocks.flatMap { withUnsafeBytes(of: UInt32($0).bigEndian, Array.init) })
            // fsync, then the atomic journal write.
            nodes[i].storage.auth.durable.merge(nodes[i].storage.auth.volatile) { $1 }
            nodes[i].storage.auth.volatile = [:]
            nodes[i].storage.journal = progress
        case .verify:
            record(6, i)
            nodes[i].completedAt = now
            r.handleVerdict(.verified, at: now)
        case .failed(let reason, let text):
            record(7, i, [reason.rawValue])
            if !nodes[i].spec.downlink.isDead { result.violations.append("receiver \(i) failed: \(reason) \(text)") }
        }
    }


    private func finish() {
        result.duration = now - .zero
        result.traceDigest = trace.finalize().prefix(16).hexString
        // The worst receiver's realized loss rate sets the minimum (the issue's definition).
        result.worstLoss = nodes.filter { !$0.spec.downlink.isDead }.map { $0.down.realizedLoss }.max() ?? 0
        for (i, node) in nodes.enumerated() {
            result.completed[i] = node.receiver?.isComplete ?? false
            result.completionTimes[i] = node.completedAt.map { $0 - .zero }
            if !node.spec.downlink.isDead && !result.completed[i] {
                result.violations.append("receiver \(i) (\(node.spec.downlink)) did not complete: \(node.receiver?.blocksDone ?? 0)/\(sender.totalBlocks) blocks; \(node.receiver?.stats.description ?? "not running")")
            }
            if let r = node.receiver, r.isComplete, r.authSegmentsHeld > 0 {
                result.violations.append("receiver \(i) completed but holds \(r.authSegmentsHeld) auth segments (P-5b)")
            }
            if let r = node.receiver { result.receiverStats = result.receiverStats + r.stats }
        }
        if ProcessInfo.processInfo.environment["FLEETCAST_SIM_TRACE"] != nil,
           let last = nodes.indices.max(by: { (nodes[$0].completedAt ?? .zero) < (nodes[$1].completedAt ?? .zero) }) {
            print("last to complete: receiver \(last) at \(nodes[last].completedAt ?? .zero): \(nodes[last].receiver?.stats.description ?? "-")")
        }
        // The fleet report must count every receiver that completed: a sender that
        // closed without hearing one reports it missing (Specs/protocol.md P-12).
        if sender.isFinished, !scenario.carousel, scenario.deadline == nil {
            let done = Set(sender.receivers.values.filter { $0.state == .verified }.map(\.id))
            for i in nodes.indices where result.completed[i] {
                if !done.contains(ReceiverID(UInt64(i + 1))) {
                    result.violations.append("receiver \(i) completed but the sender closed without counting it done")
                }
            }
        }
        // Every symbol of both objects is checked on arrival (Specs/protocol.md P-5, Specs/bundle.md
        // B-13a): no forged or corrupted one reaches a decoder, so no segment fails its hash and
        // no rebuilt block its tags. (Format 1 chains failed segments under forged chain symbols.)
        if result.receiverStats.segmentFailures > 0 || result.receiverStats.rebuiltTagFailures > 0 {
            result.violations.append("an unauthenticated symbol reached a decoder: \(result.receiverStats.segmentFailures) segment(s) failed their hash, \(result.receiverStats.rebuiltTagFailures) rebuilt block(s) their tags")
        }
        result.senderStats = sender.stats
        result.dataWireBytes = sender.stats.dataBytes
        result.controlWireBytes = sender.stats.controlBytes
        if !scenario.carousel && !nodes.isEmpty && result.completed.contains(true) {
            let ratio = Double(result.dataWireBytes) / result.idealWireBytes
            if ratio > scenario.wireFactorMax {
                result.violations.append("data wire bytes \(String(format: "%.3f", ratio))x the minimum, bound \(scenario.wireFactorMax)")
            }
            let allowed = scenario.feedbackFractionMax * Double(result.dataWireBytes) + scenario.feedbackBytesPerReceiver * Double(nodes.count)
            if Double(result.feedbackWireBytes) > allowed {
                result.violations.append("feedback \(result.feedbackWireBytes) B exceeds \(scenario.feedbackFractionMax) of data + \(Int(scenario.feedbackBytesPerReceiver)) B per receiver (\(Int(allowed)) B)")
            }
        }
    }
}
