import DeviceAgent
import DeviceBackends
import Foundation
import Testing

/// Specs/agent.md §3.4 with Debian's real `fw_printenv` and `fw_setenv`
/// (libubootenv-tool) on a file-backed redundant environment made by
/// `mkenvimage -r` (u-boot-tools), all installed by scripts/setup.
@Suite("The uboot boot backend, on the real fw_printenv and fw_setenv")
struct UBootBootControlTests {
    typealias Scratch = GrubBootControlTests.Scratch
    static let copyBytes = 0x4000

    /// A redundant environment as a device ships it: two copies of `copyBytes` in one
    /// file (`mkenvimage -r`), U-Boot's own variables in it, and the fw_env.config naming both.
    static func environment(in s: Scratch, variables: [String] = ["bootcmd=run fleetcast_boot", "bootdelay=0"]) throws -> (config: String, env: String) {
        let text = s.file("env.txt"), copy = s.file("copy.bin"), env = s.file("uboot.env"), config = s.file("fw_env.config")
        try (variables.joined(separator: "\n") + "\n").write(toFile: text, atomically: true, encoding: .utf8)
        let made = try GrubBootControlTests.run("/usr/bin/mkenvimage", ["-r", "-s", String(copyBytes), "-o", copy, text])
        #expect(made.status == 0, "\(made.output)")
        let one = try Data(contentsOf: URL(fileURLWithPath: copy))
        try (one + one).write(to: URL(fileURLWithPath: env))
        try "\(env) 0x0 \(String(copyBytes, radix: 16, uppercase: false).withHexPrefix)\n\(env) \(String(copyBytes, radix: 16).withHexPrefix) \(String(copyBytes, radix: 16).withHexPrefix)\n"
            .write(toFile: config, atomically: true, encoding: .utf8)
        return (config, env)
    }

    static func printenv(_ config: String) throws -> (status: Int32, output: String) {
        try GrubBootControlTests.run("/usr/bin/fw_printenv", ["-c", config])
    }

    /// The two copies of the file as our codec reads them: flag and variables, nil where the CRC fails.
    static func copies(_ env: String) throws -> [(flag: UInt8?, vars: [String: String])?] {
        let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: env)))
        return [Array(bytes[0..<copyBytes]), Array(bytes[copyBytes..<(2 * copyBytes)])].map { UBootEnvImage.decode($0, redundant: true) }
    }

    @Test("A shipped environment gets the boot state; every state written reads back the same under RAUC's names, one copy at a time, and U-Boot's own variables are kept")
    func roundTrip() throws {
        let s = Scratch()
        let (config, env) = try Self.environment(in: s)
        let boot = try UBootBootControl(config: config)
        #expect(throws: StorageError.self) { try boot.read() }  // no state yet: refused, not guessed
        try boot.initialize(current: .a)
        let state = try boot.read()
        #expect(state == BootState.initial(current: .a).withGeneration(state.generation))
        var flags: [UInt8] = []
        for step in state.lifecycle(trialAttempts: 10) {
            let before = try Self.copies(env)
            try boot.write(step)
            #expect(try boot.read() == step)
            // fw_setenv wrote the copy that was not current, with the next flag; the other is untouched.
            let after = try Self.copies(env)
            let current = try #require(UBootEnvImage.current((after[0]?.flag, after[1]?.flag)))
            #expect(after[1 - current]?.flag == before[1 - current]?.flag && after[1 - current]?.vars == before[1 - current]?.vars)
            #expect(try UBootBootControl.decode(try #require(after[current]).vars, path: env) == step)
            flags.append(try #require(after[current]?.flag))
        }
        #expect(zip(flags, flags.dropFirst()).allSatisfy { $1 == $0 &+ 1 }, "\(flags)")
        let listed = Set(try Self.printenv(config).output.split(separator: "\n"))
        #expect(listed.isSuperset(of: ["BOOT_ORDER=A B", "BOOT_A_OK=1", "BOOT_A_TRY=0", "BOOT_B_OK=0", "BOOT_B_TRY=1", "bootcmd=run fleetcast_boot", "bootdelay=0"]), "\(listed)")
        // Ten trial boots are written as U-Boot's setexpr writes numbers: in hexadecimal.
        var trial = try boot.read()
        trial.generation += 1
        trial[.b] = .init(bootable: true, confirmed: false, attempts: 10)
        try boot.write(trial)
        #expect(try Self.printenv(config).output.split(separator: "\n").contains("BOOT_B_LEFT=a"))
    }

    @Test("Our copy codec is the tools': fw_printenv reads a copy UBootEnvImage made, and UBootEnvImage reads what fw_setenv wrote")
    func codecAgainstTools() throws {
        let s = Scratch()
        let (config, env) = try Self.environment(in: s)
        let vars = ["BOOT_ORDER": "B A", "x": "a value with spaces", "bootcmd": "run fleetcast_boot"]
        let newer = try #require(UBootEnvImage.encode(vars, flag: 7, size: Self.copyBytes))
        let older = try #require(UBootEnvImage.encode(["bootcmd": "old"], flag: 6, size: Self.copyBytes))
        try Data(older + newer).write(to: URL(fileURLWithPath: env))
        let listed = try Self.printenv(config)
        #expect(listed.status == 0 && Set(listed.output.split(separator: "\n")) == ["BOOT_ORDER=B A", "x=a value with spaces", "bootcmd=run fleetcast_boot"], "\(listed.output)")
        // The flag wraps: 0 after 255 is the newer copy.
        try Data(try #require(UBootEnvImage.encode(["bootcmd": "wrapped"], flag: 0, size: Self.copyBytes))
                 + (try #require(UBootEnvImage.encode(["bootcmd": "old"], flag: 255, size: Self.copyBytes)))).write(to: URL(fileURLWithPath: env))
        #expect(try Self.printenv(config).output == "bootcmd=wrapped\n")
        #expect(UBootEnvImage.current((0, 255)) == 0 && UBootEnvImage.current((255, 0)) == 1 && UBootEnvImage.current((3, 4)) == 1 && UBootEnvImage.current((nil, nil)) == nil)
        let set = try GrubBootControlTests.run("/usr/bin/fw_setenv", ["-c", config, "FLEETCAST_GENERATION", "5"])
        #expect(set.status == 0, "\(set.output)")
        let copies = try Self.copies(env)
        #expect(copies[1]?.flag == 1 && copies[1]?.vars == ["bootcmd": "wrapped", "FLEETCAST_GENERATION": "5"], "\(String(describing: copies[1]))")
    }

    @Test("A write torn inside fw_setenv leaves the old copy: the environment still holds the state before it")
    func tornCopy() throws {
        let s = Scratch()
        let (config, env) = try Self.environment(in: s)
        let boot = try UBootBootControl(config: config)
        try boot.initialize(current: .a)
        let before = try boot.read()
        var next = before
        next.generation += 1
        next[.b] = .init(bootable: true, confirmed: false, attempts: 3)
        next.order = [.b, .a]
        let old = [UInt8](try Data(contentsOf: URL(fileURLWithPath: env)))
        try boot.write(next)
        // Cut the power inside that write: only its first 64 bytes (the CRC, the flag and
        // the first variables) reached the file; the rest of the copy is as it was.
        var new = [UInt8](try Data(contentsOf: URL(fileURLWithPath: env)))
        let copies = try Self.copies(env)
        let written = try #require(UBootEnvImage.current((copies[0]?.flag, copies[1]?.flag)))
        let torn = (written * Self.copyBytes + 64)..<((written + 1) * Self.copyBytes)
        new.replaceSubrange(torn, with: old[torn])
        try Data(new).write(to: URL(fileURLWithPath: env))
        #expect(try Self.copies(env)[written] == nil, "the torn copy fails its CRC")
        #expect(try boot.read() == before)
        #expect(try Self.printenv(config).status == 0)
    }

    @Test("Bad input: a config naming one copy, a stale generation, a missing, failing or lying tool, a missing config, a corrupt, too small or read-only environment, values out of range: each a clear error, the environment as it was")
    func badInput() throws {
        let s = Scratch()
        #expect(throws: StorageError.self) { try UBootBootControl(config: s.file("fw_env.config"), printenv: s.file("no-such-tool")) }
        let noConfig = #expect(throws: StorageError.self) { try UBootBootControl(config: s.file("fw_env.config")) }
        #expect(noConfig?.reason.contains("fw_env.config") == true, "\(String(describing: noConfig))")
        let (config, env) = try Self.environment(in: s)
        // One copy named: refused at once (A-3b), before anything is read or written.
        let single = s.file("single.config")
        try "# one copy\n\(env) 0x0 0x4000\n".write(toFile: single, atomically: true, encoding: .utf8)
        let e0 = #expect(throws: StorageError.self) { try UBootBootControl(config: single) }
        #expect(e0?.reason.contains("names 1 environment copy, not 2") == true, "\(String(describing: e0))")
        let boot = try UBootBootControl(config: config)
        try boot.initialize(current: .a)
        let shipped = try boot.read()
        // A stored generation at or above the one written is refused, not a trap.
        var stale = shipped
        stale.generation = 1
        let e00 = #expect(throws: StorageError.self) { try boot.write(stale) }
        #expect(e00?.reason.contains("is not below the one written") == true, "\(String(describing: e00))")
        let intact = try Data(contentsOf: URL(fileURLWithPath: env))
        var next = shipped
        next.generation += 1
        next[.b] = .init(bootable: false, confirmed: false)

        // A tool that fails, and one that exits 0 having written nothing (as libubootenv 0.3.2
        // does with a script line it cannot parse): both errors, the environment untouched.
        let failing = s.file("fw_setenv-failing"), lying = s.file("fw_setenv-lying")
        try "#!/bin/sh\necho 'Error storing the env' >&2\nexit 3\n".write(toFile: failing, atomically: true, encoding: .utf8)
        try "#!/bin/sh\ncat >/dev/null\nexit 0\n".write(toFile: lying, atomically: true, encoding: .utf8)
        for tool in [failing, lying] { chmod(tool, 0o755) }
        let e1 = #expect(throws: StorageError.self) { try UBootBootControl(config: config, setenv: failing).write(next) }
        #expect(e1?.reason.contains("exited with status 3: Error storing the env") == true, "\(String(describing: e1))")
        let e2 = #expect(throws: StorageError.self) { try UBootBootControl(config: config, setenv: lying).write(next) }
        #expect(e2?.reason.contains("read back") == true, "\(String(describing: e2))")
        #expect(try Data(contentsOf: URL(fileURLWithPath: env)) == intact)

        // Read-only (immutable, which holds for root too): the write fails, the state stays.
        #expect(try GrubBootControlTests.run("/usr/bin/chattr", ["+i", env]).status == 0, "chattr +i needs a file system with attributes (ext4)")
        let e3 = #expect(throws: StorageError.self) { try boot.write(next) }
        _ = try GrubBootControlTests.run("/usr/bin/chattr", ["-i", env])
        #expect(e3?.reason.contains("fw_setenv") == true, "\(String(describing: e3))")
        #expect(try boot.read() == shipped)

        // Values this backend does not accept.
        for (name, value, field) in [("BOOT_ORDER", "A", "BOOT_ORDER"), ("BOOT_A_LEFT", "b", "BOOT_A_LEFT"), ("BOOT_B_OK", "yes", "BOOT_B_OK"),
                                     ("FLEETCAST_GENERATION", "0", "FLEETCAST_GENERATION")] {
            try Data(intact).write(to: URL(fileURLWithPath: env))
            #expect(try GrubBootControlTests.run("/usr/bin/fw_setenv", ["-c", config, name, value]).status == 0)
            let e = #expect(throws: StorageError.self) { try boot.read() }
            #expect(e?.reason.contains(field) == true && e?.reason.contains("no valid boot state") == true, "\(name)=\(value): \(String(describing: e))")
        }

        // Corrupt (both copies fail their CRC) and too small: refused, and never replaced by
        // a new environment (it would lose U-Boot's bootcmd).
        for bytes in [Data(repeating: 0x5A, count: 2 * Self.copyBytes), Data(repeating: 0, count: 100)] {
            try bytes.write(to: URL(fileURLWithPath: env))
            let e = #expect(throws: StorageError.self) { try boot.read() }
            #expect(e?.reason.contains("Cannot read environment") == true, "\(String(describing: e))")
            let i = #expect(throws: StorageError.self) { try boot.initialize(current: .a) }
            #expect(i?.reason.contains("mkenvimage") == true, "\(String(describing: i))")
            #expect(try Data(contentsOf: URL(fileURLWithPath: env)) == bytes)
        }
    }

    @Test("The shipped U-Boot script wraps as a boot script (mkimage -T script)")
    func fragment() throws {
        let s = Scratch()
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
        let r = try GrubBootControlTests.run("/usr/bin/mkimage", ["-A", "arm", "-T", "script", "-C", "none", "-n", "fleetcast",
                                                                  "-d", root + "/contrib/uboot/fleetcast.cmd", s.file("boot.scr")])
        #expect(r.status == 0, "\(r.output)")
        #expect(FileManager.default.fileExists(atPath: s.file("boot.scr")))
    }
}

extension String {
    var withHexPrefix: String { "0x" + self }
}
