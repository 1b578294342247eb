import ArgumentParser
import DeliveryCore
import DeviceAgent
import FleetCrypto
import Foundation
import Transport
import UpdateBundle
import WireFormat

struct Receive: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Receive a bundle from a multicast session, verify it, and keep it (steps 1 and 2).",
        discussion: """
        Joins the group and waits for an announce whose manifest verifies against the trusted \
        keys. Each such announce is judged against this device's policy at that moment \
        (hardware, product, anti-rollback, expiry by the current time), whether the device's \
        keys open it, and whether staging has room; anything else is refused, and the sender \
        told why, before a byte is stored. Every arriving symbol is checked against the signed \
        authentication chain; missing symbols are NACKed by unicast. Verified blocks go to \
        --staging-dir with a journal, so a killed receiver resumes where it stopped.

        Step 2 runs as blocks arrive: the whole payload is hashed against the manifest, \
        decrypted and decompressed, and the components are released into --output-dir only \
        when every check has passed and the manifest has not expired meanwhile. Only then \
        does the sender hear that this device is complete; a failed step 2 reaches the \
        sender's fleet report as failed, with its reason. With --output-dir alone, a bundle \
        whose only component is its plain payload is not kept: the payload is staged as the \
        component file and released by a rename once its hash matches, so it is written once \
        (--keep-bundle keeps it).

        Staging and output files are opened without following symbolic links, temporaries \
        are created exclusively, and a staging directory that another user owns or may \
        write is refused. Released components have mode --component-mode (0600).

        Exit status: 0 verified; 13 expired; 14 incompatible hardware; 15 rollback; 17 a \
        hash or size differs; 18 not a recipient; 19 decryption failed; 20 storage; 30 no \
        session within --timeout; 31 the session ended before this device completed; 33 \
        network error.

        Example:
          fleetcast receive --interface eth1 --trusted-key vendor.pub \\
              --hardware-id board-7 --installed-sequence 41 \\
              --device-key device.key --output-dir /var/lib/update
        """
    )

    @OptionGroup var network: NetworkOptions

    @OptionGroup var deviceOptions: DeviceOptions

    @Option(help: "Installed version, reported to the sender.")
    var installedVersion: String = "unknown"

    @Option(help: "This device's name in the sender's fleet report (default: the host name). The receiver's ID on the wire is random, made once and kept in the staging directory.")
    var deviceID: String?

    @Option(help: "Directory for staged blocks, the resume journal and the receiver ID (created 0700; refused if another user owns it or may write it).")
    var stagingDir: String = "fleetcast-staging"

    @Option(help: "Where to leave the verified bundle (default: <staging-dir>/bundle).")
    var bundleOut: String?

    @Flag(help: "Keep the verified bundle in <staging-dir>/bundle even with --output-dir. Without it (and without --bundle-out), a bundle whose only component is its plain payload is staged straight into the component file, so every byte is written once, and no bundle is kept.")
    var keepBundle = false

    @Option(help: "Memory for incomplete blocks, in bytes with an optional k, M or G suffix; beyond it they wait in a scratch file next to the staged bundle (Specs/protocol.md P-5a). More avoids that disk traffic under heavy loss; the rest of the receiver needs about 40 MiB.")
    var blockMemory: String = "8.6M"

    @Option(help: "With --output-dir and step 2 during the transfer, how a payload staged in the staging directory (compressed, encrypted or of several components) is staged (Specs/protocol.md P-29c): 'auto' stages it whole where staging has room, else through a window of that room (at most that many bytes of blocks ahead of step 2, freed as step 2 consumes them), so the update still arrives; a size (decimal k, M, G, at least 1M) fixes the window; 'whole' always stages it whole.")
    var stagingWindow: String = "auto"

    @Option(help: "'required': take only sessions whose sender signed a SESSION record with a key the vendor delegated (`fleetcast delegate`), so nobody on the LAN can steer this receiver with a forged or replayed ANNOUNCE, POLL or CLOSE (Specs/protocol.md P-31). 'optional': take unsigned sessions too (a keyless lab sender), said to be unauthenticated.")
    var sessionAuth: SessionAuthentication = .optional

    @Option(help: "Directory to write the verified, decrypted components into.")
    var outputDir: String?

    @Option(help: "Mode of the released component files, in octal.")
    var componentMode: String = "0600"

    @Option(help: "Seconds to wait for a session before giving up (0: wait forever).")
    var timeout: Double = 0

    @Option(help: "Drop this percentage of incoming data datagrams at random, to see repair work (tests, demos).")
    var simulateLoss: Double = 0

    @Flag(help: "After refusing an announce (expired, other hardware, rollback), keep waiting for an acceptable one instead of exiting.")
    var keepListening = false

    @Flag(help: "Run step 2 (payload hash, decryption, decompression, component hashes) after the transfer, reading the staged bundle back, instead of block by block during it.")
    var verifyAfterTransfer = false

    @Flag(name: .customLong("no-gro"), help: "Read every datagram on its own instead of letting the kernel coalesce runs of them (UDP GRO; used by default where the kernel has it).")
    var noGRO = false

    @Flag(help: "No progress line.")
    var quiet = false

    func validate() throws {
        guard (0..<100).contains(simulateLoss) else { throw ValidationError("--simulate-loss is a percentage below 100") }
        guard isSaneSeconds(timeout) else { throw ValidationError("--timeout wants seconds from 0 to \(durationSecondsMax) (100 years)") }
        guard let bytes = parseByteCount(blockMemory), bytes >= 1_000_000 else {
            throw ValidationError("--block-memory wants a size of at least 1M, such as 8.6M or 32M")
        }
        guard parseStagingWindow(stagingWindow) != nil else {
            throw ValidationError("--staging-window wants 'auto', 'whole' or a size of at least 1M, such as 64M")
        }
        guard let mode = mode_t(componentMode, radix: 8), mode <= 0o777 else { throw ValidationError("--component-mode wants an octal mode such as 0600 or 0644") }
    }

    func run() throws {
        try reportingTransportFailures {
            installInterruptHandlers()
            let name = deviceID ?? ProcessInfo.processInfo.hostName
            let receiver = try makeReceiver(name: name)
            var endpoint = ReceiverEndpoint(group: try network.groupAddress(), interface: try network.networkInterface())
            endpoint.coalesce = !noGRO
            let seed = UInt64(fromBytes: try SecureRandom.bytes(8))
            let pump = try ReceiverPump(endpoint: receiver, settings: endpoint, simulatedLoss: simulateLoss / 100, seed: seed)
            if pump.grantedReceiveBuffer < endpoint.receiveBufferBytes / 2 {
                printError("warning: the kernel granted a \(formatBytes(UInt64(pump.grantedReceiveBuffer))) receive buffer (asked \(formatBytes(UInt64(endpoint.receiveBufferBytes)))); bursts may overflow it: raise net.core.rmem_max")
            }
            if let note = receiver.resumeNote { printError(note) }
            if receiver.resumedBlocks > 0 { FileHandle.standardError.write(Data("resuming: \(receiver.resumedBlocks) block(s) already verified in \(stagingDir)\n".utf8)) }
            FileHandle.standardError.write(Data("\(name): listening on \(endpoint.group)\(endpoint.interface.map { " on \($0)" } ?? "")\n".utf8))
            let outcome = try receive(receiver, pump)
            try report(outcome, receiver: receiver, pump: pump, name: name)
        }
    }

    /// The embeddable receiver, configured from the options; it accepts every offer
    /// its policy admits.
    private func makeReceiver(name: String) throws -> UpdateReceiver {
        // The receiver ID is the one kept in the staging directory (made once, random).
        let identity = DeviceIdentity(deviceID: name, productID: deviceOptions.product, hardwareID: deviceOptions.hardwareID,
                                      trust: try deviceOptions.trust(), keys: try deviceOptions.keys())
        var config = UpdateReceiver.Configuration(identity: identity, stagingDirectory: stagingDir, outputDirectory: outputDir)
        config.keepBundle = keepBundle || bundleOut != nil
        config.verifyDuringTransfer = !verifyAfterTransfer
        config.stepTwoThread = true
        config.componentMode = mode_t(componentMode, radix: 8)!  // checked in validate()
        config.stagingWindow = parseStagingWindow(stagingWindow)!  // checked in validate()
        config.tuning.inactivityTimeout = .seconds(10)
        config.tuning.sessionAuthentication = sessionAuth
        config.tuning.blockBytesInMemoryMax = parseByteCount(blockMemory)!  // checked in validate()
        let installed = InstalledSoftware(version: installedVersion, sequence: deviceOptions.installedSequence)
        let receiver = try UpdateReceiver(configuration: config, installed: { installed })
        receiver.decideOffer = { _ in .accept }
        return receiver
    }

    enum Outcome {
        /// Wall seconds and CPU seconds until every block was in, and after (finishing step 2).
        case completed(ReceivedUpdate, receiving: Double, verifying: Double, cpuReceiving: Double)
        case failed(ReceiveFailure)
        case timedOut
        case stopped
    }

    /// Runs the pump until the session's outcome is reported, the join times out, or
    /// (without --keep-listening) a refusal has been told to the sender a few times.
    private func receive(_ receiver: UpdateReceiver, _ pump: ReceiverPump) throws -> Outcome {
        let started = MonotonicClock.now()
        let giveUpAt = timeout > 0 ? started + .seconds(timeout) : nil
        // A validly signed announce refused here ends the run after this grace, long enough
        // to tell the sender a few times (one STATUS per announce).
        let refusalGrace = Interval.seconds(2.5)
        var refused: (at: Instant, ReceiveFailure)?
        var outcome: Outcome?
        var receivedAt: Instant?
        var cpuAtReceived: Double?
        let status = StatusLine(enabled: !quiet)
        try pump.run(tick: { now in
            while let e = receiver.pollEvent() {
                switch e {
                case .refused(_, let failure): if refused == nil { refused = (now, failure) }
                case .received:
                    receivedAt = now
                    cpuAtReceived = MonotonicClock.processCPUSeconds()
                case .completed(let update):
                    let end = receivedAt ?? now
                    outcome = .completed(update, receiving: (end - started).seconds, verifying: (now - end).seconds,
                                         cpuReceiving: cpuAtReceived ?? MonotonicClock.processCPUSeconds())
                case .failed(_, let failure): outcome = .failed(failure)
                case .joined(let session, _):
                    let how = receiver.joinedSenderDelegation.map { "authenticated by sender key \($0.senderKey.keyID.hexString)" }
                        ?? "UNAUTHENTICATED (its sender signs no SESSION record; --session-auth required would ignore it)"
                    FileHandle.standardError.write(Data("joined session \(session): \(how)\n".utf8))
                case .offer: break
                }
            }
            status.show(progressLine(receiver, pump, elapsed: now - started))
        }, shouldStop: {
            if interrupted { return true }
            let now = MonotonicClock.now()
            if receiver.manifest == nil, let giveUpAt, now >= giveUpAt { outcome = outcome ?? .timedOut; return true }
            if receiver.manifest == nil, !keepListening, let (at, failure) = refused, now >= at + refusalGrace { outcome = .failed(failure); return true }
            return false
        })
        status.finish()
        if interrupted { return .stopped }
        return outcome ?? .failed(ReceiveFailure(.sessionClosed, "session ended"))
    }

    private func progressLine(_ receiver: UpdateReceiver, _ pump: ReceiverPump, elapsed: Interval) -> String {
        guard let m = receiver.manifest else { return "waiting for a session (\(Int(elapsed.seconds)) s)" }
        let total = BlockGeometry(payloadSize: m.payload.size, profile: m.transport).blockCount
        let done = total > 0 ? Double(receiver.blocksDone) * 100 / Double(total) : 0
        let rejected = receiver.stats.rejections.map { "\($0.name)=\($0.count)" }.joined(separator: " ")
        return String(format: "%5.1f%%  %@  repaired %llu blocks  NACKs %d%@  rejected: %@", done, formatRate(receiver.bytesHeard, elapsed.seconds),
                      receiver.stats.repairedPayloadBlocks, receiver.nacksSent, receiver.isVerifying ? "  verifying" : "",
                      rejected.isEmpty ? "none" : rejected)
    }

    private func report(_ outcome: Outcome, receiver: UpdateReceiver, pump: ReceiverPump, name: String) throws {
        let rejected = receiver.stats.rejections.map { "\($0.name)=\($0.count)" }.joined(separator: " ")
        switch outcome {
        case .stopped:
            printError("interrupted; progress is journalled in \(stagingDir), run again to resume")
            throw ExitCode(130)
        case .timedOut:
            printError("no acceptable session within \(timeout) s; rejected: \(rejected.isEmpty ? "none" : rejected)")
            throw ExitCode(NetworkExit.timedOut)
        case .failed(let failure):
            printError("\(name): \(failure.reason.rawValue): \(failure.text)")
            throw ExitCode(Self.exitCode(failure.reason))
        case .completed(let update, let receiving, let verifying, let cpuReceiving):
            var kept = update.bundlePath
            if let bundleOut, let path = kept {
                guard rename(path, bundleOut) == 0 else { throw TransportError(.storage, "cannot move the bundle to \(bundleOut): \(String(cString: strerror(errno)))") }
                kept = bundleOut
            }
            let m = update.manifest
            let cpu = MonotonicClock.processCPUSeconds()
            say(String(format: "%@: verified %@ %@ (sequence %llu, %@) in %.2f s receiving + %.2f s finishing step 2; %llu blocks repaired, %d NACKs; CPU %.2f s + %.2f s (%.0f MB/s per CPU-second)",
                       name, m.productID, m.version, m.sequence, formatBytes(m.payload.size), receiving, verifying,
                       receiver.stats.repairedPayloadBlocks, receiver.nacksSent, cpuReceiving, cpu - cpuReceiving, Double(m.payload.size) / max(cpu, 1e-6) / 1e6))
            say("  rejected on arrival: \(rejected.isEmpty ? "none" : rejected)")
            if receiver.stats.blocksSpilled > 0 { say("  incomplete blocks spilled to disk (memory budget full): \(receiver.stats.blocksSpilled)") }
            say(String(format: "  datagrams: %llu in %llu reads (%@)", pump.groupDatagrams, pump.groupMessages,
                       pump.coalescing ? "kernel coalescing (UDP GRO) on" : "one per read"))
            let notKept = receiver.stagingAllocatedBytesMax > 0
                ? "not kept (the payload went through the staging window, at most \(formatBytes(receiver.stagingAllocatedBytesMax)) on disk; --keep-bundle keeps it)"
                : "not kept (the payload was staged as the component; --keep-bundle keeps it)"
            say("  bundle -> \(kept ?? notKept)")
            for (component, path) in update.componentPaths.sorted(by: { $0.key < $1.key }) { say("  \(component) -> \(path)") }
        }
    }

    static func exitCode(_ reason: ReceiveFailure.Reason) -> Int32 {
        switch reason {
        case .expired: BundleError(.expired, "").exitCode
        case .incompatibleHardware: BundleError(.incompatibleHardware, "").exitCode
        case .rollback: BundleError(.rollback, "").exitCode
        case .verification: BundleError(.hashMismatch, "").exitCode
        case .notARecipient: BundleError(.notARecipient, "").exitCode
        case .decryption: BundleError(.decryptionFailed, "").exitCode
        case .storage: BundleError(.io, "").exitCode
        case .sessionClosed, .timedOut, .declined, .unauthorized: NetworkExit.sessionEnded
        }
    }
}

extension UInt64 {
    init(fromBytes b: [UInt8]) { self = b.prefix(8).reduce(0) { $0 << 8 | UInt64($1) } }
}

extension SessionAuthentication: ExpressibleByArgument {}
