import ChildProcess
import Glibc
import Testing

@Suite("ChildProcess: spawn, wait, run to the end")
struct ChildProcessTests {
    /// The race Foundation's Process has on Linux (ChildProcess's doc comment): a
    /// descriptor open in this process without close-on-exec reaches no child, so no
    /// child can hold another's pipe or socket open and hide its end.
    @Test("A child gets descriptors 0-2 and a passed fd 3, nothing else this process has open")
    func closesOtherDescriptors() throws {
        var plain: [Int32] = [-1, -1]
        #expect(pipe(&plain) == 0)  // no O_CLOEXEC: Foundation's socket pair is like this
        defer { close(plain[0]); close(plain[1]) }
        for fd in plain {
            let r = try ChildProcess.run(.init(["/bin/sh", "-c", "test -e /proc/$$/fd/\(fd)"]), seconds: 30)
            #expect(r.termination == .exited(1), "fd \(fd) reached the child: \(String(describing: r.termination))")
        }
        var passing = ChildProcess.Options(["/bin/sh", "-c", "test -p /proc/$$/fd/3 && test ! -e /proc/$$/fd/\(plain[1])"])
        passing.passedAsFD3 = plain[1]
        #expect(try ChildProcess.run(passing, seconds: 30).termination == .exited(0))
    }

    @Test("Input in, output and errors out; output beyond the limit is read and dropped, not left to block the child")
    func runToEnd() throws {
        let input = (0..<200_000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        let echo = try ChildProcess.run(.init(["/bin/cat"]), input: input, seconds: 30)
        #expect(echo.termination == .exited(0) && echo.output == input)
        let both = try ChildProcess.run(.init(["/bin/sh", "-c", "echo out; echo err >&2; exit 3"]), seconds: 30)
        #expect(both.termination == .exited(3) && both.outputText == "out\n" && both.errorText == "err\n")
        let loud = try ChildProcess.run(.init(["/bin/sh", "-c", "head -c 5000000 /dev/zero"]), seconds: 30, outputByteCountMax: 1000)
        #expect(loud.termination == .exited(0) && loud.output.count == 1000)
    }

    @Test("A child that runs out of time is killed and said so; one that leaves a process holding its output is said to be cut short")
    func boundedInTime() throws {
        let slow = try ChildProcess.run(.init(["/bin/sleep", "30"]), seconds: 0.2)
        #expect(slow.termination == nil)
        let left = try ChildProcess.run(.init(["/bin/sh", "-c", "sleep 30 & echo started"]), seconds: 30)
        #expect(left.termination == .exited(0) && left.outputIncomplete && left.outputText == "started\n")
    }

    @Test("A child gets default signal handling though this process ignores SIGPIPE; a missing program is an error, not a crash")
    func signalsAndErrors() throws {
        signal(SIGPIPE, SIG_IGN)
        let piped = try ChildProcess.run(.init(["/bin/sh", "-c", "kill -PIPE $$; exit 0"]), seconds: 30)
        #expect(piped.termination == .signalled(SIGPIPE))
        #expect(throws: SpawnError.self) { try ChildProcess(.init(["/nonexistent/program"])) }
        var elsewhere = ChildProcess.Options(["/bin/pwd"])
        elsewhere.directory = "/tmp"
        #expect(try ChildProcess.run(elsewhere, seconds: 30).outputText == "/tmp\n")
    }

    @Test("wait, signal and termination: a killed child is reaped once and its PID never signalled again")
    func waitAndSignal() throws {
        let child = try ChildProcess(.init(["/bin/sleep", "30"]))
        #expect(child.isRunning)
        #expect(child.wait(seconds: 0.05) == nil)
        child.signal(SIGTERM)
        #expect(child.wait(seconds: 30) == .signalled(SIGTERM))
        child.signal(SIGKILL)  // reaped: nothing is sent
        #expect(child.termination == .signalled(SIGTERM) && !child.isRunning)
    }
}
