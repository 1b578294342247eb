import ArgumentParser
import DeliveryCore
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
        keys and this device's policy (hardware, anti-rollback, expiry); anything else is \
        refused before a byte is stored. Every arriving symbol is checked against the signed \
        authentication chain; missing symbols are NACKed by unicast. Verified blocks go to \
        --staging-dir with a journal, so a killed receiver resumes where it stopped. On \
        completion the whole payload is hashed against the manifest, decrypted and \
        decompressed (step 2); the verified bundle is kept (--bundle-out) and the components \
        written (--output-dir). With --output-dir alone, a bundle whose only component is its \
        plain payload is not kept: the payload is staged as the component file and released \
        by a rename once its hash matches, so it is written once (--keep-bundle keeps it).

        Exit status: 0 verified; 13 expired; 14 incompatible hardware; 15 rollback; 17 hash \
        mismatch; 18 not a recipient; 19 decryption failed; 20 storage; 30 no session within \
        --timeout; 31 the session ended before this device completed; 33 network error.

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

    @Option(help: "This device's ID in the sender's fleet report (default: the host name).")
    var deviceID: String?

    @Option(help: "Directory for staged blocks and the resume journal.")
    var stagingDir: String = "fleetcast-staging"

    @Option(help: "Where to leave the verified bundle (default: <staging-dir>/bundle).")
    var bundleOut: String?

    @Flag(help: "Keep the verified bundle in <staging-dir>/bundle even with --output-dir. Without it (and without --bundle-out), a bundle whose only component is its plain payload is staged straight into the component file, so every byte is written once, and no bundle is kept.")
    var keepBundle = false

    @Option(help: "Memory for incomplete blocks, in bytes with an optional k, M or G suffix; beyond it they wait in a scratch file next to the staged bundle (Specs/protocol.md P-5a). More avoids that disk traffic under heavy loss; the rest of the receiver needs about 40 MiB.")
    var blockMemory: String = "8.6M"

    @Option(help: "Directory to write the verified, decrypted components into.")
    var outputDir: String?

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
        guard timeout >= 0 else { throw ValidationError("--timeout must not be negative") }
        guard let bytes = parseByteCount(blockMemory), bytes >= 1 << 20 else {
            throw ValidationError("--block-memory wants a size of at least 1M, such as 8.6M or 32M")
        }
    }

    func run() throws {
        try reportingTransportFailures {
            installInterruptHandlers()
            let trust = try deviceOptions.trust()
            let device = deviceOptions.policy(now: currentUnixTime())
            let keys = try deviceOptions.keys()
            let name = deviceID ?? ProcessInfo.processInfo.hostName
            let seed = UInt64(fromBytes: try SecureRandom.bytes(8))
            var config = ReceiverConfig(receiverID: ReceiverID(UInt64(fromBytes: SHA256.hash(Array(name.utf8)))), deviceID: String(name.prefix(Register.textByteCountMax)),
                                        installedVersion: String(installedVersion.prefix(Register.textByteCountMax)), trust: trust, device: device, seed: seed)
            config.inactivityTimeout = .seconds(10)
            config.blockBytesInMemoryMax = parseByteCount(blockMemory)!  // checked in validate()
            if let outputDir { try FileManager.default.createDirectory(atPath: outputDir, withIntermediateDirectories: true) }
            // Specs/protocol.md P-29a: when no bundle is asked for and the component is the
            // payload (plain, alone), the payload is staged as the component file: written once.
            let stageComponent = outputDir != nil && bundleOut == nil && !verifyAfterTransfer && !keepBundle
            let staging = try StagingArea(directory: stagingDir, payloadFile: stageComponent ? { m in
                PayloadVerification.stagedComponentPath(m, outputDirectory: outputDir!)
            } : nil)
            var endpoint = ReceiverEndpoint(group: try network.groupAddress(), interface: try network.networkInterface())
            endpoint.coalesce = !noGRO
            let driver = try ReceiverDriver(config: config, endpoint: endpoint, staging: staging, keys: keys,
                                            simulatedLoss: simulateLoss / 100, seed: seed)
            if driver.grantedReceiveBuffer < endpoint.receiveBufferBytes / 2 {
                printError("warning: the kernel granted a \(formatBytes(UInt64(driver.grantedReceiveBuffer))) receive buffer (asked \(formatBytes(UInt64(endpoint.receiveBufferBytes)))); bursts may overflow it: raise net.core.rmem_max")
            }
            if !verifyAfterTransfer { driver.verifyDuringTransfer(outputDirectory: outputDir) }
            if let note = driver.resumeNote { printError(note) }
            if driver.resumedBlocks > 0 { FileHandle.standardError.write(Data("resuming: \(driver.resumedBlocks) block(s) already verified in \(stagingDir)\n".utf8)) }
            FileHandle.standardError.write(Data("\(name): listening on \(endpoint.group)\(endpoint.interface.map { " on \($0)" } ?? "")\n".utf8))

            let status = StatusLine(enabled: !quiet)
            let outcome = try driver.run(joinTimeout: timeout > 0 ? .seconds(timeout) : nil, refusalGrace: keepListening ? nil : .seconds(2.5), progress: { p in
                guard p.joined else { status.show("waiting for a session (\(Int(p.elapsed.seconds)) s)"); return }
                let done = p.blocksTotal > 0 ? Double(p.blocksDone) * 100 / Double(p.blocksTotal) : 0
                let rejected = p.rejected.map { "\($0.0)=\($0.1)" }.joined(separator: " ")
                status.show(String(format: "%5.1f%%  %@  repaired %llu blocks  NACKs %d  rejected: %@", done,
                                   formatRate(p.bytesReceived, p.elapsed.seconds), p.blocksRepaired, p.nacksSent, rejected.isEmpty ? "none" : rejected))
            }, shouldStop: { interrupted })
            status.finish()
            let p = driver.snapshot(at: MonotonicClock.now())
            switch outcome {
            case .stopped:
                printError("interrupted; progress is journalled in \(stagingDir), run again to resume")
                throw ExitCode(130)
            case .timedOut:
                let rejected = p.rejected.map { "\($0.0)=\($0.1)" }.joined(separator: " ")
                printError("no acceptable session within \(timeout) s on \(endpoint.group); rejected: \(rejected.isEmpty ? "none" : rejected)")
                throw ExitCode(NetworkExit.timedOut)
            case .failed(let reason, let text):
                printError("\(name): \(reason): \(text)")
                throw ExitCode(Self.exitCode(reason))
            case .completed(let staged):
                let cpuReceive = MonotonicClock.processCPUSeconds()
                let started = MonotonicClock.now()
                let result: VerifiedBundle
                let verified: VerifiedManifest
                var kept: String?
                switch staged {
                case .bundle(let path):
                    kept = path
                    if verifyAfterTransfer {
                        let opened = try UnverifiedBundle(path: path)
                        verified = try opened.verifyManifest(trust: trust, device: device)
                        result = try opened.verifyPayload(verified, keys: keys, outputDirectory: outputDir, checkAuthChain: false)
                    } else {
                        result = try driver.finishVerification()
                        verified = result.manifest
                    }
                case .payload(let path):
                    // The payload hash decides whether this file becomes the component (B-16a).
                    do { result = try driver.finishVerification() } catch { unlink(path); throw error }
                    verified = result.manifest
                }
                let verifySeconds = (MonotonicClock.now() - started).seconds
                if let bundleOut, let path = kept {
                    guard rename(path, bundleOut) == 0 else { throw TransportError(.storage, "cannot move the bundle to \(bundleOut): \(String(cString: strerror(errno)))") }
                    kept = bundleOut
                }
                let m = verified.manifest
                let cpu = MonotonicClock.processCPUSeconds()
                say(String(format: "%@: verified %@ %@ (sequence %llu, %@) in %.2f s receiving + %.2f s verifying; %llu blocks repaired, %d NACKs; CPU %.2f s + %.2f s (%.0f MB/s per CPU-second)",
                             name, m.productID, m.version, m.sequence, formatBytes(m.payload.size), p.elapsed.seconds, verifySeconds,
                             p.blocksRepaired, p.nacksSent, cpuReceive, cpu - cpuReceive, Double(m.payload.size) / max(cpu, 1e-6) / 1e6))
                let rejected = p.rejected.map { "\($0.0)=\($0.1)" }.joined(separator: " ")
                say("  rejected on arrival: \(rejected.isEmpty ? "none" : rejected)")
                if p.blocksSpilled > 0 { say("  incomplete blocks spilled to disk (memory budget full): \(p.blocksSpilled)") }
                say(String(format: "  datagrams: %llu in %llu reads (%@)", driver.groupDatagrams, driver.groupMessages,
                           driver.coalescing ? "kernel coalescing (UDP GRO) on" : "one per read"))
                say("  bundle -> \(kept ?? "not kept (the payload was staged as the component; --keep-bundle keeps it)")")
                for (component, path) in result.componentPaths.sorted(by: { $0.key < $1.key }) { say("  \(component) -> \(path)") }
            }
        }
    }

    static func exitCode(_ reason: Status.Reason) -> Int32 {
        switch reason {
        case .expired: BundleError(.expired, "").exitCode
        case .incompatibleHardware: BundleError(.incompatibleHardware, "").exitCode
        case .rollback: BundleError(.rollback, "").exitCode
        case .notARecipient: BundleError(.notARecipient, "").exitCode
        case .storage: BundleError(.io, "").exitCode
        case .sessionClosed, .timedOut, .none: NetworkExit.sessionEnded
        }
    }
}

extension UInt64 {
    init(fromBytes b: [UInt8]) { self = b.prefix(8).reduce(0) { $0 << 8 | UInt64($1) } }
}
