import ChildProcess
import DeviceAgent
import Foundation

/// Activation without a gap (Specs/agent.md §9, `"activation": "live"`): the two
/// sides are directories of a critical service, `ROOT/a` and `ROOT/b`, and the
/// running one is named by the link `ROOT/current`. This is the edge that runs
/// the service: it starts a side's command (in that directory), judges it ready,
/// renames `current` to it and stops the other; it plays the bootloader's part
/// for the agent's in-process "reboot".
///
/// Where the configuration names a listening address, the agent binds it once
/// and hands the socket to every version it starts, as systemd's socket
/// activation does (fd 3, `LISTEN_FDS=1`, `LISTEN_PID`): while the new version
/// starts and is checked, the old one still accepts on the same socket, and
/// connections that arrive while one stops wait in the socket's queue for the
/// other, so none is refused. Readiness is the service's own word where it
/// can give it (systemd's notify protocol: `READY=1` to `NOTIFY_SOCKET`), or
/// still running after the ready timeout.
public final class LiveActivation {
    public struct Settings: Equatable, Sendable {
        public enum Ready: String, Sendable, CaseIterable { case notify, running }
        public var root: String
        public var command: [String]
        /// IPv4 address and port to listen on and hand over; nil: the service binds its own.
        public var listen: (host: String, port: UInt16)?
        public var ready = Ready.notify
        public var readySeconds = 10.0
        public var stopSeconds = 10.0
        public init(root: String, command: [String]) { self.root = root; self.command = command }
        public static func == (a: Settings, b: Settings) -> Bool {
            a.root == b.root && a.command == b.command && a.listen?.host == b.listen?.host && a.listen?.port == b.listen?.port
                && a.ready == b.ready && a.readySeconds == b.readySeconds && a.stopSeconds == b.stopSeconds
        }
    }

    /// A version of the service that this process started.
    public final class Service {
        public let side: Side
        public var pid: pid_t { child.pid }
        fileprivate let child: ChildProcess
        fileprivate var notify: Int32
        fileprivate var notifyPath: String?
        fileprivate init(side: Side, child: ChildProcess, notify: Int32) { self.side = side; self.child = child; self.notify = notify }
        deinit { closeNotify() }

        /// Once ready, the notify socket is closed and its name removed: a service that goes on
        /// sending (STATUS=, WATCHDOG=1) then gets an error, instead of blocking on a full queue.
        fileprivate func closeNotify() {
            if notify >= 0 { close(notify) }
            notify = -1
            if let notifyPath { unlink(notifyPath) }
            notifyPath = nil
        }

        /// Whether it still runs (reaps it when it has ended).
        public var isRunning: Bool { child.isRunning }
    }

    public let settings: Settings
    /// The handed-over listening socket, or -1.
    public let listenFD: Int32
    public private(set) var running: Service?
    /// Where a started version's output goes (`ROOT/<side>.log`, appended).
    public func logPath(_ side: Side) -> String { settings.root + "/" + side.dirName + ".log" }

    /// Named limit: the trial attempts a side may have (the agent's `trial-attempts` range).
    public static let attemptsMax = 10
    /// Named limit: the longest ready or stop timeout a configuration may give.
    public static let timeoutSecondsMax = 600.0
    /// Named limit: how long a stop waits after SIGKILL for the process to be reaped.
    static let reapSecondsMax = 5.0
    static let pollMicroseconds: useconds_t = 20_000

    public init(_ settings: Settings) throws(StorageError) {
        self.settings = settings
        var isDirectory: ObjCBool = false
        for side in Side.allCases {
            let dir = settings.root + "/" + side.dirName
            guard FileManager.default.fileExists(atPath: dir, isDirectory: &isDirectory), isDirectory.boolValue else {
                throw StorageError("activation live: \(dir) is not a directory (each side of the service is one: \(settings.root)/a and \(settings.root)/b)")
            }
        }
        if let listen = settings.listen {
            listenFD = try Self.bind(listen.host, listen.port)
        } else {
            listenFD = -1
        }
    }

    deinit { if listenFD >= 0 { close(listenFD) } }

    // MARK: The current link

    /// The side `ROOT/current` names, nil when there is no link yet.
    public func currentSide() throws(StorageError) -> Side? { try Self.currentSide(root: settings.root) }

    public static func currentSide(root: String) throws(StorageError) -> Side? {
        let link = root + "/current"
        var buffer = [CChar](repeating: 0, count: 64)
        let n = readlink(link, &buffer, buffer.count - 1)
        if n < 0 {
            if errno == ENOENT { return nil }
            throw StorageError("readlink \(link): \(String(cString: strerror(errno)))")
        }
        let target = String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        guard let side = Side(name: target), target == side.dirName else {
            throw StorageError("\(link) points to '\(target)', not a or b")
        }
        return side
    }

    /// `current` renamed into place: a new link beside it, renamed over it, the directory fsynced.
    public func makeCurrent(_ side: Side) throws(StorageError) {
        if (try? currentSide()) == side { return }
        let link = settings.root + "/current", temporary = settings.root + "/current.new"
        unlink(temporary)
        guard symlink(side.dirName, temporary) == 0 else { throw StorageError("symlink \(temporary): \(String(cString: strerror(errno)))") }
        guard rename(temporary, link) == 0 else {
            let reason = String(cString: strerror(errno))
            unlink(temporary)
            throw StorageError("rename \(temporary) over \(link): \(reason)")
        }
        let fd = open(settings.root, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw StorageError("open \(settings.root): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        guard fsync(fd) == 0 else { throw StorageError("fsync \(settings.root): \(String(cString: strerror(errno)))") }
    }

    // MARK: Switching

    /// Makes `side` the running version: starts it while the running one (if any)
    /// still serves, waits until it is ready, renames `current` to it, then stops
    /// the old one. nil when it switched; otherwise why not, and the new version
    /// was stopped, the link and the old version untouched.
    public func switchTo(_ side: Side) -> String? {
        if let r = running, r.side == side, r.isRunning { return nil }
        let new: Service
        do { new = try start(side) } catch { return error.reason }
        if let why = waitReady(new) {
            stop(new)
            return why
        }
        do { try makeCurrent(side) } catch {
            // Renamed, but the directory's fsync failed: the link names the new version, so
            // it is the one that runs (stopping it would leave the link naming a stopped side).
            if (try? currentSide()) != side {
                stop(new)
                return error.reason
            }
        }
        if let old = running, old.side != side { stop(old) }
        running = new
        return nil
    }

    /// Stops the running version (the agent ends).
    public func stopRunning() {
        if let r = running { stop(r) }
        running = nil
    }

    func start(_ side: Side) throws(StorageError) -> Service {
        let dir = settings.root + "/" + side.dirName
        var env = ProcessInfo.processInfo.environment
        env["FLEETCAST_LIVE_DIR"] = dir
        env["FLEETCAST_SIDE"] = side.dirName
        env["LISTEN_PID"] = nil
        env["LISTEN_FDS"] = nil
        env["NOTIFY_SOCKET"] = nil
        var notify: Int32 = -1
        if settings.ready == .notify {
            let path = settings.root + "/.notify-" + side.dirName
            notify = try Self.notifySocket(path)
            env["NOTIFY_SOCKET"] = path
        }
        if listenFD >= 0 { env["LISTEN_FDS"] = "1"; env["LISTEN_FDNAMES"] = "fleetcast" }
        // sh sets LISTEN_PID to its own PID, which the service keeps across exec, and
        // enters the side's directory (posix_spawn has no portable chdir).
        let script = "cd \"$1\" || exit 127; shift; \(listenFD >= 0 ? "LISTEN_PID=$$; export LISTEN_PID; " : "")exec \"$@\""
        let argv = ["/bin/sh", "-c", script, "fleetcast-live", dir] + settings.command
        var options = ChildProcess.Options(argv)
        options.environment = env
        options.standardOutput = .file(logPath(side), append: true)
        options.standardError = .output
        options.passedAsFD3 = listenFD >= 0 ? listenFD : nil
        // Its own process group, stopped as one.
        options.newProcessGroup = true
        let child: ChildProcess
        do { child = try ChildProcess(options) } catch {
            if notify >= 0 { close(notify) }
            throw StorageError("cannot start \(settings.command.joined(separator: " ")) (output to \(logPath(side))): \(error)")
        }
        let service = Service(side: side, child: child, notify: notify)
        if notify >= 0 { service.notifyPath = settings.root + "/.notify-" + side.dirName }
        return service
    }

    /// nil once `s` is ready, or why it is not within the ready timeout.
    func waitReady(_ s: Service) -> String? {
        // Monotonic: a device without a real-time clock steps its wall clock at the first NTP sync.
        let deadline = Self.monotonic(after: settings.readySeconds)
        while DispatchTime.now() < deadline {
            guard s.isRunning else { return "side \(s.side.dirName)'s service exited before it was ready (its output: \(logPath(s.side)))" }
            if settings.ready == .notify, Self.readReady(s.notify) {
                s.closeNotify()
                return nil
            }
            usleep(Self.pollMicroseconds)
        }
        if settings.ready == .running, s.isRunning { return nil }
        return "side \(s.side.dirName)'s service did not say READY=1 within \(settings.readySeconds) s"
    }

    /// SIGTERM to its process group, SIGKILL after the stop timeout; the leader reaped.
    /// The group, not only the leader: workers it forked would keep fd 3 and go on
    /// accepting as the old version.
    func stop(_ s: Service) {
        s.closeNotify()
        func groupAlive() -> Bool { s.isRunning || kill(-s.pid, 0) == 0 }
        guard groupAlive() else { return }
        kill(-s.pid, SIGTERM)
        let deadline = Self.monotonic(after: settings.stopSeconds)
        while groupAlive() && DispatchTime.now() < deadline { usleep(Self.pollMicroseconds) }
        if groupAlive() {
            kill(-s.pid, SIGKILL)
            let reap = Self.monotonic(after: Self.reapSecondsMax)
            while groupAlive() && DispatchTime.now() < reap { usleep(Self.pollMicroseconds) }
        }
    }

    static func monotonic(after seconds: Double) -> DispatchTime { .now() + .milliseconds(Int(seconds * 1000)) }

    // MARK: System calls

    /// A listening TCP socket on an IPv4 address, close-on-exec.
    static func bind(_ host: String, _ port: UInt16) throws(StorageError) -> Int32 {
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = port.bigEndian
        guard inet_pton(AF_INET, host, &address.sin_addr) == 1 else { throw StorageError("live.listen: '\(host)' is not an IPv4 address") }
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw StorageError("socket: \(String(cString: strerror(errno)))") }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard bound == 0, listen(fd, listenBacklog) == 0 else {
            let reason = String(cString: strerror(errno))
            close(fd)
            throw StorageError("live.listen \(host):\(port): \(reason)")
        }
        return fd
    }

    /// Named limit: connections the handed-over socket queues while no version accepts.
    static let listenBacklog: Int32 = 512

    static func notifySocket(_ path: String) throws(StorageError) -> Int32 {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { throw StorageError("\(path): too long for a Unix socket") }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        unlink(path)
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
        guard fd >= 0 else { throw StorageError("socket: \(String(cString: strerror(errno)))") }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard bound == 0 else {
            let reason = String(cString: strerror(errno))
            close(fd)
            throw StorageError("bind \(path): \(reason)")
        }
        return fd
    }

    /// Whether a datagram with the line `READY=1` is waiting (the notify protocol's messages are newline-separated assignments).
    static func readReady(_ fd: Int32) -> Bool {
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = recv(fd, &buffer, buffer.count, 0)
            guard n > 0 else { return false }
            if String(decoding: buffer[0..<n], as: UTF8.self).split(separator: "\n").contains("READY=1") { return true }
        }
    }
}

extension Side {
    /// The side's directory under the live root, and the `current` link's target.
    var dirName: String { self == .a ? "a" : "b" }
}
