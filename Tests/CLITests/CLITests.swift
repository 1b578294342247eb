import ChildProcess
import Foundation
import Testing

/// The built `fleetcast` binary sits next to the test bundle.
let fleetcastBinary: String = {
    let exe = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
    return exe.deletingLastPathComponent().appendingPathComponent("fleetcast").path
}()

struct Run {
    let status: Int32
    let stdout: String
    let stderr: String
}

/// Named limit: the longest one `fleetcast` command of a test may run.
let fleetcastSecondsMax = 600.0

@discardableResult
func fleetcast(_ arguments: [String], in directory: String) throws -> Run {
    var options = ChildProcess.Options([fleetcastBinary] + arguments)
    options.directory = directory
    let r = try ChildProcess.run(options, seconds: fleetcastSecondsMax, outputByteCountMax: 64 << 20)
    guard let ended = r.termination else { throw LabError(text: "fleetcast \(arguments.joined(separator: " ")): no end within \(fleetcastSecondsMax) s; killed") }
    let status: Int32
    switch ended { case .exited(let s): status = s; case .signalled(let s): status = 128 + s }
    return Run(status: status, stdout: r.outputText, stderr: r.errorText)
}

final class Workspace {
    let path = NSTemporaryDirectory() + "fleetcast-cli-" + UUID().uuidString
    init() { try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true) }
    /// FLEETCAST_TEST_KEEP=1 keeps the directory (logs, fleet.json, staging) for diagnosing a failed run.
    deinit { if ProcessInfo.processInfo.environment["FLEETCAST_TEST_KEEP"] == nil { try? FileManager.default.removeItem(atPath: path) } }
    func file(_ name: String) -> String { path + "/" + name }
}

@Suite("fleetcast command line")
struct CLITests {
    @Test("keygen writes private keys 0600 and refuses to overwrite")
    func keygen() throws {
        let w = Workspace()
        for (type, name) in [("ed25519", "vendor"), ("p256", "vendor2"), ("x25519", "device")] {
            let r = try fleetcast(["keygen", "--type", type, "--out", name], in: w.path)
            #expect(r.status == 0, "\(r.stderr)")
            let attributes = try FileManager.default.attributesOfItem(atPath: w.file(name + ".key"))
            #expect((attributes[.posixPermissions] as? Int) == 0o600)
            #expect(try String(contentsOfFile: w.file(name + ".pub"), encoding: .utf8).hasPrefix("-----BEGIN PUBLIC KEY-----"))
        }
        let group = try fleetcast(["keygen", "--type", "group", "--out", "fleet"], in: w.path)
        #expect(group.status == 0)
        #expect((try FileManager.default.attributesOfItem(atPath: w.file("fleet.groupkey"))[.posixPermissions] as? Int) == 0o600)
        let again = try fleetcast(["keygen", "--type", "ed25519", "--out", "vendor"], in: w.path)
        #expect(again.status == 21 && again.stderr.contains("--force"), "\(again.stderr)")
        #expect(try fleetcast(["keygen", "--type", "ed25519", "--out", "vendor", "--force"], in: w.path).status == 0)
        // Never through a link: one planted at the key's name is refused, and --force
        // replaces the link itself, leaving what it points to untouched.
        FileManager.default.createFile(atPath: w.file("victim"), contents: Data("precious".utf8))
        try FileManager.default.createSymbolicLink(atPath: w.file("planted.key"), withDestinationPath: w.file("victim"))
        let planted = try fleetcast(["keygen", "--type", "ed25519", "--out", "planted"], in: w.path)
        #expect(planted.status == 21 && planted.stderr.contains("exists"), "\(planted.stderr)")
        #expect(try fleetcast(["keygen", "--type", "ed25519", "--out", "planted", "--force"], in: w.path).status == 0)
        #expect(try String(contentsOfFile: w.file("victim"), encoding: .utf8) == "precious")
        #expect(try FileManager.default.attributesOfItem(atPath: w.file("planted.key"))[.type] as? FileAttributeType == .typeRegular)
        #expect((try FileManager.default.attributesOfItem(atPath: w.file("planted.key"))[.posixPermissions] as? Int) == 0o600)
    }

    @Test("pack, inspect (text and JSON) and verify with extraction")
    func packInspectVerify() throws {
        let w = Workspace()
        let image = (0..<300_000).map { UInt8(truncatingIfNeeded: $0 * 7 + $0 / 1000) }
        FileManager.default.createFile(atPath: w.file("rootfs.img"), contents: Data(image))
        try fleetcast(["keygen", "--type", "ed25519", "--out", "vendor"], in: w.path)
        try fleetcast(["keygen", "--type", "x25519", "--out", "device"], in: w.path)
        try fleetcast(["keygen", "--type", "group", "--out", "fleet"], in: w.path)
        let pack = try fleetcast(["pack", "-o", "update.fcb", "--product", "gw", "--hardware", "rev-a", "--version", "1.2.3",
                                  "--sequence", "5", "--expires-in", "2d", "--component", "rootfs=rootfs.img:rootfs",
                                  "--sign", "vendor.key", "--recipient", "device.pub", "--group-key", "fleet.groupkey", "--quiet"], in: w.path)
        #expect(pack.status == 0, "\(pack.stderr)")
        #expect(pack.stdout.contains("encrypted for 2 recipient(s)"))

        let inspect = try fleetcast(["inspect", "update.fcb", "--trusted-key", "vendor.pub"], in: w.path)
        #expect(inspect.status == 0)
        #expect(inspect.stdout.contains("gw version 1.2.3, sequence 5") && inspect.stdout.contains("signatures  valid"), "\(inspect.stdout)")
        let json = try fleetcast(["inspect", "update.fcb", "--json"], in: w.path)
        let object = try JSONSerialization.jsonObject(with: Data(json.stdout.utf8)) as! [String: Any]
        #expect(object["sequence"] as? Int == 5 && object["version"] as? String == "1.2.3")
        #expect((object["components"] as? [[String: Any]])?.first?["name"] as? String == "rootfs")

        for key in [["--device-key", "device.key"], ["--group-key", "fleet.groupkey"]] {
            let out = "out-" + key[0]
            let verify = try fleetcast(["verify", "update.fcb", "--trusted-key", "vendor.pub", "--hardware-id", "rev-a",
                                        "--installed-sequence", "4", "--output-dir", out, "--quiet"] + key, in: w.path)
            #expect(verify.status == 0, "\(verify.stderr)")
            #expect(FileManager.default.contents(atPath: w.file(out + "/rootfs")) == Data(image))
        }
    }

    @Test("Each failure has its own exit status and message")
    func exitCodes() throws {
        let w = Workspace()
        FileManager.default.createFile(atPath: w.file("a.img"), contents: Data((0..<50_000).map { UInt8(truncatingIfNeeded: $0 &* 31) }))
        try fleetcast(["keygen", "--type", "ed25519", "--out", "vendor"], in: w.path)
        try fleetcast(["keygen", "--type", "ed25519", "--out", "other"], in: w.path)
        try fleetcast(["keygen", "--type", "x25519", "--out", "device"], in: w.path)
        try fleetcast(["keygen", "--type", "x25519", "--out", "stranger"], in: w.path)
        let pack = try fleetcast(["pack", "-o", "u.fcb", "--product", "gw", "--hardware", "rev-a", "--version", "1", "--sequence", "5",
                                  "--created-at", "1000000000", "--expires-in", "1d", "--component", "a=a.img", "--sign", "vendor.key",
                                  "--recipient", "device.pub", "--quiet"], in: w.path)
        try #require(pack.status == 0, "\(pack.stderr)")
        var bytes = try Data(contentsOf: URL(fileURLWithPath: w.file("u.fcb")))
        bytes[bytes.count / 2] ^= 0x10
        try bytes.write(to: URL(fileURLWithPath: w.file("tampered.fcb")))
        try Data("not a bundle at all, just text".utf8).write(to: URL(fileURLWithPath: w.file("junk.fcb")))

        let base = ["--now", "1000000100", "--device-key", "device.key", "--quiet"]
        let cases: [([String], Int32, String)] = [
            (["verify", "u.fcb", "--trusted-key", "vendor.pub"] + base, 0, "verified"),
            (["verify", "junk.fcb", "--trusted-key", "vendor.pub"] + base, 10, "malformed"),
            (["verify", "u.fcb", "--trusted-key", "other.pub"] + base, 12, "signatureInvalid"),
            (["verify", "u.fcb", "--trusted-key", "vendor.pub", "--threshold", "2"] + base, 12, "signatureInvalid"),
            (["verify", "u.fcb", "--trusted-key", "vendor.pub", "--now", "1000086401", "--device-key", "device.key"], 13, "expired"),
            (["verify", "u.fcb", "--trusted-key", "vendor.pub", "--hardware-id", "rev-b"] + base, 14, "incompatibleHardware"),
            (["verify", "u.fcb", "--trusted-key", "vendor.pub", "--installed-sequence", "5"] + base, 15, "rollback"),
            (["verify", "tampered.fcb", "--trusted-key", "vendor.pub"] + base, 17, "hashMismatch"),
            (["verify", "u.fcb", "--trusted-key", "vendor.pub", "--now", "1000000100", "--device-key", "stranger.key"], 18, "notARecipient"),
            (["verify", "missing.fcb", "--trusted-key", "vendor.pub"] + base, 20, "io"),
            (["pack", "-o", "x.fcb", "--product", "gw", "--hardware", "h", "--version", "1", "--sequence", "1", "--component", "a=nope.img", "--sign", "vendor.key"], 21, "invalidInput"),
            (["verify", "u.fcb"], 64, "--trusted-key"),
            (["receive", "--trusted-key", "vendor.pub", "--staging-dir", "st", "--block-memory", "10"], 64, "--block-memory"),
        ]
        for (arguments, status, text) in cases {
            let r = try fleetcast(arguments, in: w.path)
            #expect(r.status == status, "\(arguments): \(r.stderr)")
            #expect((r.stdout + r.stderr).contains(text), "\(arguments): \(r.stdout) \(r.stderr)")
        }
    }

    @Test("Arguments that would trap, wrap or prompt are refused with their name (issue 15, item 10): durations and times checked, rates and seconds finite and bounded, an encrypted key refused, not prompted for")
    func argumentsChecked() throws {
        let w = Workspace()
        FileManager.default.createFile(atPath: w.file("a.img"), contents: Data(repeating: 7, count: 10_000))
        try fleetcast(["keygen", "--type", "ed25519", "--out", "vendor"], in: w.path)
        let made = try runTool("/usr/bin/openssl", ["genpkey", "-algorithm", "ed25519", "-aes-256-cbc", "-pass", "pass:secret", "-out", w.file("locked.key")])
        #expect(made.status == 0, "\(made.output)")
        let pack = ["pack", "-o", "u.fcb", "--product", "gw", "--hardware", "h", "--version", "1", "--sequence", "1", "--component", "a=a.img", "--quiet"]
        let cases: [([String], Int32, String)] = [
            (pack + ["--sign", "vendor.key", "--expires-in", "99999999999999999y"], 21, "--expires-in '99999999999999999y' is not a duration"),
            (pack + ["--sign", "vendor.key", "--expires-in", "101y"], 21, "at most 100y"),
            (pack + ["--sign", "vendor.key", "--created-at", "18446744073709551615", "--expires-in", "1s"], 21, "passes the end of 64-bit time"),
            (pack + ["--sign", "locked.key"], -1, "encrypted with a passphrase"),  // -1: any failure status
            (["send", "u.fcb", "--rate", "1e-20"], 64, "--rate"),
            (["send", "u.fcb", "--rate", "inf"], 64, "--rate"),
            (["send", "u.fcb", "--rate", "1000G"], 64, "outside 8k...100G"),
            (["send", "u.fcb", "--deadline", "999999999999999y"], 64, "--deadline"),
            (["send", "u.fcb", "--deadline", "18446744073709s"], 64, "--deadline"),
            (["receive", "--trusted-key", "vendor.pub", "--staging-dir", "st", "--timeout", "inf"], 64, "--timeout"),
            (["receive", "--trusted-key", "vendor.pub", "--staging-dir", "st", "--timeout", "nan"], 64, "--timeout"),
        ]
        for (arguments, status, text) in cases {
            let r = try fleetcast(arguments, in: w.path)
            if status >= 0 { #expect(r.status == status, "\(arguments): \(r.stderr)") } else { #expect(r.status != 0 && r.status < 128, "\(arguments): \(r.status) \(r.stderr)") }
            #expect((r.stdout + r.stderr).contains(text), "\(arguments): \(r.stdout) \(r.stderr)")
        }
    }

    @Test("inspect shows a bundle's unverified strings escaped, never as terminal control, and says when it has expired (issue 15, item 9)")
    func inspectEscapes() throws {
        let w = Workspace()
        FileManager.default.createFile(atPath: w.file("a.img"), contents: Data(repeating: 7, count: 10_000))
        try fleetcast(["keygen", "--type", "ed25519", "--out", "vendor"], in: w.path)
        // A version that would clear the screen and print a green "VERIFIED OK".
        let hostile = "1.0\u{1b}[2J\u{1b}[32mVERIFIED OK\u{1b}[0m\u{202e}"
        let pack = try fleetcast(["pack", "-o", "u.fcb", "--product", "gw", "--hardware", "h", "--version", hostile, "--sequence", "1",
                                  "--created-at", "1000000000", "--expires-in", "1d", "--component", "a=a.img", "--sign", "vendor.key", "--quiet"], in: w.path)
        try #require(pack.status == 0, "\(pack.stderr)")
        let text = try fleetcast(["inspect", "u.fcb"], in: w.path)
        #expect(text.status == 0, "\(text.stderr)")
        #expect(!text.stdout.unicodeScalars.contains { $0.value == 0x1B || $0.value == 0x202E }, "\(text.stdout.debugDescription)")
        #expect(text.stdout.contains("1.0\\u{1b}[2J\\u{1b}[32mVERIFIED OK\\u{1b}[0m\\u{202e}"), "\(text.stdout)")
        #expect(text.stdout.contains("(EXPIRED)"), "\(text.stdout)")
        let json = try fleetcast(["inspect", "u.fcb", "--json"], in: w.path)
        let object = try JSONSerialization.jsonObject(with: Data(json.stdout.utf8)) as? [String: Any]
        #expect(object?["expired"] as? Bool == true && object?["version"] as? String == hostile, "\(json.stdout)")
    }

    @Test("--help explains every subcommand")
    func help() throws {
        let w = Workspace()
        let top = try fleetcast(["--help"], in: w.path)
        #expect(top.status == 0 && top.stdout.contains("Exit status"))
        for (command, phrase) in [("keygen", "0600"), ("pack", "NAME=PATH"), ("inspect", "verify"), ("verify", "anti-rollback"), ("demo", "tampers"), ("agent", "simulated-reboot"), ("send", "--await")] {
            let r = try fleetcast([command, "--help"], in: w.path)
            #expect(r.status == 0 && r.stdout.contains(phrase), "\(command): \(r.stdout)")
        }
    }

    @Test("send that hears no receiver at all exits 32 and says so")
    func sendToNobody() throws {
        let w = Workspace()
        FileManager.default.createFile(atPath: w.file("image"), contents: Data((0..<200_000).map { UInt8(truncatingIfNeeded: $0) }))
        try fleetcast(["keygen", "--type", "ed25519", "--out", "vendor"], in: w.path)
        try fleetcast(["pack", "--quiet", "-o", "u.fcb", "--product", "p", "--hardware", "h", "--version", "1", "--sequence", "1",
                       "--component", "rootfs=image", "--sign", "vendor.key"], in: w.path)
        let port = "\(26000 + Int(getpid() % 3000))"
        let r = try fleetcast(["send", "u.fcb", "--interface", "lo", "--ttl", "0", "--port", port, "--rate", "50M", "--deadline", "20s", "--quiet"], in: w.path)
        #expect(r.status == 32 && r.stderr.contains("no receiver was heard"), "status \(r.status): \(r.stderr)")
    }
}
