import ChildProcess
import DeviceAgent
import DeviceBackends
import Foundation
import Testing

/// The shipped U-Boot script (`contrib/uboot/fleetcast.cmd`, Specs/agent.md §3.4)
/// run by a real U-Boot: Debian's u-boot-qemu build for QEMU's arm64 `virt`
/// machine under TCG, with the environment the real fw_setenv wrote loaded
/// into its memory and the script wrapped by mkimage, boot after boot; each
/// choice is compared with the boot logic (`BootLogic.boot`, §3.2) over the
/// same state. (That build keeps its environment in a flash QEMU does not
/// give it here, so `saveenv` fails and the spent attempt lives on in
/// memory, which is all the next `source` reads.)
@Suite("The U-Boot script in a real U-Boot (QEMU)")
struct UBootScriptTests {
    typealias Scratch = GrubBootControlTests.Scratch
    static let uboot = "/usr/lib/u-boot/qemu_arm64/u-boot.bin"
    static let qemu = "/usr/bin/qemu-system-aarch64"
    static let envAddress = "0x40200000", scriptAddress = "0x40300000"
    static let envBytes = 0x4000

    /// U-Boot's serial console, driven as a person would: wait for the prompt, type a line.
    final class Console: @unchecked Sendable {  // `output` is behind `lock`
        let process: ChildProcess
        private let lock = NSLock()
        private var output = ""
        private var consumed = 0
        /// Named limits: how long U-Boot may take to reach its prompt, and one command to end.
        static let bootSecondsMax = 120.0, commandSecondsMax = 30.0

        init(arguments: [String]) throws {
            var options = ChildProcess.Options([UBootScriptTests.qemu] + arguments)
            options.standardInput = .pipe
            options.standardOutput = .pipe
            options.standardError = .output
            process = try ChildProcess(options)
            // The reader owns the output pipe from here (it ends at QEMU's end).
            let fd = process.outputFD
            Thread.detachNewThread { [self] in
                var buffer = [UInt8](repeating: 0, count: 4096)
                while true {
                    let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                    if n < 0 && errno == EINTR { continue }
                    if n <= 0 { return }
                    lock.lock()
                    output += String(decoding: buffer[0..<n], as: UTF8.self).replacingOccurrences(of: "\r", with: "")
                    lock.unlock()
                }
            }
        }

        /// What U-Boot printed since the last call, once it shows its prompt again.
        func waitForPrompt(seconds: Double) -> String? {
            let deadline = Date().addingTimeInterval(seconds)
            while Date() < deadline {
                lock.lock()
                let text = output
                lock.unlock()
                let tail = text.utf8.dropFirst(consumed)
                if let range = String(decoding: tail, as: UTF8.self).range(of: "\n=> ") {
                    let fresh = String(decoding: tail, as: UTF8.self)
                    consumed += fresh[..<range.upperBound].utf8.count
                    return String(fresh[..<range.lowerBound])
                }
                usleep(20_000)
            }
            return nil
        }

        /// Types `line`; its output up to the next prompt.
        func run(_ line: String) -> String? {
            let bytes = Array((line + "\n").utf8)
            _ = bytes.withUnsafeBytes { write(process.inputFD, $0.baseAddress, $0.count) }
            return waitForPrompt(seconds: Self.commandSecondsMax)
        }

        /// SIGKILL: QEMU with its console on a pipe does not always end on SIGTERM (seen).
        func stop() {
            process.signal(SIGKILL)
            process.wait()
        }
    }

    /// `name=value` of `printenv name`, nil when U-Boot has no such variable.
    static func value(_ name: String, in output: String) -> String? {
        output.split(separator: "\n").first { $0.hasPrefix(name + "=") }.map { String($0.dropFirst(name.count + 1)) }
    }

    @Test("Trial, fallback and confirmed boots: the script picks the side the boot logic picks and spends the attempts it spends, on the environment fw_setenv wrote",
          arguments: ["trial", "confirmed", "shipped"])
    func bootsLikeTheBootLogic(kind: String) throws {
        let s = Scratch()
        let (config, _) = try UBootBootControlTests.environment(in: s)
        let boot = try UBootBootControl(config: config)
        var state: BootState?
        if kind != "shipped" {
            try boot.initialize(current: .a)
            let next = try boot.read().activatingB(kind == "trial" ? .init(bootable: true, confirmed: false, attempts: 2) : .init(bootable: true, confirmed: true))
            try boot.write(next)
            state = next
        }
        // The environment as fw_printenv reads it, in the one-copy layout `env import -c` takes.
        let listed = try UBootBootControlTests.printenv(config)
        #expect(listed.status == 0, "\(listed.output)")
        var vars: [String: String] = [:]
        for line in listed.output.split(separator: "\n") {
            if let eq = line.firstIndex(of: "=") { vars[String(line[..<eq])] = String(line[line.index(after: eq)...]) }
        }
        let image = try #require(UBootEnvImage.encode(vars, flag: nil, size: Self.envBytes))
        try Data(image).write(to: URL(fileURLWithPath: s.file("env.bin")))
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
        let wrapped = try GrubBootControlTests.run("/usr/bin/mkimage", ["-A", "arm64", "-T", "script", "-C", "none", "-n", "fleetcast",
                                                                        "-d", root + "/contrib/uboot/fleetcast.cmd", s.file("boot.scr")])
        #expect(wrapped.status == 0, "\(wrapped.output)")

        let console = try Console(arguments: ["-M", "virt", "-cpu", "cortex-a57", "-m", "256", "-accel", "tcg", "-nographic", "-no-reboot", "-net", "none",
                                              "-bios", Self.uboot,
                                              "-device", "loader,file=\(s.file("env.bin")),addr=\(Self.envAddress),force-raw=on",
                                              "-device", "loader,file=\(s.file("boot.scr")),addr=\(Self.scriptAddress),force-raw=on"])
        defer { console.stop() }
        // U-Boot's autoboot finds nothing to boot here and stops at its prompt.
        let banner = console.waitForPrompt(seconds: Console.bootSecondsMax)
        #expect(banner?.contains("U-Boot") == true, "\(banner ?? "no prompt")")
        guard banner != nil else { return }
        let imported = console.run("env import -c \(Self.envAddress) \(String(Self.envBytes, radix: 16, uppercase: false).withHexPrefix)")
        #expect(imported.map { !$0.contains("error") && !$0.contains("bad CRC") } == true, "\(imported ?? "no prompt")")

        var expected = state
        for boot in 1...4 {
            guard let out = console.run("source \(Self.scriptAddress)"), let vars = console.run("printenv fleetcast_slot fleetcast_bootargs BOOT_A_LEFT BOOT_B_LEFT") else {
                Issue.record("boot \(boot): U-Boot did not come back to its prompt")
                return
            }
            #expect(out.contains("fleetcast: booting side"), "boot \(boot): \(out)")
            // The reference: the boot logic over the state (a fresh environment boots A, as shipped).
            var side = Side.a
            if let e = expected, let (chosen, spent) = BootLogic.boot(e) {
                side = chosen
                expected = spent ?? e
            }
            #expect(Self.value("fleetcast_slot", in: vars) == side.description, "boot \(boot): \(vars)")
            #expect(Self.value("fleetcast_bootargs", in: vars) == "fleetcast.side=\(side)", "boot \(boot): \(vars)")
            if let e = expected {
                #expect(Self.value("BOOT_B_LEFT", in: vars) == String(e[.b].attempts, radix: 16), "boot \(boot): \(vars)")
                #expect(Self.value("BOOT_A_LEFT", in: vars) == String(e[.a].attempts, radix: 16), "boot \(boot): \(vars)")
            }
        }
    }
}
