import DeviceAgent
import DeviceBackends
import FleetCrypto
import Foundation
import Testing
import UpdateBundle

/// A device for `fleetcast agent run`: A/B slots as files, a configuration, and
/// the loop that a device's power and bootloader make: run the agent; when it
/// exits with 75 (its simulated reboot), `fleetcast agent boot` picks the side
/// and the agent is started again. Started and stopped by PID, in its own
/// directory (and its own namespace host when the LAN is namespaced).
final class TestDevice: @unchecked Sendable {  // its mutable state is behind `lock`
    let name: String
    let directory: String
    let host: String
    let lan: TestLAN
    let oldImage: [UInt8]
    var configPath: String { directory + "/agent.json" }
    private let lock = NSLock()
    private var current: BackgroundProcess?
    private var stopped = false
    /// Exit statuses of each agent run, in order.
    private(set) var exits: [Int32?] = []
    private var thread: Thread?
    private let finished = DispatchSemaphore(value: 0)

    static let shippedImageBytes = 1_000_000

    /// `config` overrides or adds fields of the default configuration.
    init(_ name: String, in w: Workspace, lan: TestLAN, host: String, slotBytes: Int, trustedKey: String, config: [String: Any] = [:]) throws {
        self.name = name
        self.host = host
        self.lan = lan
        directory = w.file(name)
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        var state = UInt64(name.utf8.reduce(7) { $0 &* 31 &+ UInt64($1) })
        oldImage = (0..<Self.shippedImageBytes).map { _ in
            state = state &* 6364136223846793005 &+ 1442695040888963407
            return UInt8(truncatingIfNeeded: state >> 33)
        }
        // Side A holds the shipped image; side B is an empty slot of the same size.
        FileManager.default.createFile(atPath: directory + "/rootfs.a", contents: Data(oldImage + [UInt8](repeating: 0, count: max(0, slotBytes - oldImage.count))))
        FileManager.default.createFile(atPath: directory + "/rootfs.b", contents: Data(count: slotBytes))
        var c: [String: Any] = [
            "device": ["hardware": "lab-board"],
            "shipped": ["version": "1.0", "sequence": 1],
            "trust": ["keys": [trustedKey]],
            "network": ["group": "239.192.0.42", "port": Int(lan.port), "interface": lan.interface],
            "state-dir": "state", "staging-dir": "staging",
            "slots": ["rootfs": ["a": "rootfs.a", "b": "rootfs.b"]],
            "boot": ["directory": "boot", "booted-from": "boot/booted"],
            "health-check": ["command": ["true"], "timeout": 20],
            "simulated-reboot": true,
        ]
        for (k, v) in config { c[k] = v }
        try JSONSerialization.data(withJSONObject: c, options: [.prettyPrinted, .sortedKeys]).write(to: URL(fileURLWithPath: configPath))
        let boot = try fleetcast(["agent", "boot", "--config", configPath], in: directory)
        guard boot.status == 0 else { throw LabError(text: "agent boot: \(boot.stderr)") }
    }

    private func startAgent(_ run: Int) throws -> BackgroundProcess {
        let (path, args) = lan.wrap(on: host, fleetcastBinary, ["agent", "run", "--config", configPath])
        let p = BackgroundProcess(path, args, log: directory + "/agent-\(run).log")
        try p.start()
        return p
    }

    /// Starts the power-and-bootloader loop in the background: at most `bootsMax` runs.
    func powerOn(bootsMax: Int = 12, seconds: Double = 150) {
        let t = Thread { [self] in
            defer { finished.signal() }
            let deadline = Date().addingTimeInterval(seconds)
            for run in 1...bootsMax {
                lock.lock()
                if stopped { lock.unlock(); return }
                let p: BackgroundProcess
                do { p = try startAgent(run) } catch {
                    // Said in `logs`: a restart that could not even start the agent (seen once, in a full run).
                    try? "run \(run): the agent could not be started: \(error)\n".write(toFile: directory + "/agent-start-failed.txt", atomically: true, encoding: .utf8)
                    lock.unlock()
                    return
                }
                current = p
                lock.unlock()
                let status = p.wait(seconds: max(1, deadline.timeIntervalSinceNow))
                // Still running at the loop's deadline: its threads' stacks are kept, then it is killed.
                if status == nil { captureAndKill(p) }
                lock.lock()
                exits.append(status)
                current = nil
                let stop = stopped
                lock.unlock()
                // 75: the simulated reboot; or killed by the test (kill -9), which plays a power cut when asked.
                let killed = killedByTest()
                if killed { lock.lock(); killedRuns += 1; lock.unlock() }
                guard !stop, status == 75 || killed else { return }
                // A test that looks at the files after a kill holds the restart until it is done.
                if killed && holdAfterKill { resume.wait() }
                if status == 75 || rebootAfterKill { _ = try? fleetcast(["agent", "boot", "--config", configPath], in: directory) }
            }
        }
        thread = t
        t.start()
    }

    /// After a kill -9, whether the loop plays a power cut (the bootloader runs) or a process crash.
    var rebootAfterKill = false
    private var kills = 0
    /// Agent runs ended by `kill9`.
    private(set) var killedRuns = 0
    /// Waits until the loop has seen `n` killed runs end.
    func waitUntilKilled(_ n: Int) -> Bool {
        let deadline = Date().addingTimeInterval(20)
        while Date() < deadline {
            lock.lock()
            let k = killedRuns
            lock.unlock()
            if k >= n { return true }
            usleep(5_000)
        }
        return false
    }
    private func killedByTest() -> Bool {
        lock.lock(); defer { lock.unlock() }
        if kills > 0 { kills -= 1; return true }
        return false
    }

    /// After `kill9`, the loop waits for `release()` before it starts the agent again.
    var holdAfterKill = false
    private let resume = DispatchSemaphore(value: 0)
    func release() { resume.signal() }

    /// The running agent's process ID, nil between two runs.
    var agentPID: pid_t? {
        lock.lock(); defer { lock.unlock() }
        return current?.pid
    }

    /// Kills the running agent with SIGKILL (the loop starts it again); false when
    /// none was running (between two runs).
    @discardableResult
    func kill9() -> Bool {
        lock.lock()
        let p = current
        if p != nil { kills += 1 }
        lock.unlock()
        // The loop's own wait sees it end (one waiter per process).
        p?.child?.signal(SIGKILL)
        return p != nil
    }

    /// Stops the agent (SIGTERM) and the loop; waits for both.
    func powerOff() {
        lock.lock()
        stopped = true
        let p = current
        lock.unlock()
        // The loop's wait sees the agent end; it then stops.
        p?.child?.signal(SIGTERM)
        lock.lock()
        let t = thread
        thread = nil
        lock.unlock()
        if t != nil, finished.wait(timeout: .now() + 30) == .timedOut, let p {
            captureAndKill(p)
            _ = finished.wait(timeout: .now() + 10)
        }
    }

    /// An agent that does not end (after SIGTERM, or by the loop's deadline) is stuck
    /// outside its loop: its threads' stacks go to agent-hung.txt (shown with `logs`),
    /// then it is killed.
    private func captureAndKill(_ p: BackgroundProcess) {
        guard p.isRunning else { return }
        let stacks = try? runTool("/usr/bin/gdb", ["-batch", "-p", "\(p.pid)", "-ex", "thread apply all bt 25"])
        try? (stacks?.output ?? "gdb failed").write(toFile: directory + "/agent-hung.txt", atomically: true, encoding: .utf8)
        p.child?.signal(SIGKILL)
    }

    /// `fleetcast agent status --json` (from the running agent, or its files).
    func status() -> [String: Any]? {
        guard let r = try? fleetcast(["agent", "status", "--json", "--config", configPath], in: directory), r.status == 0 else { return nil }
        return (try? JSONSerialization.jsonObject(with: Data(r.stdout.utf8))) as? [String: Any]
    }

    /// Polls `status` until `condition` holds, at most `seconds`: the agent's answer, not a guess at its timing.
    func waitFor(seconds: Double, _ condition: ([String: Any]) -> Bool) -> [String: Any]? {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if let s = status(), condition(s) { return s }
            usleep(50_000)
        }
        return nil
    }

    /// Whether `side`'s slot begins with `image`: a Bool for expectations (swift-testing
    /// would diff two failing megabyte arrays element by element, for minutes).
    func holds(_ side: String, _ image: Image) -> Bool { slot(side, bytes: image.bytes.count) == image.bytes }

    /// An image as an expectation prints it: its size and digest, not its bytes.
    struct Image: CustomStringConvertible {
        let bytes: [UInt8]
        init(_ bytes: [UInt8]) { self.bytes = bytes }
        var description: String { "\(bytes.count) bytes, SHA-256 \(SHA256.hash(bytes).prefix(8).map { String(format: "%02x", $0) }.joined())..." }
    }

    func slot(_ side: String, bytes: Int) -> [UInt8] {
        let data = FileManager.default.contents(atPath: directory + "/rootfs.\(side)") ?? Data()
        return [UInt8](data.prefix(bytes))
    }

    var logs: String {
        (1...20).compactMap { try? String(contentsOfFile: directory + "/agent-\($0).log", encoding: .utf8) }.joined(separator: "\n--- reboot ---\n")
            + ((try? String(contentsOfFile: directory + "/agent-hung.txt", encoding: .utf8)).map { "\n--- a hung agent's threads ---\n" + $0 } ?? "")
            + ((try? String(contentsOfFile: directory + "/agent-start-failed.txt", encoding: .utf8)).map { "\n--- " + $0 } ?? "")
    }
}

extension TestLAN {
    /// A command line run on `host` as it is (no options added).
    func wrap(on host: String, _ path: String, _ arguments: [String]) -> (String, [String]) {
        isNamespaced ? ("/usr/sbin/ip", ["netns", "exec", "\(prefix)-\(host)", path] + arguments) : (path, arguments)
    }
}

/// The device's state as `agent status --json` tells it.
struct DeviceView {
    let json: [String: Any]
    var device: String { json["device"] as? String ?? "?" }
    var installedVersion: String? { (json["installed"] as? [String: Any])?["version"] as? String }
    var installedSide: String? { json["installedSide"] as? String }
    var storedSequence: Int? { json["storedSequence"] as? Int }
    var standing: String { json["standing"] as? String ?? "?" }
    func side(_ s: String) -> (bootable: Bool, confirmed: Bool)? {
        guard let i = (json["boot"] as? [String: Any])?[s] as? [String: Any] else { return nil }
        return (i["bootable"] as? Bool ?? false, i["confirmed"] as? Bool ?? false)
    }
}

/// Steps 3 and 4 with real `fleetcast agent` processes, real files, real UDP
/// (namespaced as root, loopback otherwise): Specs/agent.md end to end.
@Suite("Real devices: fleetcast agent", .serialized)
struct AgentTests {
    func sender(_ lan: TestLAN, _ f: NetworkFixture, _ bundle: String, receivers: Int, awaiting: String, seconds: Int = 120) throws -> BackgroundProcess {
        let (path, args) = lan.command(on: "s", ["send", bundle, "--rate", "200M", "--min-receivers", "\(receivers)", "--await", awaiting,
                                                 "--deadline", "\(seconds)s", "--report", f.w.file("fleet.json"), "--quiet"])
        let p = BackgroundProcess(path, args, log: f.w.file("s.log"))
        try p.start()
        return p
    }

    func fleetReport(_ f: NetworkFixture) -> [String: (outcome: String, reason: String?)] {
        guard let data = FileManager.default.contents(atPath: f.w.file("fleet.json")),
              let json = try? JSONSerialization.jsonObject(with: data) as? [String: Any], let rs = json["receivers"] as? [[String: Any]] else { return [:] }
        var out: [String: (String, String?)] = [:]
        for r in rs { out[r["deviceID"] as? String ?? "?"] = (r["outcome"] as? String ?? "?", r["failureReason"] as? String) }
        return out
    }

    @Test("A fleet of four agents, --await confirmed: one confirms, one fails its health check and rolls back, one is killed mid-install and recovers, one waits for `agent install`")
    func fleetOfFour() throws {
        let f = try NetworkFixture(imageBytes: 24_000_000, encrypted: false)
        let lan = try TestLAN(receivers: 4, loss: [])
        let slot = 32 << 20
        let key = f.w.file("vendor.pub")
        let good = try TestDevice("good", in: f.w, lan: lan, host: "r1", slotBytes: slot, trustedKey: key)
        let sick = try TestDevice("sick", in: f.w, lan: lan, host: "r2", slotBytes: slot, trustedKey: key,
                                  config: ["health-check": ["command": ["sh", "-c", "echo the service does not start >&2; exit 3"], "timeout": 20]])
        let killed = try TestDevice("killed", in: f.w, lan: lan, host: "r3", slotBytes: slot, trustedKey: key)
        let manual = try TestDevice("manual", in: f.w, lan: lan, host: "r4", slotBytes: slot, trustedKey: key, config: ["trigger": "manual"])
        let devices = [good, sick, killed, manual]
        for d in devices { d.powerOn() }
        defer { for d in devices { d.powerOff() } }
        // Each agent is listening once its control socket answers.
        for d in devices { #expect(d.waitFor(seconds: 30) { $0["running"] as? Bool == true } != nil, "\(d.name) did not start: \(d.logs)") }
        let s = try sender(lan, f, f.w.file("update.fcb"), receivers: 4, awaiting: "confirmed")

        // Killed while its transfer is under way (blocks in, not all).
        let midway = killed.waitFor(seconds: 60) { s in
            guard let t = s["transfer"] as? [String: Any], let done = t["blocksDone"] as? Int, let total = t["blocksTotal"] as? Int else { return false }
            return done > 0 && done < total
        }
        #expect(midway != nil, "the killed device never showed a transfer under way: \(killed.logs)")
        killed.kill9()
        // The manual one installs, then waits for `agent install`.
        let ready = manual.waitFor(seconds: 90) { ($0["standing"] as? String)?.hasPrefix("installed") == true }
        #expect(ready != nil, "the manual device never became ready: \(manual.logs)")
        let install = try fleetcast(["agent", "install", "--config", manual.configPath], in: manual.directory)
        #expect(install.status == 0, "agent install: \(install.stderr)")

        let senderStatus = s.wait(seconds: 150)
        for d in devices { d.powerOff() }
        // One device rolled back: not every device reached confirmed.
        #expect(senderStatus == 32, "sender: \(s.output)")
        let report = fleetReport(f)
        let views = devices.map { DeviceView(json: $0.status() ?? [:]) }
        for (d, v) in zip(devices, views) where d !== sick {
            #expect(report[v.device]?.outcome == "confirmed", "\(d.name): \(String(describing: report[v.device])) \(s.output)\n\(d.logs)")
            #expect(v.installedVersion == "2.0" && v.installedSide == "b" && v.storedSequence == 2, "\(d.name): \(v.json)")
            #expect(v.side("b")?.confirmed == true && v.side("a")?.confirmed == true, "\(d.name): \(v.json)")
            #expect(d.holds("b", .init(f.image)), "\(d.name): slot b does not hold the image")
        }
        let sickView = views[1]
        #expect(report[sickView.device]?.outcome == "rolled back" && report[sickView.device]?.reason == "unhealthy",
                "sick: \(String(describing: report[sickView.device])) \(s.output)\n\(sick.logs)")
        #expect(sickView.installedVersion == "1.0" && sickView.installedSide == "a" && sickView.storedSequence == 1, "sick: \(sickView.json)")
        #expect(sickView.side("a")?.confirmed == true && sickView.side("b")?.bootable == false, "sick: \(sickView.json)")
        #expect(sick.slot("a", bytes: TestDevice.shippedImageBytes) == sick.oldImage, "the rolled-back device's running slot changed")
        // The sender's report lists every device's final state.
        #expect(s.output.contains("confirmed") && s.output.contains("rolled back (unhealthy)"), "\(s.output)")
        // The killed device was restarted, and every device rebooted into the update at least once.
        #expect(killed.killedRuns == 1, "\(killed.exits)")
        for d in devices { #expect(d.exits.contains(75), "\(d.name): \(d.exits)") }
    }

    @Test("Bad input, each refused with its own reason and the running side intact: other hardware, old sequence, slot too small, no room, a failing reboot command, a health check that times out, the disk full during the install")
    func badInput() throws {
        let f = try NetworkFixture(imageBytes: 3_000_000, encrypted: false)
        let lan = try TestLAN(receivers: 7, loss: [])
        let key = f.w.file("vendor.pub")
        let slot = 4 << 20
        // No room: staging on a 32 KiB file system, too small even for the bundle's
        // envelope and auth chain (its 3 MB plain payload would go to the slot, P-29b).
        let tiny = f.w.file("tiny")
        try FileManager.default.createDirectory(atPath: tiny, withIntermediateDirectories: true)
        let mounted = try runTool("/usr/bin/mount", ["-t", "tmpfs", "-o", "size=32k", "tmpfs", tiny])
        #expect(mounted.status == 0, "mount: \(mounted.output)")
        defer { _ = try? runTool("/usr/bin/umount", [tiny]) }
        // The disk full during the install: the spare slot is a sparse 4 MiB file on a
        // 1 MiB file system, so the offer's size check passes and a write fails midway.
        let slotfs = f.w.file("slotfs")
        try FileManager.default.createDirectory(atPath: slotfs, withIntermediateDirectories: true)
        let slotfsMounted = try runTool("/usr/bin/mount", ["-t", "tmpfs", "-o", "size=1m", "tmpfs", slotfs])
        #expect(slotfsMounted.status == 0, "mount: \(slotfsMounted.output)")
        defer { _ = try? runTool("/usr/bin/umount", [slotfs]) }
        _ = FileManager.default.createFile(atPath: slotfs + "/rootfs.b", contents: nil)
        let sparse = try #require(FileHandle(forWritingAtPath: slotfs + "/rootfs.b"))
        try sparse.truncate(atOffset: UInt64(slot))
        try sparse.close()
        let cases: [(TestDevice, String)] = [
            (try TestDevice("otherhw", in: f.w, lan: lan, host: "r1", slotBytes: slot, trustedKey: key, config: ["device": ["hardware": "other-board"]]),
             "incompatibleHardware"),
            (try TestDevice("oldseq", in: f.w, lan: lan, host: "r2", slotBytes: slot, trustedKey: key, config: ["shipped": ["version": "1.5", "sequence": 5]]),
             "rollback"),
            (try TestDevice("small", in: f.w, lan: lan, host: "r3", slotBytes: 2 << 20, trustedKey: key), "slot"),
            (try TestDevice("full", in: f.w, lan: lan, host: "r4", slotBytes: slot, trustedKey: key, config: ["staging-dir": tiny + "/staging"]), "storage"),
            (try TestDevice("noreboot", in: f.w, lan: lan, host: "r5", slotBytes: slot, trustedKey: key,
                            config: ["simulated-reboot": false, "reboot-command": ["sh", "-c", "echo reboot refused >&2; exit 1"]]), "rebootFailed"),
            (try TestDevice("hangs", in: f.w, lan: lan, host: "r6", slotBytes: slot, trustedKey: key,
                            config: ["health-check": ["command": ["sleep", "30"], "timeout": 1]]), "unhealthy"),
            (try TestDevice("diskfull", in: f.w, lan: lan, host: "r7", slotBytes: slot, trustedKey: key,
                            config: ["slots": ["rootfs": ["a": "rootfs.a", "b": slotfs + "/rootfs.b"]]]), "storage"),
        ]
        let devices = cases.map(\.0)
        for d in devices { d.powerOn() }
        defer { for d in devices { d.powerOff() } }
        for d in devices { #expect(d.waitFor(seconds: 30) { $0["running"] as? Bool == true } != nil, "\(d.name) did not start: \(d.logs)") }
        let s = try sender(lan, f, f.w.file("update.fcb"), receivers: devices.count, awaiting: "confirmed")
        let senderStatus = s.wait(seconds: 150)
        for d in devices { d.powerOff() }
        #expect(senderStatus == 32, "sender: \(s.output)")
        let report = fleetReport(f)
        for (d, reason) in cases {
            let v = DeviceView(json: d.status() ?? [:])
            let outcome = report[v.device]
            let expected = reason == "unhealthy" ? "rolled back" : "failed"
            #expect(outcome?.outcome == expected && outcome?.reason == reason, "\(d.name): \(String(describing: outcome)), \(s.output)\n\(d.logs)")
            // The running side is untouched, good, and what the device runs.
            #expect(v.installedSide == "a" && v.side("a")?.bootable == true && v.side("a")?.confirmed == true && v.side("b")?.bootable == false,
                    "\(d.name): \(v.json)")
            #expect(d.slot("a", bytes: TestDevice.shippedImageBytes) == d.oldImage, "\(d.name): the running slot changed")
            #expect(v.standing == "idle", "\(d.name): \(v.json)\nexits \(d.exits)\n\(d.logs)")
        }
        #expect(DeviceView(json: devices[1].status() ?? [:]).storedSequence == 5)
        // The full disk was met by a slot write, midway (not by the offer's checks).
        #expect(devices[6].logs.contains("No space left on device"), "\(devices[6].logs)")
        // A failure that would recur is not tried again in the same session (Specs/agent.md A-10).
        for d in [devices[4], devices[6]] {
            #expect(d.logs.components(separatedBy: "update 2.0 failed").count == 2, "\(d.name) failed more than once:\n\(d.logs)")
        }
        // The refused ones never wrote a byte to their spare slot.
        for d in devices.prefix(4) { #expect(d.slot("b", bytes: 1 << 20).allSatisfy { $0 == 0 }, "\(d.name) wrote its spare slot") }
    }

    @Test("No room for a second copy: a plain image is staged in the spare slot itself (Specs/protocol.md P-29b), with staging smaller than the image")
    func noSecondCopy() throws {
        let f = try NetworkFixture(imageBytes: 3_000_000, encrypted: false)
        let lan = try TestLAN(receivers: 1, loss: [5])
        // Staging on a 1 MiB file system: a third of the image.
        let small = f.w.file("small")
        try FileManager.default.createDirectory(atPath: small, withIntermediateDirectories: true)
        let mounted = try runTool("/usr/bin/mount", ["-t", "tmpfs", "-o", "size=1m", "tmpfs", small])
        #expect(mounted.status == 0, "mount: \(mounted.output)")
        defer { _ = try? runTool("/usr/bin/umount", [small]) }
        let d = try TestDevice("dev", in: f.w, lan: lan, host: "r1", slotBytes: 4 << 20, trustedKey: f.w.file("vendor.pub"),
                               config: ["staging-dir": small + "/staging"])
        d.powerOn()
        defer { d.powerOff() }
        #expect(d.waitFor(seconds: 30) { $0["running"] as? Bool == true } != nil, "\(d.logs)")
        let s = try sender(lan, f, f.w.file("update.fcb"), receivers: 1, awaiting: "confirmed")
        #expect(s.wait(seconds: 150) == 0, "\(s.output)\n\(d.logs)")
        d.powerOff()
        let v = DeviceView(json: d.status() ?? [:])
        #expect(v.installedVersion == "2.0" && v.installedSide == "b" && v.side("b")?.confirmed == true, "\(v.json)")
        #expect(d.holds("b", .init(f.image)), "the confirmed slot differs from the image")
        #expect(d.logs.contains("staged in the slot as it arrived"), "\(d.logs)")
    }

    @Test("A compressed image goes through the staging window (Specs/protocol.md P-29c): staging smaller than the bundle, 5% loss, confirmed by default ('auto'); staged whole, the same device has no room")
    func windowedStaging() throws {
        let f = try NetworkFixture(imageBytes: 1_000_000, encrypted: false)
        // Firmware-like, 40 MiB: each MiB half random, half zeros, so zlib halves it.
        var image: [UInt8] = []
        image.reserveCapacity(40 << 20)
        for i in 0..<40 {
            let offset = (i * 7919) % (f.image.count - (512 << 10))
            image += f.image[offset..<(offset + (512 << 10))]
            image += [UInt8](repeating: 0, count: 512 << 10)
        }
        FileManager.default.createFile(atPath: f.w.file("fw"), contents: Data(image))
        let packed = try fleetcast(["pack", "--quiet", "--output", "fw.fcb", "--product", "lab", "--hardware", "lab-board", "--version", "2.0",
                                    "--sequence", "2", "--component", "rootfs=fw", "--sign", "vendor.key"], in: f.w.path)
        #expect(packed.status == 0, "\(packed.stderr)")
        let bundleBytes = try FileManager.default.attributesOfItem(atPath: f.w.file("fw.fcb"))[.size] as? Int ?? 0
        // Staging on 12 MiB file systems: the compressed bundle does not fit whole.
        #expect(bundleBytes > 16 << 20, "bundle of \(bundleBytes) bytes")
        var mounts: [String] = []
        defer { for m in mounts { _ = try? runTool("/usr/bin/umount", [m]) } }
        for name in ["small1", "small2"] {
            let dir = f.w.file(name)
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            let mounted = try runTool("/usr/bin/mount", ["-t", "tmpfs", "-o", "size=12m", "tmpfs", dir])
            #expect(mounted.status == 0, "mount: \(mounted.output)")
            mounts.append(dir)
        }
        let lan = try TestLAN(receivers: 2, loss: [5, 5])
        let key = f.w.file("vendor.pub")
        // The default, "auto": no room for the bundle, so a window of the room there is.
        let windowed = try TestDevice("windowed", in: f.w, lan: lan, host: "r1", slotBytes: 48 << 20, trustedKey: key,
                                      config: ["staging-dir": mounts[0] + "/staging"])
        let whole = try TestDevice("whole", in: f.w, lan: lan, host: "r2", slotBytes: 48 << 20, trustedKey: key,
                                   config: ["staging-dir": mounts[1] + "/staging", "staging-window": "whole"])
        let devices = [windowed, whole]
        for d in devices { d.powerOn() }
        defer { for d in devices { d.powerOff() } }
        for d in devices { #expect(d.waitFor(seconds: 30) { $0["running"] as? Bool == true } != nil, "\(d.name): \(d.logs)") }
        let s = try sender(lan, f, f.w.file("fw.fcb"), receivers: 2, awaiting: "confirmed")
        // One device failed (no room staged whole): the sender's exit status says so.
        #expect(s.wait(seconds: 150) == 32, "\(s.output)")
        for d in devices { d.powerOff() }
        let report = fleetReport(f)
        let v = DeviceView(json: windowed.status() ?? [:])
        #expect(report[v.device]?.outcome == "confirmed", "\(String(describing: report[v.device])) \(s.output)\n\(windowed.logs)")
        #expect(v.installedVersion == "2.0" && v.installedSide == "b" && v.side("b")?.confirmed == true, "\(v.json)")
        #expect(windowed.holds("b", .init(image)), "the confirmed slot differs from the image")
        #expect(windowed.logs.contains("staged through the window, at most"), "\(windowed.logs)")
        for line in windowed.logs.split(separator: "\n") where line.contains("staged through the window") { print("windowedStaging: \(line)") }
        let u = DeviceView(json: whole.status() ?? [:])
        #expect(report[u.device]?.outcome == "failed" && report[u.device]?.reason == "storage", "\(String(describing: report[u.device]))\n\(whole.logs)")
        #expect(u.installedVersion == "1.0" && u.side("a")?.confirmed == true, "\(u.json)")
    }

    @Test("systemd: the shipped units pass systemd-analyze verify, and mark-good --wait waits for an agent that starts after it")
    func systemdUnits() throws {
        let w = Workspace()
        // The units name the installed path; verify checks that it is executable, so
        // the copies name the binary under test instead. Nothing else changes.
        for unit in ["fleetcast-agent.service", "fleetcast-mark-good.service"] {
            let text = try String(contentsOfFile: TestLAN.repository + "/contrib/" + unit, encoding: .utf8)
            #expect(text.contains("ExecStart=/usr/local/bin/fleetcast "), "\(unit) runs the installed binary")
            try text.replacingOccurrences(of: "/usr/local/bin/fleetcast", with: fleetcastBinary).write(toFile: w.file(unit), atomically: true, encoding: .utf8)
        }
        let verified = try runTool("/usr/bin/systemd-analyze", ["verify", w.file("fleetcast-agent.service"), w.file("fleetcast-mark-good.service")])
        #expect(verified.status == 0 && verified.output.isEmpty, "systemd-analyze verify: \(verified.output)")
        // What the mark-good unit relies on: started before the agent, it waits for it.
        _ = try fleetcast(["keygen", "--type", "ed25519", "--out", "vendor"], in: w.path)
        let lan = try TestLAN(receivers: 1, loss: [])
        let d = try TestDevice("dev", in: w, lan: lan, host: "r1", slotBytes: 2 << 20, trustedKey: w.file("vendor.pub"))
        let noAgent = try fleetcast(["agent", "mark-good", "--config", d.configPath, "--wait", "0.3"], in: w.path)
        #expect(noAgent.status == 69 && noAgent.stderr.contains("after 0.3 s"), "\(noAgent.status) \(noAgent.stderr)")
        let waiting = BackgroundProcess(fleetcastBinary, ["agent", "mark-good", "--config", d.configPath, "--wait", "60"], log: w.file("mark.log"))
        try waiting.start()
        d.powerOn()
        defer { d.powerOff() }
        // Reached the agent: nothing is on trial on a device as shipped (65, which the unit counts as success).
        #expect(waiting.wait(seconds: 60) == 65, "\(waiting.output)")
        #expect(!waiting.output.contains("no agent is running"), "\(waiting.output)")
    }

    @Test("The grub and uboot backends (Specs/agent.md §3.3, §3.4), real grub-editenv, fw_printenv and fw_setenv on files: one device installs and confirms, one fails its health check and rolls back; the environment says so in RAUC's variables, the bootloader's own kept",
          arguments: ["grub", "uboot"])
    func bootloaderBackend(backend: String) throws {
        let f = try NetworkFixture(imageBytes: 1_000_000, encrypted: false)
        let lan = try TestLAN(receivers: 2, loss: [])
        let key = f.w.file("vendor.pub")
        let config: [String: Any] = ["backend": backend, "directory": "boot", "booted-from": "boot/booted"]
        // A uboot device ships with its environment; a grub one gets its block at the first start.
        if backend == "uboot" { for name in ["good", "bad"] { try shipUBootEnvironment(at: f.w.file(name) + "/boot") } }
        let good = try TestDevice("good", in: f.w, lan: lan, host: "r1", slotBytes: 2 << 20, trustedKey: key, config: ["boot": config])
        let bad = try TestDevice("bad", in: f.w, lan: lan, host: "r2", slotBytes: 2 << 20, trustedKey: key,
                                 config: ["boot": config, "health-check": ["command": ["false"], "timeout": 5]])
        let devices = [good, bad]
        for d in devices { d.powerOn() }
        defer { for d in devices { d.powerOff() } }
        for d in devices { #expect(d.waitFor(seconds: 30) { $0["running"] as? Bool == true } != nil, "\(d.name): \(d.logs)") }
        let s = try sender(lan, f, f.w.file("update.fcb"), receivers: 2, awaiting: "confirmed")
        #expect(s.wait(seconds: 150) == 32, "one rolled back: \(s.output)")
        for d in devices { d.powerOff() }
        let report = fleetReport(f)
        func env(_ d: TestDevice) throws -> Set<Substring> {
            let r = backend == "grub" ? try runTool("/usr/bin/grub-editenv", [d.directory + "/boot/grubenv", "list"])
                : try runTool("/usr/bin/fw_printenv", ["-c", d.directory + "/boot/fw_env.config"])
            #expect(r.status == 0, "\(r.output)")
            return Set(r.output.split(separator: "\n"))
        }
        let p = backend == "grub" ? "" : "BOOT_"
        let own: Set<Substring> = backend == "grub" ? [] : ["bootcmd=run fleetcast_boot"]
        let g = DeviceView(json: good.status() ?? [:])
        #expect(report[g.device]?.outcome == "confirmed", "\(String(describing: report[g.device])) \(good.logs)")
        #expect(g.installedSide == "b" && good.holds("b", .init(f.image)), "\(g.json)")
        let goodEnv = try env(good)
        #expect(goodEnv.isSuperset(of: own.union(["\(p)ORDER=B A", "\(p)B_OK=1", "\(p)B_TRY=0", "\(p)A_OK=1", "\(p)A_TRY=0"].map { Substring($0) })), "\(goodEnv)")
        let b = DeviceView(json: bad.status() ?? [:])
        #expect(report[b.device]?.outcome == "rolled back", "\(String(describing: report[b.device])) \(bad.logs)")
        #expect(b.installedSide == "a" && b.side("a")?.confirmed == true, "\(b.json)")
        let badEnv = try env(bad)
        #expect(badEnv.isSuperset(of: own.union(["\(p)ORDER=A B", "\(p)A_OK=1", "\(p)A_TRY=0", "\(p)B_OK=0"].map { Substring($0) })), "\(badEnv)")
        if backend == "grub" { #expect(!FileManager.default.fileExists(atPath: good.directory + "/boot/grubenv.new")) }
    }

    @Test("An expired bundle is refused at the offer; the device keeps running its side")
    func expired() throws {
        let f = try NetworkFixture(imageBytes: 1_000_000, encrypted: false)
        // Made two days ago, valid for one.
        let r = try fleetcast(["pack", "--quiet", "--output", "expired.fcb", "--product", "lab", "--hardware", "lab-board", "--version", "3.0",
                               "--sequence", "3", "--component", "rootfs=image", "--sign", "vendor.key", "--created-at", "\(UInt64(Date().timeIntervalSince1970) - 172_800)",
                               "--expires-in", "1d"], in: f.w.path)
        #expect(r.status == 0, "\(r.stderr)")
        let lan = try TestLAN(receivers: 1, loss: [])
        let d = try TestDevice("dev", in: f.w, lan: lan, host: "r1", slotBytes: 2 << 20, trustedKey: f.w.file("vendor.pub"))
        d.powerOn()
        defer { d.powerOff() }
        #expect(d.waitFor(seconds: 30) { $0["running"] as? Bool == true } != nil, "\(d.logs)")
        let s = try sender(lan, f, f.w.file("expired.fcb"), receivers: 1, awaiting: "confirmed", seconds: 60)
        #expect(s.wait(seconds: 90) == 32, "\(s.output)")
        d.powerOff()
        let v = DeviceView(json: d.status() ?? [:])
        #expect(fleetReport(f)[v.device]?.reason == "expired", "\(s.output)")
        #expect(v.installedVersion == "1.0" && v.side("a")?.confirmed == true && v.side("b")?.bootable == false, "\(v.json)")
    }

    @Test("The configuration is checked field by field: unknown, missing, wrong type, out of range, a key file missing")
    func configuration() throws {
        let w = Workspace()
        _ = try fleetcast(["keygen", "--type", "ed25519", "--out", "vendor"], in: w.path)
        let base: [String: Any] = [
            "shipped": ["version": "1.0", "sequence": 1], "trust": ["keys": ["vendor.pub"]],
            "network": ["group": "239.192.0.42"], "state-dir": "state", "staging-dir": "staging",
            "slots": ["rootfs": ["a": "a.img", "b": "b.img"]], "boot": ["directory": "boot", "booted-from": "booted"],
        ]
        func run(_ change: (inout [String: Any]) -> Void) throws -> Run {
            var c = base
            change(&c)
            try JSONSerialization.data(withJSONObject: c).write(to: URL(fileURLWithPath: w.file("agent.json")))
            return try fleetcast(["agent", "run", "--config", w.file("agent.json")], in: w.path)
        }
        let cases: [((inout [String: Any]) -> Void, Int32, String)] = [
            ({ $0["trigerr"] = "manual" }, 64, "trigerr: unknown field"),
            ({ $0["network"] = ["group": "239.192.0.42", "prot": 4711] }, 64, "network.prot: unknown field"),
            ({ $0["state-dir"] = nil }, 64, "state-dir: missing"),
            ({ $0["trial-attempts"] = "3" }, 64, "trial-attempts: expected a whole number, got a string"),
            ({ $0["trial-attempts"] = 0 }, 64, "trial-attempts: 0 is outside 1...10"),
            ({ $0["trigger"] = "sometimes" }, 64, "trigger: 'sometimes' is not one of 'automatic', 'manual'"),
            ({ $0["simulated-reboot"] = 1 }, 64, "simulated-reboot: expected true or false, got a number"),
            ({ $0["slots"] = ["rootfs": ["a": "a.img"]] }, 64, "slots.rootfs.b: missing"),
            ({ $0["staging-window"] = "10k" }, 64, "staging-window: '10k' is not 'auto', 'whole' or a size of at least 1M"),
            ({ $0["boot"] = ["backend": "lilo", "directory": "boot"] }, 64, "boot.backend: 'lilo' is not one of 'statefile', 'grub', 'uboot'"),
            ({ $0["boot"] = ["backend": "grub", "directory": "boot", "tool": "/no/grub-editenv"] }, 66, "/no/grub-editenv is missing or not executable"),
            ({ $0["boot"] = ["backend": "uboot", "directory": "boot", "tool": "/usr/bin/fw_setenv"] }, 64, "boot.tool: unknown field"),
            ({ $0["boot"] = ["backend": "uboot", "directory": "boot", "printenv": "/no/fw_printenv"] }, 66, "/no/fw_printenv is missing or not executable"),
            ({ $0["boot"] = ["backend": "uboot", "directory": "boot"] }, 66, "fw_env.config (the fw_env.config naming the environment's two copies) is missing"),
            ({ $0["trust"] = ["keys": ["missing.pub"]] }, 66, "missing.pub: key file missing"),
            ({ $0["activation"] = "hot" }, 64, "activation: 'hot' is not one of 'reboot', 'live'"),
            ({ $0["activation"] = "live" }, 64, "live: missing (activation live needs the service's root and command)"),
            ({ $0["activation"] = "live"; $0["live"] = ["root": "app", "command": ["srv"], "listen": "8080"] }, 64, "live.listen: '8080' is not HOST:PORT"),
            ({ $0["activation"] = "live"; $0["live"] = ["root": "app", "command": ["srv"], "ready": "soon"] }, 64, "live.ready: 'soon' is not one of 'notify', 'running'"),
            ({ $0["activation"] = "live"; $0["live"] = ["root": "app", "command": ["srv"]] }, 66, "app/a is not a directory"),
            ({ $0["activation"] = "live"; $0["live"] = ["root": "app", "command": ["srv"], "ready-timeout": 0] }, 64, "live.ready-timeout: 0.0 s is outside 0.1...600 s"),
        ]
        for (change, status, message) in cases {
            let r = try run(change)
            #expect(r.status == status && r.stderr.contains(message), "expected \(status) '\(message)', got \(r.status): \(r.stderr)")
        }
        try Data("{ not json".utf8).write(to: URL(fileURLWithPath: w.file("broken.json")))
        let broken = try fleetcast(["agent", "run", "--config", w.file("broken.json")], in: w.path)
        #expect(broken.status == 64 && broken.stderr.contains("not valid JSON"), "\(broken.stderr)")
        let none = try fleetcast(["agent", "run", "--config", w.file("absent.json")], in: w.path)
        #expect(none.status == 66, "\(none.stderr)")
    }

    @Test("kill -9 at seeded random moments of download, install and activation, on real files: after every kill the invariants hold (Specs/agent.md I1-I5)")
    func killNine() throws {
        let env = ProcessInfo.processInfo.environment
        let seed = env["FLEETCAST_KILL_SEED"].flatMap { UInt64($0) } ?? 0x6B11_9A7E
        let target = env["FLEETCAST_KILL_RUNS"].flatMap { Int($0) } ?? 50
        var rng = SeededGenerator(seed: seed)
        let w = Workspace()
        for r in [try fleetcast(["keygen", "--type", "ed25519", "--out", "vendor"], in: w.path)] { #expect(r.status == 0) }
        let lan = try TestLAN(receivers: 1, loss: [])
        let imageBytes = 12_000_000
        // A 1M staging window (16 blocks): the zlib rounds' 43-block payloads go through it
        // (Specs/protocol.md P-29c), so kills also land between a journal and a release.
        let d = try TestDevice("dev", in: w, lan: lan, host: "r1", slotBytes: 16 << 20, trustedKey: w.file("vendor.pub"),
                               config: ["health-check": ["command": ["sh", "-c", "sleep 0.3"], "timeout": 20], "staging-window": "1M"])
        var check = InvariantCheck(device: d, imageBytes: imageBytes)
        check.verified.insert(SHA256Digest(d.oldImage + [UInt8](repeating: 0, count: imageBytes - d.oldImage.count)))
        d.holdAfterKill = true
        // CI's 50 kills take about 17 releases and 80 s; a longer run (FLEETCAST_KILL_RUNS=500)
        // gets room in proportion: boots (a kill restarts, a release reboots) and time.
        let roundsMax = max(40, target), secondsMax = max(600.0, Double(target) * 6)
        d.powerOn(bootsMax: max(400, target * 4), seconds: secondsMax + 300)
        defer { d.powerOff() }
        #expect(d.waitFor(seconds: 30) { $0["running"] as? Bool == true } != nil, "\(d.logs)")
        var kills = 0
        var phases: [String: Int] = [:]
        var round = 0
        let started = Date()
        while kills < target && round < roundsMax && Date().timeIntervalSince(started) < secondsMax {
            round += 1
            // Each round a new release: a fresh image, the next sequence.
            // Words, not bytes, from the generator: a debug build draws 12 M bytes slowly.
            let words = (0..<(imageBytes / 8)).map { _ in rng.next() }
            let image = words.withUnsafeBytes { [UInt8]($0) }
            FileManager.default.createFile(atPath: w.file("image-\(round)"), contents: Data(image))
            let packed = try fleetcast(["pack", "--quiet", "--output", "u\(round).fcb", "--product", "lab", "--hardware", "lab-board", "--version", "\(round + 1).0",
                                        "--sequence", "\(round + 1)", "--component", "rootfs=image-\(round)", "--sign", "vendor.key",
                                        "--compression", round % 2 == 0 ? "zlib" : "none"], in: w.path)
            #expect(packed.status == 0, "\(packed.stderr)")
            check.verified.insert(SHA256Digest(image))
            let (path, args) = lan.command(on: "s", ["send", w.file("u\(round).fcb"), "--rate", "150M", "--min-receivers", "1", "--await", "confirmed",
                                                     "--deadline", "120s", "--quiet"])
            let s = BackgroundProcess(path, args, log: w.file("s\(round).log"))
            try s.start()
            // Kill at random moments until the round settles; every kill is checked.
            while s.isRunning && kills < target {
                usleep(UInt32.random(in: 50_000...1_500_000, using: &rng))  // the moment of the kill, drawn from the seed
                guard s.isRunning else { break }
                d.rebootAfterKill = Bool.random(using: &rng)
                guard d.kill9() else { continue }
                kills += 1
                // The files as the kill left them (the agent is not restarted meanwhile).
                #expect(d.waitUntilKilled(kills), "kill \(kills) not seen")
                let phase = check.run(after: "kill \(kills) (seed \(seed))")
                phases[phase, default: 0] += 1
                d.release()
            }
            let status = s.wait(seconds: 150)
            // The round settles by itself after the last kill: confirmed, or rolled back (attempts spent).
            let settled = d.waitFor(seconds: 60) { ($0["standing"] as? String) == "idle" && ($0["running"] as? Bool) == true }
            #expect(settled != nil, "round \(round) did not settle (seed \(seed)): \(d.logs.suffix(3000))")
            _ = check.run(after: "round \(round) settled (seed \(seed))")
            let record = check.record()
            let confirmed = record?.installed.version == "\(round + 1).0"
            let rolledBack = record?.rolledBack.count ?? 0 > check.rolledBackSeen
            check.rolledBackSeen = record?.rolledBack.count ?? 0
            #expect(confirmed || rolledBack, "I4: round \(round) neither confirmed nor rolled back (seed \(seed)): \(String(describing: record))")
            #expect(status == 0 || rolledBack, "round \(round): sender \(String(describing: status)): \(s.output)")
            if confirmed { #expect(d.holds(record!.installedSide == .a ? "a" : "b", .init(image)), "round \(round): the confirmed slot differs") }
        }
        print("kill -9: \(kills) kills over \(round) releases, by phase at the kill: \(phases.sorted { $0.key < $1.key }) (seed \(seed))")
        #expect(kills >= target, "only \(kills) kills in time (seed \(seed))")
        #expect(check.violations.isEmpty, "seed \(seed): \(check.violations.prefix(10))")
        #expect(phases["installing", default: 0] > 0 && phases["trial", default: 0] > 0, "kills missed a phase: \(phases) (seed \(seed))")
    }

    @Test("kill -9 of the agent inside each of its boot-backend writes (the tool killed with it, or left to finish), grub and uboot on the real tools: after every kill and restart the invariants hold, and the update settles",
          arguments: ["grub", "uboot"])
    func killNineInBackendWrite(backend: String) throws {
        let w = Workspace()
        #expect(try fleetcast(["keygen", "--type", "ed25519", "--out", "vendor"], in: w.path).status == 0)
        let lan = try TestLAN(receivers: 1, loss: [])
        let boot = w.file("dev") + "/boot"
        try FileManager.default.createDirectory(atPath: boot, withIntermediateDirectories: true)
        // The write tool (grub-editenv's create and set, fw_setenv), wrapped. Its calls by the
        // running agent (not by the simulated bootloader) are counted, and every `period`-th
        // one says so with its PID and waits for its parent to end (bounded) before it runs
        // the real tool; the test kills the agent meanwhile. The calls in between let the
        // retried write through (grub: its create and set; uboot: one fw_setenv), so the
        // update moves on.
        let period = backend == "grub" ? 3 : 2
        let real = backend == "grub" ? "/usr/bin/grub-editenv" : "/usr/bin/fw_setenv"
        let wrapper = w.file("write-tool"), count = w.file("write-count")
        try """
        #!/bin/sh
        \(backend == "grub" ? "case \"$2\" in create|set) ;; *) exec \(real) \"$@\" ;; esac" : "")
        if tr '\\0' ' ' < /proc/$PPID/cmdline | grep -q ' agent run '; then
          n=$(cat \(count) 2>/dev/null || echo 0); n=$((n+1)); echo $n > \(count)
          if [ $((n % \(period))) = \(period - 1) ]; then
            echo $$ > \(w.file("in-write.tmp")) && mv \(w.file("in-write.tmp")) \(w.file("in-write"))
            i=0
            while kill -0 $PPID 2>/dev/null && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done
          fi
        fi
        exec \(real) "$@"

        """.write(toFile: wrapper, atomically: true, encoding: .utf8)
        chmod(wrapper, 0o755)
        var bootConfig: [String: Any] = ["backend": backend, "directory": "boot", "booted-from": "boot/booted"]
        let readBoot: (TestDevice) -> BootState?
        if backend == "grub" {
            bootConfig["tool"] = wrapper
            readBoot = { d in try? GrubBootControl(envPath: d.directory + "/boot/grubenv").read() }
        } else {
            try shipUBootEnvironment(at: boot)
            bootConfig["setenv"] = wrapper
            readBoot = { d in try? UBootBootControl(config: d.directory + "/boot/fw_env.config").read() }
        }
        let imageBytes = 2_000_000
        let d = try TestDevice("dev", in: w, lan: lan, host: "r1", slotBytes: 4 << 20, trustedKey: w.file("vendor.pub"), config: ["boot": bootConfig])
        var check = InvariantCheck(device: d, imageBytes: imageBytes)
        check.readBoot = readBoot
        check.verified.insert(SHA256Digest(d.oldImage + [UInt8](repeating: 0, count: imageBytes - d.oldImage.count)))
        d.holdAfterKill = true
        d.powerOn(bootsMax: 60, seconds: 400)
        defer { d.powerOff() }
        #expect(d.waitFor(seconds: 30) { $0["running"] as? Bool == true } != nil, "\(d.logs)")
        var kills = 0, toolKilled = 0, toolFinished = 0
        for round in 1...3 {
            let image = (0..<imageBytes).map { UInt8(truncatingIfNeeded: $0 &* (round * 2 + 1) &+ round) }
            FileManager.default.createFile(atPath: w.file("image-\(round)"), contents: Data(image))
            #expect(try fleetcast(["pack", "--quiet", "--output", "u\(round).fcb", "--product", "lab", "--hardware", "lab-board", "--version", "\(round + 1).0",
                                   "--sequence", "\(round + 1)", "--component", "rootfs=image-\(round)", "--sign", "vendor.key", "--compression", "none"], in: w.path).status == 0)
            check.verified.insert(SHA256Digest(image))
            let (path, args) = lan.command(on: "s", ["send", w.file("u\(round).fcb"), "--rate", "100M", "--min-receivers", "1", "--await", "confirmed",
                                                     "--deadline", "150s", "--quiet"])
            let s = BackgroundProcess(path, args, log: w.file("s\(round).log"))
            try s.start()
            // Each write the wrapper holds, until the round ends.
            while s.isRunning {
                var writer: pid_t?
                while writer == nil && s.isRunning {
                    writer = (try? String(contentsOfFile: w.file("in-write"), encoding: .utf8)).flatMap { pid_t($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
                    if writer == nil { usleep(10_000) }
                }
                guard let writer else { break }
                try? FileManager.default.removeItem(atPath: w.file("in-write"))
                // Half the kills take the tool with the agent (systemd stops the whole unit, a power
                // cut); the others leave it to finish its write after the agent is gone.
                let withTool = kills % 2 == 0
                if withTool { kill(writer, SIGKILL); toolKilled += 1 } else { toolFinished += 1 }
                d.rebootAfterKill = kills % 3 == 1
                guard d.kill9() else { continue }
                kills += 1
                #expect(d.waitUntilKilled(kills), "kill \(kills) not seen")
                // The tool, if it lives on, finishes before the files are judged.
                let toolDeadline = Date().addingTimeInterval(30)
                while kill(writer, 0) == 0 && Date() < toolDeadline { usleep(10_000) }
                _ = check.run(after: "\(backend) kill \(kills) (tool \(withTool ? "killed" : "left to finish"))")
                d.release()
            }
            let status = s.wait(seconds: 160)
            #expect(status == 0, "round \(round): \(s.output) \(d.logs.suffix(3000))")
            let settled = d.waitFor(seconds: 60) { ($0["standing"] as? String) == "idle" && ($0["running"] as? Bool) == true }
            #expect(settled != nil, "round \(round) did not settle: \(d.logs.suffix(3000))")
            _ = check.run(after: "\(backend) round \(round) settled")
            let record = check.record()
            #expect(record?.installed.version == "\(round + 1).0", "round \(round): \(String(describing: record))")
            if let record { #expect(d.holds(record.installedSide == .a ? "a" : "b", .init(image))) }
        }
        print("kill -9 in \(backend) backend writes: \(kills) kills (\(toolKilled) with the tool, \(toolFinished) leaving it to finish)")
        #expect(kills >= 4 && toolKilled > 0 && toolFinished > 0, "\(kills) kills")
        #expect(check.violations.isEmpty, "\(check.violations.prefix(10))")
    }

    /// The critical service of the live tests (Specs/agent.md §9): an HTTP server that
    /// answers every request with its version (the start of its side's `app` file) and its PID,
    /// serves on the socket handed to it (fd 3, LISTEN_FDS/LISTEN_PID), says READY=1
    /// to NOTIFY_SOCKET, and on SIGTERM finishes the request it has before it exits. A
    /// version whose file says CRASH exits at once.
    static let liveService = """
    import os, signal, socket, sys
    from http.server import BaseHTTPRequestHandler, HTTPServer
    with open(os.path.join(os.environ["FLEETCAST_LIVE_DIR"], "app"), "rb") as f:
        version = f.read(4096).split(b"\\0")[0].decode().strip()
    if "CRASH" in version:
        sys.exit(3)
    if os.environ.get("LISTEN_FDS") != "1" or int(os.environ.get("LISTEN_PID", "0")) != os.getpid():
        sys.exit("no socket handed over")
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = ("%s|%d" % (version, os.getpid())).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass
    server = HTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = socket.socket(fileno=3)
    server.timeout = 0.1
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])
    while not stopping:
        server.handle_request()

    """

    /// Requests the service every 10 ms until told to stop (bounded in count and time),
    /// one line per request: "ok VERSION" or "fail WHY".
    static let liveClient = """
    import os, sys, time, urllib.request
    port, log, stop = sys.argv[1], sys.argv[2], sys.argv[3]
    deadline = time.time() + 400
    n = 0
    with open(log, "w", buffering=1) as out:
        while time.time() < deadline and n < 40000 and not os.path.exists(stop):
            n += 1
            try:
                out.write("ok " + urllib.request.urlopen("http://127.0.0.1:%s/" % port, timeout=5).read().decode() + "\\n")
            except Exception as e:
                out.write("fail " + repr(e).replace("\\n", " ") + "\\n")
            time.sleep(0.01)

    """

    @Test("Activation live (Specs/agent.md §9): a real HTTP service answers a client throughout a live switch, a failed live switch and a rollback; the client sees no failed request, and the sender's report shows confirmed, rolled back (did not come up), rolled back (unhealthy)")
    func liveActivation() throws {
        let w = Workspace()
        #expect(try fleetcast(["keygen", "--type", "ed25519", "--out", "vendor"], in: w.path).status == 0)
        let lan = try TestLAN(receivers: 1, loss: [])
        let root = w.file("dev") + "/app"
        let appBytes = 64 << 10
        func app(_ text: String) -> [UInt8] { Array(text.utf8) + [UInt8](repeating: 0, count: 4096 - text.utf8.count) }
        for side in ["a", "b"] {
            try FileManager.default.createDirectory(atPath: root + "/" + side, withIntermediateDirectories: true)
            FileManager.default.createFile(atPath: "\(root)/\(side)/app", contents: Data(side == "a" ? app("1.0") : []) + Data(count: appBytes - (side == "a" ? 4096 : 0)))
        }
        try Self.liveService.write(toFile: w.file("service.py"), atomically: true, encoding: .utf8)
        try Self.liveClient.write(toFile: w.file("client.py"), atomically: true, encoding: .utf8)
        let port = 20_000 + Int(lan.port % 20_000)
        let d = try TestDevice("dev", in: w, lan: lan, host: "r1", slotBytes: 1 << 20, trustedKey: w.file("vendor.pub"), config: [
            "slots": ["app": ["a": "app/a/app", "b": "app/b/app"]],
            "activation": "live",
            "live": ["root": "app", "command": ["python3", w.file("service.py")], "listen": "127.0.0.1:\(port)", "ready-timeout": 10],
            // A release that says BROKEN fails its health check once it serves.
            "health-check": ["command": ["sh", "-c", "! grep -qa BROKEN \(root)/current/app"], "timeout": 10, "healthy-for": 2],
            "trial-attempts": 2,
        ])
        d.powerOn(bootsMax: 3, seconds: 400)
        defer { d.powerOff() }
        #expect(d.waitFor(seconds: 30) { $0["running"] as? Bool == true } != nil, "\(d.logs)")
        let (clientPath, clientArgs) = lan.wrap(on: "r1", "/usr/bin/python3", [w.file("client.py"), "\(port)", w.file("client.log"), w.file("client.stop")])
        let client = BackgroundProcess(clientPath, clientArgs, log: w.file("client.out"))
        try client.start()
        defer { FileManager.default.createFile(atPath: w.file("client.stop"), contents: nil); _ = client.wait(seconds: 20) }
        /// The client's lines, "ok VERSION" with the answering PID split off, or "fail ...".
        func answers() -> [(line: String, pid: String)] {
            ((try? String(contentsOfFile: w.file("client.log"), encoding: .utf8)) ?? "").split(separator: "\n").map { line in
                let parts = line.split(separator: "|")
                return (String(parts[0]), parts.count > 1 ? String(parts[1]) : "")
            }
        }
        func responses() -> [String] { answers().map(\.line) }
        var pidsBefore: Set<String> = []
        // The client is answered by the shipped version before anything happens.
        let deadline = Date().addingTimeInterval(20)
        while !responses().contains("ok 1.0") && Date() < deadline { usleep(20_000) }
        #expect(responses().contains("ok 1.0"), "\(responses().suffix(5)) \(d.logs)")

        var outcomes: [String] = []
        for (round, text) in ["2.0", "2.1 CRASH", "3.0 BROKEN"].enumerated() {
            FileManager.default.createFile(atPath: w.file("image-\(round)"), contents: Data(app(text)))
            #expect(try fleetcast(["pack", "--quiet", "--output", "u\(round).fcb", "--product", "lab", "--hardware", "lab-board", "--version", String(text.prefix(3)),
                                   "--sequence", "\(round + 2)", "--component", "app=image-\(round)", "--sign", "vendor.key", "--compression", "none"], in: w.path).status == 0)
            let (path, args) = lan.command(on: "s", ["send", w.file("u\(round).fcb"), "--rate", "50M", "--min-receivers", "1", "--await", "confirmed",
                                                     "--deadline", "120s", "--report", w.file("fleet-\(round).json"), "--quiet"])
            let s = BackgroundProcess(path, args, log: w.file("s\(round).log"))
            let answeredBefore = answers().count
            try s.start()
            let status = s.wait(seconds: 150)
            #expect(status == (round == 0 ? 0 : 32), "round \(round): \(s.output) \(d.logs.suffix(3000))")
            // Settled: nothing pending, and the service switched to the installed side (after a
            // rollback the switch back follows the report).
            let settled = d.waitFor(seconds: 60) {
                ($0["standing"] as? String) == "idle" && ($0["running"] as? Bool) == true && $0["booted"] as? String == $0["installedSide"] as? String
            }
            #expect(settled != nil, "round \(round) did not settle: \(d.logs.suffix(3000))")
            let report = (try? JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: w.file("fleet-\(round).json"))))) as? [String: Any]
            let r = (report?["receivers"] as? [[String: Any]])?.first
            outcomes.append("\(r?["outcome"] as? String ?? "?"): \(r?["failureReason"] as? String ?? "")")
            // The version now answering: the switch's for round 0, the one before for the others.
            let settledAt = responses().count
            let until = Date().addingTimeInterval(10)
            while responses().count < settledAt + 20 && Date() < until { usleep(20_000) }
            #expect(responses().suffix(10).allSatisfy { $0 == "ok 2.0" }, "round \(round): \(responses().suffix(10))")
            if round == 1 {
                // The failed switch: the version that served before never stopped; one process answered throughout.
                let pids = Set(answers()[answeredBefore...].map(\.pid))
                #expect(pids.count == 1 && pidsBefore.isSuperset(of: pids), "round 1 answered by \(pids), before by \(pidsBefore)")
            }
            pidsBefore = Set(answers().suffix(10).map(\.pid))
        }
        FileManager.default.createFile(atPath: w.file("client.stop"), contents: nil)
        #expect(client.wait(seconds: 20) == 0)
        let all = responses()
        let failed = all.filter { !$0.hasPrefix("ok ") }
        var versions: [String] = []
        for line in all where versions.last != line { versions.append(line) }
        print("live activation: \(all.count) requests, \(failed.count) failed; versions in order: \(versions.prefix(12)); outcomes: \(outcomes)")
        #expect(failed.isEmpty, "\(failed.prefix(5))")
        #expect(all.count > 200, "the client ran throughout: \(all.count) requests")
        #expect(!all.contains { $0.contains("CRASH") } && all.contains("ok 3.0 BROKEN"), "\(versions)")
        #expect(outcomes.count == 3 && outcomes[0].hasPrefix("confirmed") && outcomes[1].hasPrefix("rolled back") && outcomes[2].hasPrefix("rolled back"), "\(outcomes)")
        #expect(outcomes == ["confirmed: ", "rolled back: didNotBoot", "rolled back: unhealthy"], "\(outcomes)")
        #expect((try? LiveActivation.currentSide(root: root)) == .b)
    }
}

/// A redundant U-Boot environment as a device ships it (`mkenvimage -r`, two
/// 16 KiB copies in `boot/uboot.env`, U-Boot's own `bootcmd` in it) and the
/// `fw_env.config` naming both copies, in the directory `boot`.
func shipUBootEnvironment(at boot: String) throws {
    try FileManager.default.createDirectory(atPath: boot, withIntermediateDirectories: true)
    try "bootcmd=run fleetcast_boot\n".write(toFile: boot + "/env.txt", atomically: true, encoding: .utf8)
    let made = try runTool("/usr/bin/mkenvimage", ["-r", "-s", "16384", "-o", boot + "/copy.bin", boot + "/env.txt"])
    guard made.status == 0 else { throw LabError(text: "mkenvimage: \(made.output)") }
    let copy = try Data(contentsOf: URL(fileURLWithPath: boot + "/copy.bin"))
    try (copy + copy).write(to: URL(fileURLWithPath: boot + "/uboot.env"))
    try "\(boot)/uboot.env 0x0 0x4000\n\(boot)/uboot.env 0x4000 0x4000\n".write(toFile: boot + "/fw_env.config", atomically: true, encoding: .utf8)
}

/// Specs/agent.md I1-I3 on the device's real files, after every kill.
struct InvariantCheck {
    let device: TestDevice
    let imageBytes: Int
    /// The boot state as the bootloader would find it (the statefile backend unless told).
    var readBoot: (TestDevice) -> BootState? = { d in
        (try? SafeDirectory(path: d.directory + "/boot")).flatMap { try? StateFileBootControl(files: $0).read() }
    }
    /// Digests (of the first `imageBytes` of a slot) of images that were verified: shipped and every release.
    var verified: Set<SHA256Digest> = []
    var sequenceSeen: UInt64 = 1
    var rolledBackSeen = 0
    var violations: [String] = []

    func record() -> AgentRecord? {
        guard let dir = try? SafeDirectory(path: device.directory + "/state") else { return nil }
        return try? RecordStore(files: dir).read()
    }

    /// Checks, and returns the phase the record was in ("idle", "installing", ...).
    mutating func run(after what: String) -> String {
        guard let boot = readBoot(device) else {
            violations.append("\(what): I1: no valid boot state")
            return "?"
        }
        func holdsVerified(_ side: Side) -> Bool { verified.contains(SHA256Digest(device.slot(side == .a ? "a" : "b", bytes: imageBytes))) }
        if boot.confirmedSide == nil || !holdsVerified(boot.confirmedSide!) { violations.append("\(what): I1: no confirmed side holding a verified image: \(boot)") }
        for side in Side.allCases where boot[side].bootable && !holdsVerified(side) { violations.append("\(what): I2: side \(side) bootable, image not verified: \(boot)") }
        guard let r = record() else {
            violations.append("\(what): no readable record")
            return "?"
        }
        if r.sequence < sequenceSeen { violations.append("\(what): I3: the stored sequence fell from \(sequenceSeen) to \(r.sequence)") }
        if r.sequence > sequenceSeen && (r.installed.sequence != r.sequence || !boot[r.installedSide].confirmed) {
            violations.append("\(what): I3: the sequence rose to \(r.sequence) without a confirm: \(r), \(boot)")
        }
        sequenceSeen = max(sequenceSeen, r.sequence)
        return r.pending.map { "\($0.phase)" } ?? "idle"
    }
}

struct SHA256Digest: Hashable {
    let bytes: [UInt8]
    init(_ data: [UInt8]) { bytes = SHA256.hash(data) }
}

/// A seeded generator for the kill moments (splitmix64).
struct SeededGenerator: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
