import Foundation
import Testing

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
                guard let p = try? startAgent(run) else { lock.unlock(); return }
                current = p
                lock.unlock()
                let status = p.wait(seconds: max(1, deadline.timeIntervalSinceNow))
                lock.lock()
                exits.append(status)
                current = nil
                let stop = stopped
                lock.unlock()
                // 75: the simulated reboot; or killed by the test (kill -9), which plays a power cut when asked.
                let killed = killedByTest()
                if killed { lock.lock(); killedRuns += 1; lock.unlock() }
                guard !stop, status == 75 || killed else { return }
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
    private func killedByTest() -> Bool {
        lock.lock(); defer { lock.unlock() }
        if kills > 0 { kills -= 1; return true }
        return false
    }

    /// Kills the running agent with SIGKILL (the loop starts it again).
    func kill9() {
        lock.lock()
        let p = current
        if p != nil { kills += 1 }
        lock.unlock()
        // The loop's own wait sees it end (one waiter per process).
        if let p { kill(p.process.processIdentifier, SIGKILL) }
    }

    /// Stops the agent (SIGTERM) and the loop; waits for both.
    func powerOff() {
        lock.lock()
        stopped = true
        let p = current
        lock.unlock()
        // The loop's wait sees the agent end; it then stops.
        if let p { kill(p.process.processIdentifier, SIGTERM) }
        lock.lock()
        let t = thread
        thread = nil
        lock.unlock()
        if t != nil, finished.wait(timeout: .now() + 30) == .timedOut, let p {
            kill(p.process.processIdentifier, SIGKILL)
            _ = finished.wait(timeout: .now() + 10)
        }
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

    func slot(_ side: String, bytes: Int) -> [UInt8] {
        let data = FileManager.default.contents(atPath: directory + "/rootfs.\(side)") ?? Data()
        return [UInt8](data.prefix(bytes))
    }

    var logs: String {
        (1...20).compactMap { try? String(contentsOfFile: directory + "/agent-\($0).log", encoding: .utf8) }.joined(separator: "\n--- reboot ---\n")
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
            #expect(d.slot("b", bytes: f.image.count) == f.image, "\(d.name): slot b does not hold the image")
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
}
