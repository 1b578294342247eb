import CSpawn
#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// A child process, started with `posix_spawn` and reaped with `waitpid`: the one
/// way Fleetcast runs another program (bootloader tools, health checks, hooks, the
/// reboot command, a live service; and the tests' daemons and tools).
///
/// ### Why not Foundation's `Process`
/// On Linux, `Process` learns of a child's end through a socket pair whose child
/// end is open, without close-on-exec, in the parent between `socketpair()` and the
/// spawn; it closes other descriptors in the child only up to the highest one open
/// when it looked. A second thread spawning in that window hands the first child's
/// end to its own child, and the first child's exit then goes unnoticed until that
/// other child ends too. Seen here: a test's device agent that had exited with 75
/// was taken for running for two minutes (until the sender that inherited the end
/// exited). In the agent itself, the same race could make a health check look hung.
///
/// Here the child closes every descriptor from 3 up in one file action
/// (`closefrom`), after its standard streams and any passed descriptor are in
/// place; every descriptor this module opens in the parent is close-on-exec; and
/// the end is seen by `waitpid` on the child's own PID, nothing else.
///
/// The child gets default handling for every signal and an empty signal mask,
/// whatever this process ignores or blocks (SIGPIPE, its interrupt handlers).
public final class ChildProcess: @unchecked Sendable {  // mutable state behind `state`
    /// Where one of the child's standard streams goes.
    public enum Stream: Sendable {
        /// This process's own.
        case inherit
        /// `/dev/null`.
        case null
        /// A file, created if missing (mode 0640), appended to or truncated; never through a link.
        case file(String, append: Bool = false)
        /// A pipe whose other end this process gets (`inputFD`, `outputFD`, `errorFD`).
        case pipe
        /// Standard error only: wherever standard output goes.
        case output
    }

    /// How the child ended.
    public enum Termination: Equatable, Sendable, CustomStringConvertible {
        case exited(Int32)
        case signalled(Int32)

        public var isSuccess: Bool { self == .exited(0) }
        public var description: String {
            switch self {
            case .exited(let status): "exited with status \(status)"
            case .signalled(let signal): "was killed by signal \(signal)"
            }
        }
    }

    public struct Options: Sendable {
        /// argv; the first is the program's path (no PATH look-up: use `/usr/bin/env` for that).
        public var arguments: [String]
        /// The whole environment; nil: this process's.
        public var environment: [String: String]?
        public var directory: String?
        public var standardInput = Stream.null
        public var standardOutput = Stream.inherit
        public var standardError = Stream.inherit
        /// A descriptor of this process the child gets as fd 3 (a handed-over listening socket).
        public var passedAsFD3: Int32?
        /// The child leads a process group of its own (so that it and what it forks can be signalled as one).
        public var newProcessGroup = false

        public init(_ arguments: [String]) {
            precondition(!arguments.isEmpty, "a child needs a program")
            self.arguments = arguments
        }
    }

    public let pid: pid_t
    /// This process's ends of the pipes asked for, close-on-exec; -1 where none. The
    /// caller closes them (or `closePipes()`).
    public private(set) var inputFD: Int32 = -1
    public private(set) var outputFD: Int32 = -1
    public private(set) var errorFD: Int32 = -1
    private let leadsGroup: Bool
    private let state = Mutex<Termination?>(nil)

    /// Starts the child; an error says why it could not be started (a missing program,
    /// a directory that cannot be entered, a log that cannot be opened).
    public init(_ options: Options) throws(SpawnError) {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        var childEnds: [Int32] = []
        defer { for fd in childEnds { close(fd) } }
        var parentEnds: [Int32: Int32] = [:]
        // On any failure below, this process's pipe ends go too.
        var started = false
        defer { if !started { for fd in parentEnds.values { close(fd) } } }

        func redirect(_ stream: Stream, to target: Int32) throws(SpawnError) {
            switch stream {
            case .inherit:
                break
            case .null:
                posix_spawn_file_actions_addopen(&actions, target, "/dev/null", target == 0 ? O_RDONLY : O_WRONLY, 0)
            case .file(let path, let append):
                let flags = O_WRONLY | O_CREAT | O_NOFOLLOW | (append ? O_APPEND : O_TRUNC)
                posix_spawn_file_actions_addopen(&actions, target, path, flags, 0o640)
            case .pipe:
                var ends: [Int32] = [-1, -1]
                let made = fc_pipe_cloexec(&ends)
                guard made == 0 else { throw SpawnError(options.arguments[0], "pipe", -made) }
                let (child, parent) = target == 0 ? (ends[0], ends[1]) : (ends[1], ends[0])
                childEnds.append(child)
                parentEnds[target] = parent
                // dup2 onto 0, 1 or 2 clears close-on-exec on the copy only.
                posix_spawn_file_actions_adddup2(&actions, child, target)
            case .output:
                precondition(target == 2, "only standard error can follow standard output")
                posix_spawn_file_actions_adddup2(&actions, 1, 2)
            }
        }
        try redirect(options.standardInput, to: 0)
        try redirect(options.standardOutput, to: 1)
        try redirect(options.standardError, to: 2)
        var firstClosed: Int32 = 3
        if let passed = options.passedAsFD3 {
            // A fresh copy above 3, so that the dup2 below always makes a new descriptor
            // (dup2 of 3 onto 3 would leave close-on-exec set).
            let copy = fcntl(passed, F_DUPFD_CLOEXEC, 10)
            guard copy >= 0 else { throw SpawnError(options.arguments[0], "descriptor \(passed)", errno) }
            childEnds.append(copy)
            posix_spawn_file_actions_adddup2(&actions, copy, 3)
            firstClosed = 4
        }
        // Everything else this process has open stays here, whatever its flags.
        var added = fc_spawn_add_closefrom(&actions, firstClosed)
        if added == 0, let directory = options.directory { added = fc_spawn_add_chdir(&actions, directory) }
        guard added == 0 else { throw SpawnError(options.arguments[0], "file actions", added) }

        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var defaults = sigset_t(), empty = sigset_t()
        sigemptyset(&defaults)
        for signal in 1..<65 where signal != SIGKILL && signal != SIGSTOP { sigaddset(&defaults, Int32(signal)) }
        sigemptyset(&empty)
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        posix_spawnattr_setsigmask(&attributes, &empty)
        var flags = POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK
        if options.newProcessGroup {
            posix_spawnattr_setpgroup(&attributes, 0)
            flags |= POSIX_SPAWN_SETPGROUP
        }
        posix_spawnattr_setflags(&attributes, Int16(flags))

        let cArguments = options.arguments.map { strdup($0) } + [nil]
        defer { for p in cArguments { free(p) } }
        var spawned: pid_t = 0
        let result: Int32
        if let environment = options.environment {
            let cEnvironment = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
            defer { for p in cEnvironment { free(p) } }
            result = posix_spawn(&spawned, options.arguments[0], &actions, &attributes, cArguments, cEnvironment)
        } else {
            result = posix_spawn(&spawned, options.arguments[0], &actions, &attributes, cArguments, environ)
        }
        guard result == 0 else { throw SpawnError(options.arguments[0], "start", result) }
        started = true
        pid = spawned
        leadsGroup = options.newProcessGroup
        inputFD = parentEnds[0] ?? -1
        outputFD = parentEnds[1] ?? -1
        errorFD = parentEnds[2] ?? -1
    }

    deinit { closePipes() }

    /// Closes this process's ends of the child's pipes.
    public func closePipes() {
        for fd in [inputFD, outputFD, errorFD] where fd >= 0 { close(fd) }
        inputFD = -1; outputFD = -1; errorFD = -1
    }

    /// Closes the pipe to the child's standard input (the child reads its end).
    public func closeInput() {
        if inputFD >= 0 { close(inputFD) }
        inputFD = -1
    }

    /// The pipe to the child's standard input, now the caller's to write and close; nil if none.
    public func takeInput() -> Int32? {
        defer { inputFD = -1 }
        return inputFD >= 0 ? inputFD : nil
    }

    /// How it ended, nil while it runs (reaps it once it has ended).
    public var termination: Termination? {
        state.withLock { ended in
            if ended == nil { ended = Self.reap(pid, blocking: false) }
            return ended
        }
    }

    public var isRunning: Bool { termination == nil }

    /// Sends `signal` to the child (to its whole group when it leads one), unless it has
    /// been reaped: its PID may then name another process.
    public func signal(_ signal: Int32) {
        state.withLock { ended in
            if ended == nil { ended = Self.reap(pid, blocking: false) }
            guard ended == nil else { return }
            _ = kill(leadsGroup ? -pid : pid, signal)
        }
    }

    /// Waits until it ends, at most `seconds` (nil: as long as it takes); nil if it
    /// still runs then.
    @discardableResult
    public func wait(seconds: Double? = nil) -> Termination? {
        let deadline = seconds.map { Self.monotonicNow() + $0 }
        var pause: useconds_t = 1_000
        while true {
            if let t = termination { return t }
            if let deadline, Self.monotonicNow() >= deadline { return nil }
            usleep(pause)
            pause = min(pause * 2, Self.pollMicrosecondsMax)
        }
    }

    /// Waits at most `seconds`; then SIGKILL (to the group when it leads one) and waits
    /// for the end. Nil when it ended by itself in time.
    public func waitOrKill(seconds: Double) -> Termination? {
        if let t = wait(seconds: seconds) { return t }
        signal(SIGKILL)
        wait()
        return nil
    }

    /// Named limit: the longest pause between two looks at a running child.
    static let pollMicrosecondsMax: useconds_t = 10_000

    static func monotonicNow() -> Double {
        var t = timespec()
        clock_gettime(CLOCK_MONOTONIC, &t)
        return Double(t.tv_sec) + Double(t.tv_nsec) / 1e9
    }

    private static func reap(_ pid: pid_t, blocking: Bool) -> Termination? {
        var status: Int32 = 0
        while true {
            let r = waitpid(pid, &status, blocking ? 0 : WNOHANG)
            if r == pid { break }
            if r == 0 { return nil }
            if errno == EINTR { continue }
            // ECHILD: reaped by someone else (it should not be); its status is lost.
            return .signalled(0)
        }
        let signalled = status & 0x7f
        return signalled == 0 ? .exited((status >> 8) & 0xff) : .signalled(signalled)
    }
}

/// A child that could not be started, or a system call around it that failed.
public struct SpawnError: Error, CustomStringConvertible, Sendable {
    public let program: String
    public let what: String
    public let code: Int32
    init(_ program: String, _ what: String, _ code: Int32) { self.program = program; self.what = what; self.code = code }
    public var description: String { "\(program): \(what): \(String(cString: strerror(code)))" }
}
