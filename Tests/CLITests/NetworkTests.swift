import ChildProcess
import FleetCrypto
import Foundation
import Testing
import UpdateBundle

/// A LAN for one test: as root, bench/lab's network namespaces (bridge, veth,
/// nftables loss per receiver link); otherwise loopback, with the loss
/// simulated inside each receiver. Nothing is sent off the machine either way.
final class TestLAN {
    let prefix: String
    let isNamespaced = getuid() == 0
    let receiverCount: Int
    let loss: [Double]
    let port: UInt16
    static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
    nonisolated(unsafe) static var counter = 0

    init(receivers: Int, hosts extra: Int = 0, loss: [Double]) throws {
        receiverCount = receivers
        self.loss = loss
        TestLAN.counter += 1
        prefix = "fct\(getpid() % 10000)x\(TestLAN.counter)"
        port = UInt16(20000 + Int(getpid() % 10000) + TestLAN.counter * 7)
        if isNamespaced {
            let spec = (0..<(receivers + extra)).map { String(format: "%g", $0 < loss.count ? loss[$0] : 0) }.joined(separator: ",")
            let r = try runTool(TestLAN.repository + "/bench/lab", ["up", "\(receivers + extra)", "--loss", spec], environment: ["LAB_PREFIX": prefix])
            guard r.status == 0 else { throw LabError(text: "bench/lab up failed: \(r.output)") }
        }
    }

    deinit {
        if isNamespaced { _ = try? runTool(TestLAN.repository + "/bench/lab", ["down"], environment: ["LAB_PREFIX": prefix]) }
    }

    var interface: String { isNamespaced ? "lan0" : "lo" }

    /// The command line that runs `arguments` of fleetcast on a host ("s", "r1", ...).
    func command(on host: String, _ arguments: [String]) -> (String, [String]) {
        var args = arguments + ["--interface", interface, "--port", "\(port)"]
        if !isNamespaced, host.hasPrefix("r"), let i = Int(host.dropFirst()), i <= loss.count, loss[i - 1] > 0 {
            args += ["--simulate-loss", String(format: "%g", loss[i - 1])]
        }
        if !isNamespaced && arguments.first == "send" { args += ["--ttl", "0"] }
        return isNamespaced ? ("/usr/sbin/ip", ["netns", "exec", "\(prefix)-\(host)", fleetcastBinary] + args) : (fleetcastBinary, args)
    }
}

struct LabError: Error, CustomStringConvertible { let text: String; var description: String { text } }

func runTool(_ path: String, _ arguments: [String], environment: [String: String] = [:]) throws -> (status: Int32, output: String) {
    var options = ChildProcess.Options([path] + arguments)
    if !environment.isEmpty { options.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 } }
    options.standardError = .output
    let r = try ChildProcess.run(options, seconds: 60, outputByteCountMax: 16 << 20)
    return (r.termination.map(BackgroundProcess.status) ?? -1, r.outputText)
}

/// A child process with its output in a file, waited for with a time limit.
final class BackgroundProcess {
    private var options: ChildProcess.Options
    private(set) var child: ChildProcess?
    let log: String

    init(_ path: String, _ arguments: [String], log: String, environment: [String: String] = [:], directory: String? = nil) {
        self.log = log
        options = ChildProcess.Options([path] + arguments)
        options.directory = directory
        if !environment.isEmpty { options.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 } }
        options.standardOutput = .file(log)
        options.standardError = .output
    }

    func start() throws {
        FileManager.default.createFile(atPath: log, contents: nil)
        child = try ChildProcess(options)
    }

    var pid: pid_t { child!.pid }
    var isRunning: Bool { child?.isRunning ?? false }

    /// An exit status as a shell gives it: 128 + the signal for one killed by a signal.
    static func status(_ t: ChildProcess.Termination) -> Int32 {
        switch t { case .exited(let s): s; case .signalled(let s): 128 + s }
    }

    /// The exit status, or nil (and the process killed) after `seconds`.
    func wait(seconds: Double) -> Int32? {
        guard let child else { return nil }
        return child.waitOrKill(seconds: seconds).map(Self.status)
    }

    func kill9() {
        child?.signal(SIGKILL)
        child?.wait(seconds: 10)
    }

    var output: String { (try? String(contentsOfFile: log, encoding: .utf8)) ?? "" }
}

/// Keys, an image and a bundle signed by the vendor and encrypted for one device key.
final class NetworkFixture {
    let w = Workspace()
    let image: [UInt8]

    /// `encrypted: false` packs the image as the plain, lone payload, which a receiver with
    /// --output-dir stages as the component file itself (Specs/protocol.md P-29a).
    /// `expiresIn`: the bundles' validity in seconds (pack's default is 30 days).
    init(imageBytes: Int = 3_000_000, seed: UInt8 = 1, encrypted: Bool = true, expiresIn: Int? = nil) throws {
        var state = UInt64(seed) &* 0x9E37_79B9_7F4A_7C15
        image = (0..<imageBytes).map { _ in
            state = state &* 6364136223846793005 &+ 1442695040888963407
            return UInt8(truncatingIfNeeded: state >> 33)
        }
        FileManager.default.createFile(atPath: w.file("image"), contents: Data(image))
        for (type, name) in [("ed25519", "vendor"), ("ed25519", "intruder"), ("x25519", "device")] {
            let r = try fleetcast(["keygen", "--type", type, "--out", name], in: w.path)
            guard r.status == 0 else { throw LabError(text: r.stderr) }
        }
        for (signer, out) in [("vendor", "update.fcb"), ("intruder", "forged.fcb")] {
            let validity = expiresIn.map { ["--expires-in", "\($0)s"] } ?? []
            let r = try fleetcast(["pack", "--quiet", "--output", out, "--product", "lab", "--hardware", "lab-board", "--version", "2.0",
                                   "--sequence", "2", "--component", "rootfs=image", "--sign", signer + ".key", "--compression", "none"]
                                   + (encrypted ? ["--recipient", "device.pub"] : []) + validity, in: w.path)
            guard r.status == 0 else { throw LabError(text: r.stderr) }
        }
    }

    /// `update.fcb` again, under a manifest the vendor signed that lists a wrong SHA-256
    /// for the component: every block authenticates and the transfer completes, but
    /// step 2 finds the decrypted component differs (a vendor's mistake, or an attack
    /// on the build). Written to `mislabelled.fcb`.
    func packMislabelled() throws -> String {
        let bundle = try UnverifiedBundle(path: w.file("update.fcb"))
        var m = try Manifest(decoding: try COSE.parseEnvelope(bundle.envelope).manifest)
        m.components[0].sha256[0] ^= 0x01
        let vendor = try PrivateKey(pem: String(contentsOfFile: w.file("vendor.key"), encoding: .utf8))
        let envelope = try COSE.envelope(manifest: m.encoded(), keys: [vendor])
        let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: w.file("update.fcb"))))
        let header = BundleHeader(envelopeLength: envelope.count, payloadLength: bundle.header.payloadLength, authLength: bundle.header.authLength)
        let out = header.encoded() + envelope + bytes[Int(bundle.header.payloadOffset)...]
        FileManager.default.createFile(atPath: w.file("mislabelled.fcb"), contents: Data(out))
        return w.file("mislabelled.fcb")
    }

    func receiveArguments(_ i: Int, timeout: Int = 30) -> [String] {
        ["receive", "--quiet", "--trusted-key", w.file("vendor.pub"), "--hardware-id", "lab-board", "--installed-sequence", "1",
         "--device-key", w.file("device.key"), "--device-id", "device-\(i)", "--staging-dir", w.file("staging-\(i)"),
         "--output-dir", w.file("out-\(i)"), "--timeout", "\(timeout)"]
    }

    func delivered(_ i: Int) -> [UInt8]? {
        FileManager.default.contents(atPath: w.file("out-\(i)/rootfs")).map { [UInt8]($0) }
    }

    /// Whether receiver `i` wrote exactly the image (a Bool, so that a failure does not
    /// print megabytes of both arrays).
    func deliveredIntact(_ i: Int) -> Bool { delivered(i) == image }

    /// What each receiver left: a plain lone payload was staged as the component
    /// (P-29a), so no bundle and no partial file remain; otherwise the bundle is kept.
    /// Receivers given --verify-after-transfer or --keep-bundle (receivers 2 and 3 of
    /// `fleet`) always keep it.
    func expectStaging(receivers: Int, plainPayloadStaged: Bool) {
        let fm = FileManager.default
        for i in 1...receivers {
            let staged = plainPayloadStaged && !(receivers > 1 && (i == 2 || i == 3))
            #expect(fm.fileExists(atPath: w.file("staging-\(i)/bundle")) == !staged, "receiver \(i): bundle kept: \(!staged) expected")
            #expect(!fm.fileExists(atPath: w.file("staging-\(i)/bundle.partial")) && !fm.fileExists(atPath: w.file("out-\(i)/rootfs.partial")),
                    "receiver \(i) left partial files")
        }
    }
}

/// Real `fleetcast send` and `receive` processes on a real (namespaced or
/// loopback) network: Specs/protocol.md §8 end to end.
@Suite("Real network: send and receive", .serialized)
struct NetworkTests {
    func start(_ lan: TestLAN, on host: String, _ arguments: [String], log: String) throws -> BackgroundProcess {
        let (path, args) = lan.command(on: host, arguments)
        let p = BackgroundProcess(path, args, log: log)
        try p.start()
        return p
    }

    /// Half the cases carry a plain bundle, staged straight into the component file (P-29a).
    @Test("1 and 8 receivers at 0% and 10% loss all verify the exact bytes", arguments: [(1, 0.0, true), (1, 10.0, false), (8, 0.0, false), (8, 10.0, true)])
    func fleet(receivers: Int, loss: Double, encrypted: Bool) throws {
        let f = try NetworkFixture(encrypted: encrypted)
        let lan = try TestLAN(receivers: receivers, loss: [Double](repeating: loss, count: receivers))
        // Receiver 2 runs step 2 after the transfer (reading the staged bundle back); the others during it (B-15b).
        // Receiver 3 keeps the bundle, so it writes a plain payload twice (P-29a).
        let rs = try (1...receivers).map { i in
            try start(lan, on: "r\(i)", f.receiveArguments(i) + (i == 2 ? ["--verify-after-transfer"] : i == 3 ? ["--keep-bundle"] : []),
                      log: f.w.file("r\(i).log"))
        }
        let sender = try start(lan, on: "s", ["send", f.w.file("update.fcb"), "--rate", "200M", "--min-receivers", "\(receivers)",
                                              "--deadline", "60s", "--report", f.w.file("fleet.json"), "--quiet"], log: f.w.file("s.log"))
        let senderStatus = sender.wait(seconds: 90)
        #expect(senderStatus == 0, "sender: \(sender.output)")
        for (i, r) in rs.enumerated() {
            let status = r.wait(seconds: 60)
            #expect(status == 0, "receiver \(i + 1): \(r.output)")
            #expect(f.deliveredIntact(i + 1), "receiver \(i + 1) delivered other bytes")
        }
        let report = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: f.w.file("fleet.json")))) as! [String: Any]
        let devices = report["receivers"] as! [[String: Any]]
        #expect(devices.count == receivers && devices.allSatisfy { $0["outcome"] as? String == "verified" }, "\(devices)")
        if loss > 0 { #expect(rs.contains { $0.output.contains("blocks repaired") && !$0.output.contains(" 0 blocks repaired") }, "no repair seen at \(loss)% loss") }
        f.expectStaging(receivers: receivers, plainPayloadStaged: !encrypted)
    }

    @Test("A receiver killed mid-transfer resumes from its journal and verifies", arguments: [true, false])
    func killAndResume(encrypted: Bool) throws {
        let f = try NetworkFixture(imageBytes: 12_000_000, encrypted: encrypted)
        let lan = try TestLAN(receivers: 1, loss: [0])
        var r = try start(lan, on: "r1", f.receiveArguments(1), log: f.w.file("r1.log"))
        // 12 MB at 32 Mbit/s: about 3 s. The receiver commits its journal every 5.7 MB
        // (ReceiverConfig.commitByteCount), so it is killed after about 1.4 s, mid-transfer.
        let sender = try start(lan, on: "s", ["send", f.w.file("update.fcb"), "--rate", "32M", "--min-receivers", "1", "--deadline", "60s",
                                              "--quiet", "--report", f.w.file("fleet.json")], log: f.w.file("s.log"))
        let journal = f.w.file("staging-1/journal")
        var waited = 0
        while !FileManager.default.fileExists(atPath: journal) && waited < 2000 {
            usleep(10_000)  // polling for the file the receiver commits; bounded
            waited += 1
        }
        #expect(FileManager.default.fileExists(atPath: journal), "no journal appeared: \(r.output)")
        r.kill9()
        r = try start(lan, on: "r1", f.receiveArguments(1), log: f.w.file("r1-again.log"))
        #expect(r.wait(seconds: 60) == 0, "restarted receiver: \(r.output)")
        #expect(r.output.contains("resuming:"), "the restarted receiver did not resume: \(r.output)")
        #expect(f.deliveredIntact(1), "the restarted receiver delivered other bytes")
        #expect(sender.wait(seconds: 60) == 0, "sender: \(sender.output)")
        f.expectStaging(receivers: 1, plainPayloadStaged: !encrypted)
    }

    @Test("Forged, corrupted and absurd datagrams on the LAN are dropped; the genuine bytes arrive")
    func forgedPackets() throws {
        let f = try NetworkFixture()
        let lan = try TestLAN(receivers: 2, hosts: 1, loss: [0, 0])
        let rs = try (1...2).map { i in try start(lan, on: "r\(i)", f.receiveArguments(i), log: f.w.file("r\(i).log")) }
        let attacker = try start(lan, on: "r3", ["inject", "--rate", "5000", "--duration", "4", "--timeout", "30"], log: f.w.file("inject.log"))
        let sender = try start(lan, on: "s", ["send", f.w.file("update.fcb"), "--rate", "40M", "--min-receivers", "2", "--deadline", "60s", "--quiet"],
                               log: f.w.file("s.log"))
        #expect(sender.wait(seconds: 90) == 0, "sender: \(sender.output)")
        for (i, r) in rs.enumerated() {
            #expect(r.wait(seconds: 60) == 0, "receiver \(i + 1): \(r.output)")
            #expect(f.deliveredIntact(i + 1), "receiver \(i + 1) delivered other bytes")
            #expect(r.output.contains("data.badTag="), "no forged symbol was counted: \(r.output)")
        }
        #expect(attacker.wait(seconds: 30) == 0, "injector: \(attacker.output)")
        #expect(attacker.output.contains("forged datagrams"))
    }

    @Test("A staging directory without room for the bundle ends the session at join, before any payload (P-26a)")
    func stagingWithoutRoom() throws {
        let f = try NetworkFixture()  // a 3 MB bundle
        let lan = try TestLAN(receivers: 1, loss: [0])
        let staging = f.w.file("staging-1")
        try FileManager.default.createDirectory(atPath: staging, withIntermediateDirectories: true)
        // The receiver's staging directory is a 1 MiB tmpfs, mounted in a mount namespace of its
        // own (a user namespace too when not root), so nothing outside the test sees it.
        let (path, args) = lan.command(on: "r1", f.receiveArguments(1))
        let wrapper = (getuid() == 0 ? ["-m"] : ["-r", "-m"]) + ["--propagation", "private", "/bin/sh", "-c",
                                                              "mount -t tmpfs -o size=1m,mode=0700 tmpfs \"$0\" && exec \"$@\"", staging, path] + args
        let r = BackgroundProcess("/usr/bin/unshare", wrapper, log: f.w.file("r1.log"))
        try r.start()
        let sender = try start(lan, on: "s", ["send", f.w.file("update.fcb"), "--rate", "40M", "--min-receivers", "1", "--deadline", "20s",
                                              "--quiet", "--report", f.w.file("fleet.json")], log: f.w.file("s.log"))
        #expect(r.wait(seconds: 60) == 20, "expected exit 20 (storage): \(r.output)")
        #expect(r.output.contains("no room for the"), "\(r.output)")
        #expect(sender.wait(seconds: 60) == 32, "the sender should report an incomplete fleet: \(sender.output)")
        let report = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: f.w.file("fleet.json")))) as! [String: Any]
        let device = (report["receivers"] as! [[String: Any]]).first
        #expect(device?["outcome"] as? String == "failed" && device?["failureReason"] as? String == "storage", "\(report)")
        // Refused at join: at most the first few data symbols were seen, none was stored.
        #expect(f.delivered(1) == nil)
    }

    @Test("An announce signed by an untrusted key is refused; the genuine session on the same group is received")
    func wrongKeyAnnounce() throws {
        let f = try NetworkFixture()
        let lan = try TestLAN(receivers: 1, loss: [0])
        // Alone, the forged session is never joined: the receiver times out, nothing staged.
        let alone = try start(lan, on: "r1", f.receiveArguments(9, timeout: 4), log: f.w.file("r9.log"))
        let intruder = try start(lan, on: "s", ["send", f.w.file("forged.fcb"), "--rate", "40M", "--deadline", "6s", "--quiet"], log: f.w.file("intruder.log"))
        #expect(alone.wait(seconds: 30) == 30, "expected exit 30 (no acceptable session): \(alone.output)")
        #expect(alone.output.contains("announce.signatureInvalid="), "the forged announce was not counted: \(alone.output)")
        #expect(!FileManager.default.fileExists(atPath: f.w.file("staging-9/bundle.partial")))
        _ = intruder.wait(seconds: 30)

        // With both sessions on the group, the receiver takes the genuine one.
        let r = try start(lan, on: "r1", f.receiveArguments(1), log: f.w.file("r1.log"))
        let intruder2 = try start(lan, on: "s", ["send", f.w.file("forged.fcb"), "--rate", "40M", "--deadline", "8s", "--quiet"], log: f.w.file("intruder2.log"))
        let genuine = try start(lan, on: "s", ["send", f.w.file("update.fcb"), "--rate", "40M", "--min-receivers", "1", "--deadline", "60s", "--quiet"],
                                log: f.w.file("s.log"))
        #expect(r.wait(seconds: 60) == 0, "receiver: \(r.output)")
        #expect(f.deliveredIntact(1), "receiver 1 delivered other bytes")
        #expect(genuine.wait(seconds: 60) == 0, "sender: \(genuine.output)")
        _ = intruder2.wait(seconds: 30)
    }

    /// Specs/protocol.md P-31: `fleetcast delegate`, `send --sender-key --delegation`,
    /// `receive --session-auth required`, on the real network.
    @Test("A receiver requiring authenticated sessions ignores a keyless sender and receives from a delegated one")
    func authenticatedSession() throws {
        let f = try NetworkFixture()
        let lan = try TestLAN(receivers: 1, loss: [0])
        #expect(try fleetcast(["keygen", "--type", "ed25519", "--out", "sender"], in: f.w.path).status == 0)
        let delegate = try fleetcast(["delegate", "--sign", "vendor.key", "--sender-key", "sender.pub", "--expires-in", "1d", "-o", "sender.delegation"], in: f.w.path)
        #expect(delegate.status == 0 && delegate.stdout.contains("delegated until"), "\(delegate.stderr)")
        // send refuses a delegation of another key than the one it is given.
        let mismatched = try fleetcast(["send", "update.fcb", "--sender-key", "intruder.key", "--delegation", "sender.delegation", "--deadline", "1s"], in: f.w.path)
        #expect(mismatched.status != 0 && mismatched.stderr.contains("delegates key"), "\(mismatched.stderr)")

        let strict = f.receiveArguments(1, timeout: 6) + ["--session-auth", "required"]
        // A keyless sender: never joined.
        let alone = try start(lan, on: "r1", strict, log: f.w.file("r1-alone.log"))
        let keyless = try start(lan, on: "s", ["send", f.w.file("update.fcb"), "--rate", "40M", "--deadline", "8s"], log: f.w.file("keyless.log"))
        #expect(alone.wait(seconds: 60) == 30, "expected exit 30 (no acceptable session): \(alone.output)")
        #expect(alone.output.contains("announce.unauthenticatedSession="), "\(alone.output)")
        _ = keyless.wait(seconds: 30)
        #expect(keyless.output.contains("session UNAUTHENTICATED"), "\(keyless.output)")

        // A delegated sender: received, and both ends say the session was authenticated.
        let r = try start(lan, on: "r1", f.receiveArguments(1, timeout: 30) + ["--session-auth", "required"], log: f.w.file("r1.log"))
        let sender = try start(lan, on: "s", ["send", f.w.file("update.fcb"), "--rate", "40M", "--min-receivers", "1", "--deadline", "60s",
                                              "--sender-key", f.w.file("sender.key"), "--delegation", f.w.file("sender.delegation"),
                                              "--report", f.w.file("fleet.json")], log: f.w.file("s.log"))
        #expect(r.wait(seconds: 90) == 0, "receiver: \(r.output)")
        #expect(f.deliveredIntact(1))
        #expect(r.output.contains("authenticated by sender key"), "\(r.output)")
        #expect(sender.wait(seconds: 60) == 0, "sender: \(sender.output)")
        #expect(sender.output.contains("session authenticated"), "\(sender.output)")
        let report = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: f.w.file("fleet.json")))) as? [String: Any]
        #expect(report?["authenticated"] as? Bool == true)
    }

    /// Reads the sender's JSON fleet report.
    func fleetReport(_ f: NetworkFixture) throws -> [[String: Any]] {
        let report = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: f.w.file("fleet.json")))) as! [String: Any]
        return report["receivers"] as! [[String: Any]]
    }

    /// Specs/protocol.md P-21: a device reports complete only once step 2 passed; the
    /// sender's report shows a failed step 2 as failed, with its reason, and send fails.
    @Test("A device whose step 2 fails is failed in the sender's report, not done")
    func stepTwoFailureReported() throws {
        let f = try NetworkFixture()
        let bundle = try f.packMislabelled()
        let lan = try TestLAN(receivers: 1, loss: [0])
        let r = try start(lan, on: "r1", f.receiveArguments(1), log: f.w.file("r1.log"))
        let sender = try start(lan, on: "s", ["send", bundle, "--rate", "100M", "--min-receivers", "1", "--deadline", "30s",
                                              "--quiet", "--report", f.w.file("fleet.json")], log: f.w.file("s.log"))
        #expect(r.wait(seconds: 60) == 17, "the receiver refuses the component (hash): \(r.output)")
        #expect(sender.wait(seconds: 60) == 32, "send must not succeed: \(sender.output)")
        let device = try fleetReport(f).first
        #expect(device?["outcome"] as? String == "failed" && device?["failureReason"] as? String == "verificationFailed", "\(String(describing: device))")
        #expect(f.delivered(1) == nil && !FileManager.default.fileExists(atPath: f.w.file("out-1/rootfs.partial")), "nothing released")
    }

    /// Specs/protocol.md P-3c: the policy is judged when the offer arrives, with the
    /// current time, not the time the receiver started.
    @Test("A receiver started before a bundle's expiry refuses it when it is offered after")
    func expiryJudgedAtOffer() throws {
        let f = try NetworkFixture(expiresIn: 6)
        let expiresAt = try UnverifiedBundle(path: f.w.file("update.fcb")).unverifiedContents().manifest.expiresAt
        let lan = try TestLAN(receivers: 1, loss: [0])
        let r = try start(lan, on: "r1", f.receiveArguments(1), log: f.w.file("r1.log"))
        try #require(UInt64(time(nil)) + 1 < expiresAt, "the receiver must start before the bundle expires for this test to mean anything")
        // The bundle expires while the receiver listens (the passing of time is what is tested).
        var waited = 0
        while UInt64(time(nil)) <= expiresAt && waited < 100 { usleep(100_000); waited += 1 }
        let sender = try start(lan, on: "s", ["send", f.w.file("update.fcb"), "--rate", "100M", "--min-receivers", "1", "--deadline", "15s",
                                              "--quiet", "--report", f.w.file("fleet.json")], log: f.w.file("s.log"))
        #expect(r.wait(seconds: 60) == 13, "expected exit 13 (expired): \(r.output)")
        #expect(r.output.contains("expired"), "\(r.output)")
        #expect(sender.wait(seconds: 60) == 32, "\(sender.output)")
        let device = try fleetReport(f).first
        #expect(device?["outcome"] as? String == "failed" && device?["failureReason"] as? String == "expired", "\(String(describing: device))")
        #expect(!FileManager.default.fileExists(atPath: f.w.file("staging-1/bundle.partial")), "nothing staged for a refused offer")
    }

    /// Specs/protocol.md P-26b: links planted where staging and output files will be
    /// are never followed, and a staging directory others may write is refused.
    @Test("Symlinks in the staging and output directories are not followed; a staging directory others may write is refused")
    func stagingFileSafety() throws {
        let f = try NetworkFixture(encrypted: false)  // plain: the payload is staged in the output directory (P-29a)
        let fm = FileManager.default
        let staging = f.w.file("staging-1"), output = f.w.file("out-1")
        try fm.createDirectory(atPath: staging, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        try fm.createDirectory(atPath: output, withIntermediateDirectories: true)
        let victims = ["bundle.partial", "journal", "journal.tmp", "rootfs.partial", "rootfs"].map { ($0, f.w.file("victim-" + $0)) }
        for (name, victim) in victims {
            fm.createFile(atPath: victim, contents: Data("precious \(name)".utf8))
            let dir = name.hasPrefix("rootfs") ? output : staging
            try fm.createSymbolicLink(atPath: dir + "/" + name, withDestinationPath: victim)
        }
        let lan = try TestLAN(receivers: 1, loss: [0])
        let r = try start(lan, on: "r1", f.receiveArguments(1), log: f.w.file("r1.log"))
        let sender = try start(lan, on: "s", ["send", f.w.file("update.fcb"), "--rate", "100M", "--min-receivers", "1", "--deadline", "30s", "--quiet"],
                               log: f.w.file("s.log"))
        #expect(r.wait(seconds: 60) == 0, "\(r.output)")
        #expect(sender.wait(seconds: 60) == 0, "\(sender.output)")
        #expect(f.deliveredIntact(1))
        for (name, victim) in victims {
            #expect(try String(contentsOfFile: victim, encoding: .utf8) == "precious \(name)", "\(name): the link was followed")
        }
        let kind = try fm.attributesOfItem(atPath: output + "/rootfs")[.type] as? FileAttributeType
        #expect(kind == .typeRegular, "the component replaced the link instead of writing through it")
        #expect((try fm.attributesOfItem(atPath: output + "/rootfs")[.posixPermissions] as? Int) == 0o600)

        // A staging directory that others may write is refused before anything is heard.
        let open = f.w.file("staging-open")
        try fm.createDirectory(atPath: open, withIntermediateDirectories: true)
        chmod(open, 0o777)
        let refused = try fleetcast(["receive", "--interface", "lo", "--trusted-key", f.w.file("vendor.pub"), "--staging-dir", open, "--timeout", "1"],
                                    in: f.w.path)
        #expect(refused.status == 20 && refused.stderr.contains("may be written by other users"), "\(refused.stderr)")
        if getuid() == 0 {
            // One that belongs to another user, likewise.
            let theirs = f.w.file("staging-theirs")
            try fm.createDirectory(atPath: theirs, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            chown(theirs, 65534, 65534)
            let other = try fleetcast(["receive", "--interface", "lo", "--trusted-key", f.w.file("vendor.pub"), "--staging-dir", theirs, "--timeout", "1"],
                                      in: f.w.path)
            #expect(other.status == 20 && other.stderr.contains("belongs to user 65534"), "\(other.stderr)")
        }
    }

    /// Specs/protocol.md P-23: sessions on an IPv6 group (ff15::/16). As root, in the
    /// namespace lab (2001:2::/64 hosts); otherwise on the loopback of an unprivileged
    /// network namespace of this test's own, where lo may carry IPv6 multicast.
    @Test("Send and receive on an IPv6 group", arguments: [false, true])
    func ipv6(encrypted: Bool) throws {
        let f = try NetworkFixture(encrypted: encrypted)
        let group = ["--group", "ff15::4711"]
        if getuid() == 0 {
            let lan = try TestLAN(receivers: 2, loss: [0, 5])
            let rs = try (1...2).map { i in try start(lan, on: "r\(i)", f.receiveArguments(i) + group, log: f.w.file("r\(i).log")) }
            let sender = try start(lan, on: "s", ["send", f.w.file("update.fcb"), "--rate", "100M", "--min-receivers", "2", "--deadline", "30s",
                                                  "--quiet", "--report", f.w.file("fleet.json")] + group, log: f.w.file("s.log"))
            #expect(sender.wait(seconds: 60) == 0, "sender: \(sender.output)")
            for (i, r) in rs.enumerated() {
                #expect(r.wait(seconds: 60) == 0, "receiver \(i + 1): \(r.output)")
                #expect(f.deliveredIntact(i + 1), "receiver \(i + 1) delivered other bytes")
                #expect(r.output.contains("listening on [ff15::4711]"), "\(r.output)")
            }
            #expect(try fleetReport(f).allSatisfy { $0["outcome"] as? String == "verified" })
        } else {
            let port = "\(23000 + Int(getpid() % 2000))"
            let receive = ([fleetcastBinary] + f.receiveArguments(1) + group + ["--interface", "lo", "--port", port]).map { "'\($0)'" }.joined(separator: " ")
            let send = ([fleetcastBinary, "send", f.w.file("update.fcb"), "--rate", "100M", "--min-receivers", "1", "--deadline", "30s", "--quiet",
                         "--interface", "lo", "--ttl", "0", "--port", port] + group).map { "'\($0)'" }.joined(separator: " ")
            let script = "ip link set lo up && ip link set lo multicast on && ip -6 route add ff15::/16 dev lo table local && "
                + "{ \(receive) > '\(f.w.file("r1.log"))' 2>&1 & r=$!; \(send); s=$?; wait $r; echo \"send=$s receive=$?\"; }"
            let run = try runTool("/usr/bin/unshare", ["-r", "-n", "/bin/sh", "-c", script])
            #expect(run.output.contains("send=0 receive=0"), "\(run.output)\n\((try? String(contentsOfFile: f.w.file("r1.log"), encoding: .utf8)) ?? "")")
            #expect(f.deliveredIntact(1))
        }
    }

    /// The example of embedding (Examples/EmbeddedReceiver: DeviceAgent in a socket loop
    /// of its own, no Transport) against a real `fleetcast send`.
    @Test("The embedding example receives, verifies and releases an update from fleetcast send")
    func embeddingExample() throws {
        let f = try NetworkFixture()
        let lan = try TestLAN(receivers: 1, loss: [0])
        let example = URL(fileURLWithPath: fleetcastBinary).deletingLastPathComponent().appendingPathComponent("EmbeddedReceiverExample").path
        let arguments = ["--group", "239.192.0.42", "--port", "\(lan.port)", "--interface", lan.interface, "--trusted-key", f.w.file("vendor.pub"),
                         "--device-key", f.w.file("device.key"), "--hardware-id", "lab-board", "--installed-sequence", "1",
                         "--staging", f.w.file("staging-1"), "--output", f.w.file("out-1"), "--timeout", "40"]
        let r = lan.isNamespaced ? BackgroundProcess("/usr/sbin/ip", ["netns", "exec", "\(lan.prefix)-r1", example] + arguments, log: f.w.file("r1.log"))
            : BackgroundProcess(example, arguments, log: f.w.file("r1.log"))
        try r.start()
        let sender = try start(lan, on: "s", ["send", f.w.file("update.fcb"), "--rate", "100M", "--min-receivers", "1", "--deadline", "30s",
                                              "--quiet", "--report", f.w.file("fleet.json")], log: f.w.file("s.log"))
        #expect(r.wait(seconds: 60) == 0, "example: \(r.output)")
        #expect(sender.wait(seconds: 60) == 0, "sender: \(sender.output)")
        #expect(r.output.contains("offer:") && r.output.contains("verified 2.0"), "\(r.output)")
        #expect(f.deliveredIntact(1))
        #expect(try fleetReport(f).first?["outcome"] as? String == "verified")
    }
}
