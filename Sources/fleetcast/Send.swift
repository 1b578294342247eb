import ArgumentParser
import DeliveryCore
import FleetCrypto
import Foundation
import Transport
import UpdateBundle
import WireFormat

struct Send: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Broadcast a bundle to a fleet over UDP multicast (step B).",
        discussion: """
        Announces the signed manifest, multicasts the authentication chain and the payload \
        as FEC symbols at --rate, then serves repair in rounds for the receivers' NACKs until \
        every registered receiver reports done (or --deadline, or the fleet goes silent). \
        The sender needs no key: receivers verify everything. Feedback comes back by unicast \
        to this host's address and the socket's port (--bind, --feedback-port).

        A receiver counts as done only once it has verified the update (step 2: the payload \
        hash, decryption, the component hashes) and released it; until then it is \
        "received". Progress shows the round, the rate, the bytes sent against the payload, \
        and the receivers registered, received, verified and failed. --report writes a JSON \
        fleet report with each device's outcome (verified, failed with its reason, \
        received, receiving, slow, gone).

        To a fleet of device agents (`fleetcast agent run`), --await installed keeps the \
        session open until every device has written the update to its spare side and read \
        it back, and --await confirmed until every device has rebooted into it, passed its \
        health check and confirmed it, or rolled back (with the reason: unhealthy, did not \
        boot), or failed. Devices rebooting are silent for a while (up to 120 s each); the \
        deadline still bounds the session. The report lists each device's final state.

        Exit status: 0 every receiver reached the awaited state (verified, installed or \
        confirmed); 32 some receiver failed, rolled back or went silent, or none was heard at \
        all (unless --carousel); 33 network error; 10-21 bundle problems (see `fleetcast --help`).

        Examples:
          fleetcast send update.fcb --interface eth1 --rate 500M --min-receivers 16
          fleetcast send update.fcb --interface lo --report fleet.json
          fleetcast send update.fcb --interface br0 --min-receivers 4 --await confirmed --deadline 15m
        """
    )

    @Argument(help: "Bundle file (from `fleetcast pack`).")
    var bundle: String

    @OptionGroup var network: NetworkOptions

    @Option(help: "Local address to send from and take feedback on (default: any; 127.0.0.1 with --interface lo).")
    var bind: String?

    @Option(help: "Local UDP port for feedback (default: any free port).")
    var feedbackPort: UInt16 = 0

    @Option(help: "The sender key that signs this session's SESSION records (with --delegation): receivers then act on no forged or replayed ANNOUNCE, POLL or CLOSE (Specs/protocol.md P-31). Without it the session is UNAUTHENTICATED: fine in a closed lab, but anyone on the LAN can then steer its receivers.")
    var senderKey: String?

    @Option(help: "The vendor's delegation of --sender-key (`fleetcast delegate`).")
    var delegation: String?

    @Option(help: "Multicast TTL / hop limit (1 keeps packets on the LAN).")
    var ttl: Int = 1

    @Option(help: "Sending rate in bits/s of IP datagrams (IP and UDP headers included, Ethernet's not): 900M, 1G, 50M. About 975M fills a gigabit Ethernet link; a little above the link is fine, the socket waits.")
    var rate: String = "900M"

    @Option(help: "Proactive repair sent with the first pass, as a share of the source symbols (0-0.5).")
    var repair: Double = 0.05

    @Option(help: "Receivers expected: the session waits for this many to register before it may close idle.")
    var minReceivers: Int?

    @Option(help: "Stop serving after this long (90s, 15m, 1h). Default: until the fleet is done or silent, and at most 10 minutes plus 20 times the transfer's time at --rate, so that no feedback, genuine or forged, keeps the sender going for ever.")
    var deadline: String?

    @Option(name: .customLong("await"), help: "What every receiver must report before the session closes: verified (step 2 passed; plain receivers), installed or confirmed (device agents).")
    var awaitState: SenderConfig.Await = .verified

    @Flag(help: "Carousel: no feedback; cycle repair until --deadline (for receivers that cannot send).")
    var carousel = false

    @Option(help: "Write the JSON fleet report here.")
    var report: String?

    @Option(help: "Verify the bundle's signatures against this key before sending (PEM); repeatable.")
    var trustedKey: [String] = []

    @Flag(name: .customLong("no-gso"), help: "Send every datagram on its own instead of handing runs of them to the kernel to segment (UDP GSO; used by default, and dropped by itself where the path cannot).")
    var noGSO = false

    @Flag(help: "No progress line.")
    var quiet = false

    @Option(help: "Write a timeline here (the file is replaced): a tab-separated line every 50 ms (elapsed s, round, GRTT ms, data bytes sent, receivers registered, done, failed), for studying where a transfer's time goes.")
    var progressLog: String?

    func validate() throws {
        guard let bits = parseBitRate(rate) else { throw ValidationError("--rate wants a positive number with an optional k, M or G suffix (bits/s)") }
        guard (rateBitsPerSecondMin...rateBitsPerSecondMax).contains(bits) else {
            throw ValidationError("--rate \(rate) is outside 8k...100G bits/s")
        }
        guard (0...0.5).contains(repair) else { throw ValidationError("--repair must be between 0 and 0.5") }
        if let deadline, parseDuration(deadline) == nil { throw ValidationError("--deadline wants a duration such as 90s, 15m or 1h, at most 100y") }
        if carousel && deadline == nil { throw ValidationError("--carousel needs --deadline: without feedback the sender cannot know when the fleet is done") }
        guard (0...255).contains(ttl) else { throw ValidationError("--ttl must be 0...255") }
        guard (senderKey == nil) == (delegation == nil) else { throw ValidationError("--sender-key and --delegation go together") }
    }

    func run() throws {
        try reportingTransportFailures {
            installInterruptHandlers()  // Ctrl-C ends the loop: the report is still written
            let opened = try UnverifiedBundle(path: bundle)
            let manifest: Manifest
            if trustedKey.isEmpty {
                manifest = try opened.unverifiedContents().manifest
            } else {
                let trust = TrustPolicy(trustedKeys: try trustedKey.map(loadPublicKey))
                manifest = try opened.verifyManifest(trust: trust, device: DevicePolicy(now: currentUnixTime())).manifest
            }
            let group = try network.groupAddress()
            let interface = try network.networkInterface()
            let bindHost = bind ?? (network.interface == "lo" ? (group.family == .ipv6 ? "::1" : "127.0.0.1") : nil)
            let bindAddress = try bindHost.map { try SocketAddress(host: $0, port: feedbackPort) } ?? .any(group.family, port: feedbackPort)

            var config = SenderConfig(session: SessionID(UInt32(fromBytes: try SecureRandom.bytes(4)) | 1), rateBytesPerSecond: parseBitRate(rate)! / 8,
                                      cookieSecret: try SecureRandom.bytes(32))
            config.proactiveRepairFraction = repair
            config.carousel = carousel
            config.expectedReceivers = minReceivers
            config.await = awaitState
            config.deadline = deadline.flatMap(parseDuration).map { Interval.seconds(Double($0)) }
            if let senderKey, let delegation {
                let key = try loadPrivateKey(senderKey)
                let d = try SenderDelegation.load(delegation)
                guard d.senderKey.raw == key.publicKey.raw else {
                    throw BundleError(.invalidInput, "\(delegation) delegates key \(d.senderKey.keyID.hexString), not \(senderKey) (\(key.publicKey.keyID.hexString))")
                }
                if let why = d.permits(product: manifest.productID, at: currentUnixTime()) { throw BundleError(.invalidInput, "\(delegation): \(why)") }
                config.authentication = SenderAuthentication(key: key, delegation: d.encoded, chainLast: try SecureRandom.bytes(32))
            }
            let objects = try FileObjects(bundlePath: bundle, header: opened.header)
            let sender = Sender(config: config, envelope: opened.envelope, manifest: manifest, source: objects)
            var endpoint = SenderEndpoint(group: group, interface: interface, bindAddress: bindAddress)
            endpoint.ttl = ttl
            endpoint.segmentation = !noGSO
            let driver = try SenderDriver(sender: sender, objects: objects, endpoint: endpoint)
            if driver.grantedBuffers.send < endpoint.sendBufferBytes / 2 {
                printError("warning: the kernel granted a \(formatBytes(UInt64(driver.grantedBuffers.send))) send buffer (asked \(formatBytes(UInt64(endpoint.sendBufferBytes)))); raise net.core.wmem_max")
            }
            let from = driver.localAddress.map { "\($0)" } ?? "?"
            say("sending \(terminalSafe(manifest.productID)) \(terminalSafe(manifest.version)) (\(formatBytes(manifest.payload.size))) to \(group)\(interface.map { " on \($0)" } ?? "") from \(from), session \(config.session), \(rate)bit/s")
            if let a = config.authentication {
                say("session authenticated: SESSION records signed by sender key \(a.key.publicKey.keyID.hexString), feedback to \(driver.sender.feedbackAddress.map { "\($0)" } ?? "?")")
            } else {
                say("session UNAUTHENTICATED (no --sender-key): anyone on the LAN can forge its ANNOUNCE, POLL and CLOSE; receivers with --session-auth required ignore it")
            }

            let payload = manifest.payload.size
            let status = StatusLine(enabled: !quiet)
            let timeline = try progressLog.map { try TimelineLog(path: $0, header: "elapsed_s\tround\tgrtt_ms\tdata_bytes\tregistered\tdone\tfailed\treceived") }
            try driver.run(progressInterval: timeline == nil ? .milliseconds(250) : .milliseconds(50), progress: { p in
                timeline?.append(String(format: "%.3f\t%u\t%.1f\t%llu\t%d\t%d\t%d\t%d", p.elapsed.seconds, p.round, p.grtt.seconds * 1000,
                                        p.dataBytesSent, p.registered, p.verified, p.failed, p.received))
                status.show(String(format: "round %u (GRTT %.0f ms)  %@  sent %@ (%.2fx payload)  receivers %d: received %d, verified %d, failed %d",
                                   p.round, p.grtt.seconds * 1000, formatRate(p.dataBytesSent, p.elapsed.seconds), formatBytes(p.dataBytesSent),
                                   Double(p.dataBytesSent) / Double(max(payload, 1)), p.registered, p.received, p.verified, p.failed))
            }, shouldStop: { interrupted })
            status.finish()

            let now = MonotonicClock.now()
            let final = driver.snapshot(at: now)
            let fleet = driver.sender.fleet(at: now)
            let fleetReport = FleetReport(sender: driver, manifest: manifest, bundle: bundle, progress: final, fleet: fleet)
            if let report {
                let encoder = JSONEncoder()
                encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
                try encoder.encode(fleetReport).write(to: URL(fileURLWithPath: report))
            }
            let awaited = fleet.filter { $0.record.reached(awaitState) }.count
            let failed = fleet.filter { $0.standing == .failed || $0.standing == .rolledBack }.count
            say(String(format: "sent %@ in %.2f s (%@ goodput to the slowest), %.3fx payload on the wire%@; %d receiver(s): %d %@, %d failed or rolled back, %d incomplete",
                         formatBytes(payload), final.elapsed.seconds, formatRate(payload, fleetReport.secondsToAllDone ?? final.elapsed.seconds),
                         fleetReport.wireRatio, driver.socket.segmentation ? " (UDP GSO)" : "", fleet.count, awaited, awaitState.rawValue, failed,
                         fleet.count - awaited - failed))
            // With an agent fleet every device's final state is listed; otherwise the exceptions.
            for r in fleetReport.receivers where awaitState != .verified || r.outcome != FleetStanding.verified.rawValue {
                say("  \(terminalSafe(r.deviceID ?? r.receiverID)): \(r.outcome)\(r.failureReason.map { " (\($0))" } ?? "")")
            }
            if interrupted { throw ExitCode(130) }
            if fleet.isEmpty && !carousel {
                printError("no receiver was heard: nobody joined the session (check --interface, --group, --port, and that receivers trust the bundle's signer)")
                throw ExitCode(NetworkExit.incompleteFleet)
            }
            if awaited < fleet.count || awaited < (minReceivers ?? 0) { throw ExitCode(NetworkExit.incompleteFleet) }
        }
    }
}

/// The JSON fleet report written by `send --report`.
struct FleetReport: Encodable {
    struct Device: Encodable {
        var receiverID: String
        var deviceID: String?
        var versionBefore: String?
        var installedSequenceBefore: UInt64?
        /// verified, failed, received (every block in, no verdict heard), receiving, slow, gone;
        /// a device agent's installed, activating, confirmed, rolled back.
        var outcome: String
        var failureReason: String?
        var blocksDone: UInt32
        var blocksTotal: UInt32
        var bytesReceived: UInt64
        var nacksSent: UInt32
        /// From the first datagram heard to every block in, and to the verdict.
        var secondsToReceive: Double?
        var secondsToComplete: Double?
        /// To the awaited state beyond verified (installed; confirmed or rolled back).
        var secondsToSettle: Double?
    }
    var session: String
    var bundle: String
    var product: String
    var version: String
    var sequence: UInt64
    var payloadBytes: UInt64
    var seconds: Double
    var secondsToAllDone: Double?
    var dataBytesSent: UInt64
    var controlBytesSent: UInt64
    var feedbackBytesReceived: UInt64
    var wireRatio: Double
    var rounds: UInt32
    var grttMilliseconds: Double
    var senderCPUSeconds: Double
    /// Whether data left as segmentation-offload trains (UDP GSO) to the end (P-24a).
    var segmentationOffload: Bool
    /// Whether the session's SESSION records were signed by a delegated sender key (P-31).
    var authenticated: Bool
    var receivers: [Device]

    init(sender driver: SenderDriver, manifest: Manifest, bundle: String, progress p: SenderProgress,
         fleet: [(record: ReceiverRecord, standing: FleetStanding)]) {
        session = "\(driver.sender.config.session)"
        self.bundle = bundle
        product = manifest.productID
        version = manifest.version
        sequence = manifest.sequence
        payloadBytes = manifest.payload.size
        seconds = p.elapsed.seconds
        dataBytesSent = p.dataBytesSent
        segmentationOffload = driver.socket.segmentation
        authenticated = driver.sender.isAuthenticated
        controlBytesSent = p.controlBytesSent
        feedbackBytesReceived = p.feedbackBytesReceived
        wireRatio = Double(p.dataBytesSent) / Double(max(manifest.payload.size, 1))
        rounds = p.round
        grttMilliseconds = p.grtt.seconds * 1000
        senderCPUSeconds = p.cpuSeconds
        let awaiting = driver.sender.config.await
        let finishes = fleet.compactMap { awaiting == .verified ? $0.record.finishedAt : $0.record.settledAt }
        // From the session's start, not from the first REGISTER (receivers register after they join).
        if !fleet.isEmpty, finishes.count == fleet.count, let last = finishes.max() { secondsToAllDone = (last - driver.startedAt).seconds }
        receivers = fleet.map { r, standing in
            Device(receiverID: String(r.id.rawValue, radix: 16), deviceID: r.deviceID, versionBefore: r.versionBefore,
                   installedSequenceBefore: r.installedSequence, outcome: standing.rawValue,
                   failureReason: r.failureReason.map { "\($0)" }, blocksDone: r.blocksDone, blocksTotal: r.blocksTotal,
                   bytesReceived: r.bytesReceived, nacksSent: max(r.nacksReported, UInt32(r.nacksReceived)),
                   secondsToReceive: r.receivedAt.map { ($0 - r.firstHeard).seconds },
                   secondsToComplete: r.finishedAt.map { ($0 - r.firstHeard).seconds },
                   secondsToSettle: r.settledAt.map { ($0 - r.firstHeard).seconds })
        }
    }
}

extension SenderConfig.Await: ExpressibleByArgument {}

extension UInt32 {
    init(fromBytes b: [UInt8]) { self = b.prefix(4).reduce(0) { $0 << 8 | UInt32($1) } }
}

/// A one-line status on standard error, redrawn in place at most every 250 ms.
final class StatusLine {
    private let enabled: Bool
    private var width = 0
    init(enabled: Bool) { self.enabled = enabled && isatty(2) != 0 || enabled && ProcessInfo.processInfo.environment["FLEETCAST_PROGRESS"] != nil }
    func show(_ text: String) {
        guard enabled else { return }
        let padded = text.count < width ? text + String(repeating: " ", count: width - text.count) : text
        width = text.count
        FileHandle.standardError.write(Data("\r\(padded)".utf8))
    }
    func finish() { if enabled && width > 0 { FileHandle.standardError.write(Data("\n".utf8)) } }
}

/// `--progress-log`: one tab-separated line per progress tick, appended to a file,
/// so that a benchmark can see when each phase of a transfer happened.
final class TimelineLog {
    private let handle: FileHandle

    init(path: String, header: String) throws {
        guard FileManager.default.createFile(atPath: path, contents: Data((header + "\n").utf8)),
              let handle = FileHandle(forWritingAtPath: path) else {
            throw ValidationError("cannot write the progress log '\(path)'")
        }
        handle.seekToEndOfFile()
        self.handle = handle
    }

    func append(_ line: String) { handle.write(Data((line + "\n").utf8)) }

    deinit { try? handle.close() }
}

/// Set by SIGINT/SIGTERM so the loops end cleanly (the journal stays consistent).
nonisolated(unsafe) var interrupted = false

func installInterruptHandlers() {
    signal(SIGINT) { _ in interrupted = true }
    signal(SIGTERM) { _ in interrupted = true }
    // A parent may have started us with these blocked (the mask is inherited): a
    // daemon that systemd cannot stop with SIGTERM is no daemon.
    var set = sigset_t()
    sigemptyset(&set)
    sigaddset(&set, SIGINT)
    sigaddset(&set, SIGTERM)
    pthread_sigmask(SIG_UNBLOCK, &set, nil)
}
