import ChildProcess
import DeviceAgent
import DeviceBackends
import Foundation
import Testing

/// Specs/agent.md §3.3 with Debian's real `grub-editenv` on plain files
/// (installed by scripts/setup), and the shipped GRUB fragment checked by
/// `grub-script-check`.
@Suite("The grub boot backend, on the real grub-editenv")
struct GrubBootControlTests {
    final class Scratch {
        let path = NSTemporaryDirectory() + "fleetcast-grub-" + UUID().uuidString
        init() { try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true) }
        deinit { try? FileManager.default.removeItem(atPath: path) }
        func file(_ name: String) -> String { path + "/" + name }
    }

    static let tool = "/usr/bin/grub-editenv"

    /// `grub-editenv FILE ARGS...`: its status and output.
    static func editenv(_ args: [String]) throws -> (status: Int32, output: String) { try run(tool, args) }

    /// A tool's status and its output (standard output and error together), bounded in time.
    static func run(_ path: String, _ args: [String], seconds: Double = 120) throws -> (status: Int32, output: String) {
        var options = ChildProcess.Options([path] + args)
        options.standardError = .output
        let r = try ChildProcess.run(options, seconds: seconds, outputByteCountMax: 16 << 20)
        switch r.termination {
        case .exited(let status): return (status, r.outputText)
        case .signalled(let signal): return (128 + signal, r.outputText)
        case nil: return (-1, "\(path): no end within \(seconds) s; killed\n" + r.outputText)
        }
    }

    @Test("A fresh block gets the shipped state; every state written reads back the same, under RAUC's variable names, and others' variables are kept")
    func roundTrip() throws {
        let s = Scratch()
        let env = s.file("grubenv")
        #expect(try Self.editenv([env, "create"]).status == 0)
        #expect(try Self.editenv([env, "set", "saved_entry=vendor"]).status == 0)
        let boot = try GrubBootControl(envPath: env)
        #expect(throws: StorageError.self) { try boot.read() }  // no state yet: refused, not guessed
        try boot.initialize(current: .a)
        let state = try boot.read()
        #expect(state == BootState.initial(current: .a).withGeneration(state.generation))
        for step in state.lifecycle(trialAttempts: 3) {
            try boot.write(step)
            #expect(try boot.read() == step)
        }
        let listed = try Self.editenv([env, "list"]).output
        for line in ["ORDER=A B", "A_OK=1", "A_TRY=0", "B_OK=0", "B_TRY=1", "saved_entry=vendor"] {
            #expect(listed.split(separator: "\n").contains(Substring(line)), "\(line) not in:\n\(listed)")
        }
        // The block is still one GRUB reads: 1024 bytes, and no temporary is left beside it.
        #expect((try FileManager.default.attributesOfItem(atPath: env)[.size] as? Int) == 1024)
        #expect(!FileManager.default.fileExists(atPath: env + ".new"))
    }

    @Test("What the boot logic does over the block: a trial boots its attempts, then the confirmed side (Specs/agent.md §3.2)")
    func bootLogic() throws {
        let s = Scratch()
        let env = s.file("grubenv")
        #expect(try Self.editenv([env, "create"]).status == 0)
        let boot = try GrubBootControl(envPath: env)
        try boot.initialize(current: .a)
        try boot.write(try boot.read().activatingB(.init(bootable: true, confirmed: false, attempts: 2)))
        var booted: [Side] = []
        for _ in 0..<4 {
            let (side, spent) = try #require(BootLogic.boot(try boot.read()))
            if let spent { try boot.write(spent) }
            booted.append(side)
        }
        #expect(booted == [.b, .b, .a, .a], "\(booted)")
    }

    @Test("Bad input: a missing tool, a missing, corrupt, too small, read-only or foreign block, a write that cannot build its block: each a clear error, the old block intact")
    func badInput() throws {
        let s = Scratch()
        let env = s.file("grubenv")
        #expect(throws: StorageError.self) { try GrubBootControl(envPath: env, tool: s.file("no-such-tool")) }
        let boot = try GrubBootControl(envPath: env)
        let missing = #expect(throws: StorageError.self) { try boot.read() }
        #expect(missing?.reason.contains("no GRUB environment block") == true, "\(String(describing: missing))")
        // Not a GRUB block at all.
        FileManager.default.createFile(atPath: env, contents: Data(repeating: 0x41, count: 1024))
        let corrupt = #expect(throws: StorageError.self) { try boot.read() }
        #expect(corrupt?.reason.contains("grub-editenv") == true, "\(String(describing: corrupt))")
        // A block with values this backend does not accept.
        try FileManager.default.removeItem(atPath: env)
        for (vars, field) in [(["ORDER=A A"], "ORDER"), (["ORDER=A B", "FLEETCAST_GENERATION=1", "A_OK=2"], "A_LEFT"),
                              (["ORDER=A B", "FLEETCAST_GENERATION=1", "A_LEFT=0", "B_LEFT=0", "A_OK=yes"], "A_OK"),
                              (["ORDER=B A", "FLEETCAST_GENERATION=1", "A_LEFT=11", "B_LEFT=0"], "A_LEFT")] {
            try? FileManager.default.removeItem(atPath: env)
            #expect(try Self.editenv([env, "create"]).status == 0)
            #expect(try Self.editenv([env, "set"] + vars).status == 0)
            let e = #expect(throws: StorageError.self) { try boot.read() }
            #expect(e?.reason.contains(field) == true && e?.reason.contains("no valid boot state") == true, "\(vars): \(String(describing: e))")
        }
        // A write that cannot build its new block (here its temporary's name is taken by a
        // directory, which fails as root too): an error, and the block that was there stays.
        try FileManager.default.removeItem(atPath: env)
        #expect(try Self.editenv([env, "create"]).status == 0)
        try boot.initialize(current: .b)
        let before = try Data(contentsOf: URL(fileURLWithPath: env))
        try FileManager.default.createDirectory(atPath: env + ".new", withIntermediateDirectories: false)
        var next = try boot.read()
        next.generation += 1
        next[.a] = .init(bootable: false, confirmed: false)
        let failed = #expect(throws: StorageError.self) { try boot.write(next) }
        #expect(failed?.reason.contains("grub-editenv") == true, "\(String(describing: failed))")
        #expect(try Data(contentsOf: URL(fileURLWithPath: env)) == before)
        #expect(try boot.read() == (try BootState.initialized(.b, from: boot)))
        try FileManager.default.removeItem(atPath: env + ".new")
        // Read-only (immutable, which holds for root too): the rename over it fails, the block stays.
        #expect(try Self.run("/usr/bin/chattr", ["+i", env]).status == 0, "chattr +i needs a file system with attributes (ext4)")
        let readOnly = #expect(throws: StorageError.self) { try boot.write(next) }
        _ = try Self.run("/usr/bin/chattr", ["-i", env])
        #expect(readOnly?.reason.contains("rename") == true, "\(String(describing: readOnly))")
        #expect(try Data(contentsOf: URL(fileURLWithPath: env)) == before)
        // Too small to be a block: refused.
        try Data(before.prefix(100)).write(to: URL(fileURLWithPath: env))
        let small = #expect(throws: StorageError.self) { try boot.read() }
        #expect(small?.reason.contains("is 100 bytes, not a 1024-byte GRUB environment block") == true, "\(String(describing: small))")
    }

    @Test("The shipped GRUB fragment is valid GRUB script (grub-script-check)")
    func fragment() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
        let r = try Self.run("/usr/bin/grub-script-check", [root + "/contrib/grub/fleetcast.cfg"])
        #expect(r.status == 0, "\(r.output)")
    }
}

extension BootState {
    /// The shipped state of `side` at the generation the block holds.
    static func initialized(_ side: Side, from boot: GrubBootControl) throws -> BootState {
        BootState.initial(current: side).withGeneration(try boot.read().generation)
    }

    /// From a device running A: an install (B not bootable), an activation (B on trial,
    /// first), a trial boot spent, a confirm, a rollback; each a generation higher.
    func lifecycle(trialAttempts: UInt8) -> [BootState] {
        var state = self
        var steps: [BootState] = []
        state.generation += 1; state[.b] = .init(bootable: false, confirmed: false); state.order = [.a, .b]; steps.append(state)
        state.generation += 1; state[.b] = .init(bootable: true, confirmed: false, attempts: trialAttempts); state.order = [.b, .a]; steps.append(state)
        state.generation += 1; state[.b].attempts -= 1; steps.append(state)
        state.generation += 1; state[.b] = .init(bootable: true, confirmed: true); steps.append(state)
        state.generation += 1; state[.b] = .init(bootable: false, confirmed: false); state.order = [.a, .b]; steps.append(state)
        return steps
    }

    /// The next generation with side B first, in `b` (on trial, or confirmed).
    func activatingB(_ b: SideState) -> BootState {
        var next = self
        next.generation += 1
        next[.b] = b
        next.order = [.b, .a]
        return next
    }

    func withGeneration(_ g: UInt64) -> BootState {
        var s = self
        s.generation = g
        return s
    }
}
