import DeviceAgent
import DeviceBackends
import Foundation
import Testing

/// Specs/agent.md §9 at the edge: real processes started, judged ready, switched
/// and stopped (the whole path with a real service and client is
/// `AgentTests.liveActivation`).
@Suite("Live activation: the service's versions, the current link, readiness and stop")
struct LiveActivationTests {
    typealias Scratch = GrubBootControlTests.Scratch

    static func live(_ s: Scratch, _ command: [String], ready: LiveActivation.Settings.Ready, readySeconds: Double = 0.3, stopSeconds: Double = 0.3) throws -> LiveActivation {
        for side in ["a", "b"] { try FileManager.default.createDirectory(atPath: s.file(side), withIntermediateDirectories: true) }
        var settings = LiveActivation.Settings(root: s.path, command: command)
        settings.ready = ready
        settings.readySeconds = readySeconds
        settings.stopSeconds = stopSeconds
        return try LiveActivation(settings)
    }

    @Test("A version that keeps running is made current, then stopped; one that ignores SIGTERM is killed after the stop timeout")
    func switchAndStop() throws {
        let s = Scratch()
        let live = try Self.live(s, ["sh", "-c", "trap '' TERM; echo $FLEETCAST_SIDE > started; exec sleep 30"], ready: .running)
        #expect(try live.currentSide() == nil)
        #expect(live.switchTo(.a) == nil)
        #expect(try live.currentSide() == .a)
        #expect((try? String(contentsOfFile: s.file("a/started"), encoding: .utf8)) == "a\n")
        let first = try #require(live.running)
        #expect(live.switchTo(.b) == nil)
        #expect(try live.currentSide() == .b && !first.isRunning, "the old version is stopped once the new one is current")
        let started = Date()
        live.stopRunning()
        #expect(Date().timeIntervalSince(started) < 5 && live.running == nil)
    }

    @Test("A version that exits, or never says READY=1, is stopped and nothing switches")
    func notReady() throws {
        let s = Scratch()
        let live = try Self.live(s, ["sh", "-c", "exec sleep 30"], ready: .notify)
        try live.makeCurrent(.a)
        let silent = live.switchTo(.b)
        #expect(silent?.contains("did not say READY=1 within 0.3 s") == true, "\(String(describing: silent))")
        #expect(try live.currentSide() == .a && live.running == nil)
        let other = Scratch()
        let exits = try Self.live(other, ["false"], ready: .running)
        let why = exits.switchTo(.a)
        #expect(why?.contains("exited before it was ready") == true, "\(String(describing: why))")
        #expect(try exits.currentSide() == nil)
    }

    @Test("Bad input: a side that is no directory, a current link to something else, a listen address that is not IPv4")
    func badInput() throws {
        let s = Scratch()
        let e1 = #expect(throws: StorageError.self) { try LiveActivation(.init(root: s.path, command: ["true"])) }
        #expect(e1?.reason.contains("\(s.path)/a is not a directory") == true, "\(String(describing: e1))")
        let live = try Self.live(s, ["true"], ready: .running)
        #expect(symlink("../etc", s.file("current")) == 0)
        let e2 = #expect(throws: StorageError.self) { try live.currentSide() }
        #expect(e2?.reason.contains("points to '../etc', not a or b") == true, "\(String(describing: e2))")
        var settings = live.settings
        settings.listen = ("localhost", 8080)
        let e3 = #expect(throws: StorageError.self) { try LiveActivation(settings) }
        #expect(e3?.reason.contains("not an IPv4 address") == true, "\(String(describing: e3))")
    }
}
