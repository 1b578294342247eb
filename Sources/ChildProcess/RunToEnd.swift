#if canImport(Glibc)
import Glibc
#endif
import Dispatch
import Synchronization

extension ChildProcess {
    /// What a child that was run to its end did.
    public struct Outcome: Sendable {
        /// How it ended; nil when it ran out of time and was killed.
        public let termination: Termination?
        /// What it wrote to standard output and error, the first `outputByteCountMax` bytes of each.
        public let output: [UInt8]
        public let errors: [UInt8]
        /// It ended, but a process it left behind still held its output open after
        /// `drainSecondsMax`: what it said may be cut short.
        public let outputIncomplete: Bool

        public var outputText: String { String(decoding: output, as: UTF8.self) }
        public var errorText: String { String(decoding: errors, as: UTF8.self) }
    }

    /// Named limit: how long the output of a child that has ended may go on arriving
    /// (held open by a process it left).
    public static let drainSecondsMax = 5.0

    /// Runs a child to its end, at most `seconds`, then SIGKILL: `input` written to its
    /// standard input, its standard output and error captured through pipes (where
    /// `options` does not send them elsewhere), at most `outputByteCountMax` bytes of
    /// each kept (the rest is read and dropped, so a talkative child never blocks).
    public static func run(_ options: Options, input: [UInt8] = [], seconds: Double,
                           outputByteCountMax: Int = 1 << 20) throws(SpawnError) -> Outcome {
        var options = options
        options.standardInput = input.isEmpty ? options.standardInput : .pipe
        if case .inherit = options.standardOutput { options.standardOutput = .pipe }
        if case .inherit = options.standardError { options.standardError = .pipe }
        if !input.isEmpty { ignoreBrokenPipes }
        let child = try ChildProcess(options)
        defer { child.closePipes() }
        let stop = StopFlag()
        let group = DispatchGroup()
        let collected = Mutex<(output: [UInt8], errors: [UInt8])>(([], []))
        if let fd = child.takeInput() {
            DispatchQueue.global().async(group: group) { writeAll(fd, input, until: stop) }
        }
        for (fd, isOutput) in [(child.outputFD, true), (child.errorFD, false)] where fd >= 0 {
            DispatchQueue.global().async(group: group) {
                let bytes = readAll(fd, keeping: outputByteCountMax, until: stop)
                collected.withLock { if isOutput { $0.output = bytes } else { $0.errors = bytes } }
            }
        }
        let termination = child.waitOrKill(seconds: seconds)
        let drained = group.wait(timeout: .now() + .milliseconds(Int(drainSecondsMax * 1000))) == .success
        if !drained {
            stop.value.store(true, ordering: .sequentiallyConsistent)
            group.wait()
        }
        let (output, errors) = collected.withLock { $0 }
        return Outcome(termination: termination, output: output, errors: errors, outputIncomplete: !drained)
    }

    /// Tells the reader and writer threads of a child whose output will not end to give up.
    final class StopFlag: Sendable { let value = Atomic<Bool>(false) }

    private static let ignoreBrokenPipes: Void = { _ = Glibc.signal(SIGPIPE, SIG_IGN) }()

    /// Named limit: how often a blocked reader or writer looks whether it should give up.
    static let pollMilliseconds: Int32 = 100

    private static func waitReady(_ fd: Int32, for events: Int16, until stop: StopFlag) -> Bool {
        var p = pollfd(fd: fd, events: events, revents: 0)
        while !stop.value.load(ordering: .sequentiallyConsistent) {
            let r = poll(&p, 1, pollMilliseconds)
            if r > 0 { return true }
            if r < 0 && errno != EINTR { return false }
        }
        return false
    }

    private static func writeAll(_ fd: Int32, _ bytes: [UInt8], until stop: StopFlag) {
        var offset = 0
        while offset < bytes.count, waitReady(fd, for: Int16(POLLOUT), until: stop) {
            let n = bytes[offset...].withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
            if n > 0 { offset += n } else if n < 0 && errno == EINTR { continue } else { break }
        }
        // The child sees the end of its input.
        close(fd)
    }

    private static func readAll(_ fd: Int32, keeping max: Int, until stop: StopFlag) -> [UInt8] {
        var kept: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 64 << 10)
        while waitReady(fd, for: Int16(POLLIN), until: stop) {
            let n = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n > 0 {
                if kept.count < max { kept += buffer[0..<min(n, max - kept.count)] }
            } else if n < 0 && errno == EINTR {
                continue
            } else {
                break
            }
        }
        return kept
    }
}
