import ChildProcess
import CSocket
import DeliveryCore
import DeviceAgent
import FleetCrypto
import Foundation
import Logging
import Transport
import UpdateBundle

/// The agent's effects as the configuration's commands (Specs/agent.md §7): the
/// health check runs beside the loop and is polled; hooks and the reboot command
/// run to their end, bounded by a timeout. Every child is started here and, on a
/// timeout, killed by its PID.
final class CommandEffects: AgentEffects {
    let config: AgentConfig
    let logger: Logger
    /// Named limits: how long a hook or the reboot command may take.
    static let hookTimeout = Interval.seconds(300)
    static let rebootCommandTimeout = Interval.seconds(60)
    /// Between runs of a health check that must stay healthy for a while.
    static let healthRerunInterval = Interval.seconds(1)

    private struct Check {
        var process: ChildProcess?
        var runStartedAt: Instant
        var firstPassAt: Instant?
        var nextRunAt: Instant?
    }
    private var check: Check?
    private var trialEnvironment: [String: String] = [:]

    init(config: AgentConfig, logger: Logger) { self.config = config; self.logger = logger }

    func startHealthCheck(at now: Instant) {
        guard let hc = config.healthCheck else {
            logger.notice("no health check configured: waiting for `fleetcast agent mark-good` or `mark-bad`")
            return
        }
        check = Check(process: launch(hc.command, environment: [:]), runStartedAt: now)
        logger.info("health check started: \(hc.command.joined(separator: " ")) (timeout \(hc.timeout) s, healthy for \(hc.healthyFor) s)")
    }

    func pollHealthCheck(at now: Instant) -> SlotDriver.HealthResult {
        guard let hc = config.healthCheck, var c = check else { return .pending }
        defer { check = c }
        if let p = c.process {
            guard let ended = p.termination else {
                guard now >= c.runStartedAt + .seconds(hc.timeout) else { return .pending }
                p.signal(SIGKILL)
                p.wait()
                check = nil
                return .unhealthy("the health check timed out after \(hc.timeout) s")
            }
            c.process = nil
            guard ended.isSuccess else {
                return .unhealthy("the health check \(ended)")
            }
            let first = c.firstPassAt ?? now
            c.firstPassAt = first
            if now >= first + .seconds(hc.healthyFor) { return .healthy }
            c.nextRunAt = now + Self.healthRerunInterval
            return .pending
        }
        if let next = c.nextRunAt, now >= next {
            c.process = launch(hc.command, environment: [:])
            c.runStartedAt = now
            c.nextRunAt = nil
            if c.process == nil { return .unhealthy("the health check could not be started") }
        }
        return .pending
    }

    func runHook(_ hook: AgentHook, update: Release, side: Side) -> String? {
        guard let command = config.hooks[hook] else { return nil }
        var env = ["FLEETCAST_HOOK": hook.rawValue, "FLEETCAST_VERSION": update.version, "FLEETCAST_SEQUENCE": "\(update.sequence)",
                   "FLEETCAST_SIDE": side.name]
        for (target, pair) in config.slots {
            env["FLEETCAST_SLOT_" + target.uppercased().map { $0.isLetter || $0.isNumber ? String($0) : "_" }.joined()] = pair[side]
        }
        logger.info("\(hook.rawValue) hook: \(command.joined(separator: " "))")
        return runToEnd(command, environment: env, timeout: Self.hookTimeout)
    }

    func reboot() -> String? {
        if config.live != nil {
            logger.notice("activation live: the agent restarts in process and switches the service (no reboot)")
            return nil
        }
        if config.simulatedReboot {
            logger.notice("simulated reboot: the agent stops (exit \(AgentExit.simulatedReboot)); run `fleetcast agent boot` and start it again")
            return nil
        }
        logger.notice("rebooting: \(config.rebootCommand.joined(separator: " "))")
        return runToEnd(config.rebootCommand, environment: [:], timeout: Self.rebootCommandTimeout)
    }

    /// A command of the configuration, started in a process group of its own (a timeout
    /// stops what it forked too), its output into the agent's.
    private func launch(_ command: [String], environment: [String: String]) -> ChildProcess? {
        // Through env, so that a bare command name is looked up in PATH.
        var options = ChildProcess.Options(["/usr/bin/env"] + command)
        options.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        options.newProcessGroup = true
        do { return try ChildProcess(options) } catch {
            logger.error("cannot start \(command[0]): \(error)")
            return nil
        }
    }

    /// nil when the command exited 0 within `timeout`, or what went wrong.
    private func runToEnd(_ command: [String], environment: [String: String], timeout: Interval) -> String? {
        guard let p = launch(command, environment: environment) else { return "\(command[0]) could not be started" }
        guard let ended = p.waitOrKill(seconds: timeout.seconds) else {
            return "\(command[0]) timed out after \(Int(timeout.seconds)) s"
        }
        return ended.isSuccess ? nil : "\(command[0]) \(ended)"
    }
}

extension Side {
    var name: String { self == .a ? "a" : "b" }
}

/// `fleetcast agent status|install|mark-good|mark-bad` talk to the running agent
/// over a Unix stream socket in its state directory, owner-only (mode 0600 in a
/// 0700 directory, and the peer's user checked): one request line, one JSON reply.
final class ControlSocket {
    static let name = "control"
    /// Named limits: a request is one short line; a reply a small JSON document.
    static let requestByteCountMax = 256
    static let replyByteCountMax = 1 << 16
    /// Clients served per call of `serve` (the agent's loop calls it every tick).
    static let clientsPerServeMax = 8

    let path: String
    private let fd: Int32

    init(directory: String) throws {
        path = directory + "/" + Self.name
        guard path.utf8.count < 108 else { throw BundleError(.invalidInput, "the control socket path \(path) is longer than a Unix socket path may be") }
        // A socket left by an agent that was killed is replaced; anything else there is not.
        var st = stat()
        if lstat(path, &st) == 0 {
            guard st.st_mode & S_IFMT == S_IFSOCK else { throw BundleError(.invalidInput, "\(path) exists and is not a socket") }
            unlink(path)
        }
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
        guard fd >= 0 else { throw BundleError(.io, "control socket: \(String(cString: strerror(errno)))") }
        var address = Self.address(path)
        let previous = umask(0o177)
        let bound = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
        umask(previous)
        guard bound == 0, chmod(path, 0o600) == 0, listen(fd, 8) == 0 else {
            let e = String(cString: strerror(errno))
            close(fd)
            throw BundleError(.io, "control socket \(path): \(e)")
        }
    }

    deinit {
        close(fd)
        unlink(path)
    }

    static func address(_ path: String) -> sockaddr_un {
        var a = sockaddr_un()
        a.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &a.sun_path) { raw in
            for (i, b) in path.utf8.enumerated() where i < raw.count - 1 { raw[i] = b }
        }
        return a
    }

    /// Answers the clients waiting now, each with `handle(request line)`.
    func serve(_ handle: (String) -> String) {
        for _ in 0..<Self.clientsPerServeMax {
            var uid: UInt32 = 0
            let client = fc_accept_local(fd, &uid)
            guard client >= 0 else { return }
            defer { close(client) }
            guard uid == geteuid() || uid == 0 else { continue }
            var timeout = timeval(tv_sec: 1, tv_usec: 0)
            setsockopt(client, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            guard let line = Self.readLine(client) else { continue }
            Self.writeAll(client, Array((handle(line) + "\n").utf8))
        }
    }

    /// Sends one request to the agent whose state directory is `directory`; nil when
    /// no agent listens there.
    static func request(_ line: String, directory: String) throws -> String? {
        let path = directory + "/" + name
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw BundleError(.io, "socket: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var address = Self.address(path)
        let connected = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
        guard connected == 0 else {
            if errno == ENOENT || errno == ECONNREFUSED { return nil }
            throw BundleError(.io, "cannot reach the agent at \(path): \(String(cString: strerror(errno)))")
        }
        var timeout = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        writeAll(fd, Array((line + "\n").utf8))
        var reply: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while reply.count < replyByteCountMax {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { break }
            reply += buffer[0..<n]
        }
        guard !reply.isEmpty else { throw BundleError(.io, "the agent at \(path) did not answer") }
        return String(decoding: reply, as: UTF8.self).trimmingCharacters(in: .newlines)
    }

    private static func readLine(_ fd: Int32) -> String? {
        var bytes: [UInt8] = []
        var byte: UInt8 = 0
        while bytes.count < requestByteCountMax {
            let n = read(fd, &byte, 1)
            if n < 0 && errno == EINTR { continue }
            guard n == 1 else { return nil }
            if byte == UInt8(ascii: "\n") { return String(decoding: bytes, as: UTF8.self) }
            bytes.append(byte)
        }
        return nil
    }

    private static func writeAll(_ fd: Int32, _ bytes: [UInt8]) {
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + done, bytes.count - done) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { return }
            done += n
        }
    }
}

/// What `agent status` shows (and `--json` prints): from the running agent, or from
/// the files when it does not run.
struct AgentStatusReport: Codable {
    struct ReleaseInfo: Codable { var version: String; var sequence: UInt64; var bundle: String }
    struct SideInfo: Codable { var bootable: Bool; var confirmed: Bool; var attemptsLeft: UInt8 }
    struct PendingInfo: Codable { var release: ReleaseInfo; var side: String; var phase: String; var reason: String? }
    struct OutcomeInfo: Codable { var kind: String; var release: ReleaseInfo; var reason: String?; var reported: Bool }
    struct Transfer: Codable { var version: String; var blocksDone: Int; var blocksTotal: Int; var verifying: Bool }

    var running: Bool
    var device: String
    var standing: String
    var booted: String?
    var installed: ReleaseInfo
    var installedSide: String
    var storedSequence: UInt64
    var pending: PendingInfo?
    var lastOutcome: OutcomeInfo?
    var boot: [String: SideInfo]?
    var bootOrder: [String]?
    var transfer: Transfer?
    var rolledBackBundles: Int

    init(record r: AgentRecord, boot: BootState?, booted: Side?, standing: String, running: Bool, transfer: Transfer?) {
        func info(_ x: Release) -> ReleaseInfo { ReleaseInfo(version: x.version, sequence: x.sequence, bundle: x.bundleID.hexString) }
        self.running = running
        device = r.deviceID
        self.standing = standing
        self.booted = booted?.name
        installed = info(r.installed)
        installedSide = r.installedSide.name
        storedSequence = r.sequence
        pending = r.pending.map { PendingInfo(release: info($0.release), side: $0.side.name, phase: "\($0.phase)", reason: $0.reason.isEmpty ? nil : $0.reason) }
        lastOutcome = r.outcome.map { OutcomeInfo(kind: "\($0.kind)", release: info($0.release), reason: $0.reason.isEmpty ? nil : $0.reason, reported: false) }
        if let boot {
            self.boot = Dictionary(uniqueKeysWithValues: Side.allCases.map { ($0.name, SideInfo(bootable: boot[$0].bootable, confirmed: boot[$0].confirmed, attemptsLeft: boot[$0].attempts)) })
            bootOrder = boot.order.map(\.name)
        }
        self.transfer = transfer
        rolledBackBundles = r.rolledBack.count
    }

    /// The lines `agent status` prints.
    var text: String {
        var lines = ["device \(device)\(running ? "" : " (agent not running: from its files)")",
                     "standing: \(standing)",
                     "installed: \(installed.version) (sequence \(installed.sequence)) on side \(installedSide); stored anti-rollback sequence \(storedSequence)"]
        if let booted { lines.append("booted: side \(booted)") }
        if let p = pending { lines.append("pending: \(p.release.version) (sequence \(p.release.sequence)) to side \(p.side), \(p.phase)\(p.reason.map { ": \($0)" } ?? "")") }
        if let o = lastOutcome { lines.append("last outcome (not yet reported): \(o.kind) \(o.release.version)\(o.reason.map { ": \($0)" } ?? "")") }
        if let boot, let bootOrder {
            lines.append("boot order \(bootOrder.joined(separator: ", ")): " + bootOrder.map { s in
                let i = boot[s]!
                return "\(s) \(i.bootable ? (i.confirmed ? "good" : "on trial, \(i.attemptsLeft) attempt(s) left") : "not bootable")"
            }.joined(separator: "; "))
        }
        if let t = transfer { lines.append("receiving \(t.version): \(t.blocksDone)/\(t.blocksTotal) blocks\(t.verifying ? ", verifying" : "")") }
        return lines.joined(separator: "\n")
    }
}
