import DeviceAgent
import DeviceBackends
import Foundation
import Testing

/// The shipped GRUB fragment (`contrib/grub/fleetcast.cfg`, Specs/agent.md §3.3)
/// run by a real GRUB: Debian's grub-emu (GRUB 2.06 built to run as a program),
/// with the grubenv the backend wrote on a FAT disk image (mtools, no loop
/// device), boot after boot. GRUB's `save_env` writes the spent attempt into
/// the image's sectors; the backend then reads what GRUB wrote, and each
/// choice is compared with the boot logic (`BootLogic.boot`, §3.2).
@Suite("The GRUB fragment in a real GRUB (grub-emu)")
struct GrubFragmentTests {
    typealias Scratch = GrubBootControlTests.Scratch
    static let emu = "/usr/bin/grub-emu"

    /// Named limit: one emulated boot.
    static let bootSecondsMax = 30.0

    @Test("Trial, fallback and confirmed boots: GRUB picks the side the boot logic picks, saves the attempt it spends, and the backend reads it back",
          arguments: ["trial", "confirmed"])
    func bootsLikeTheBootLogic(kind: String) throws {
        let s = Scratch()
        let env = s.file("grubenv")
        #expect(try GrubBootControlTests.editenv([env, "create"]).status == 0)
        let boot = try GrubBootControl(envPath: env)
        try boot.initialize(current: .a)
        let state = try boot.read().activatingB(kind == "trial" ? .init(bootable: true, confirmed: false, attempts: 2) : .init(bootable: true, confirmed: true))
        try boot.write(state)

        // A 4 MiB FAT disk holding the block, as a device's /boot would.
        let disk = s.file("disk.img")
        FileManager.default.createFile(atPath: disk, contents: nil)
        try FileHandle(forWritingAtPath: disk)!.truncate(atOffset: 4 << 20)
        #expect(try GrubBootControlTests.run("/usr/sbin/mkfs.fat", ["-F", "12", disk]).status == 0)
        #expect(try GrubBootControlTests.run("/usr/bin/mcopy", ["-i", disk, env, "::grubenv"]).status == 0)
        try "(hd0) \(disk)\n".write(toFile: s.file("device.map"), atomically: true, encoding: .utf8)
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
        try """
        set fleetcast_env=(hd0)/grubenv
        source (host)\(root)/contrib/grub/fleetcast.cfg
        echo "RESULT slot=$fleetcast_slot default=$default"
        halt

        """.write(toFile: s.file("grub.cfg"), atomically: true, encoding: .utf8)

        var expected = state
        for n in 1...4 {
            let r = try GrubBootControlTests.run(Self.emu, ["-r", "host", "-d", s.path, "-m", s.file("device.map")], seconds: Self.bootSecondsMax)
            let result = r.output.components(separatedBy: "RESULT ").dropFirst().first?.split(separator: "\n").first.map(String.init)
            let (side, spent) = try #require(BootLogic.boot(expected))
            #expect(result == "slot=\(side) default=\(side == .a ? 0 : 1)", "boot \(n): \(r.output.suffix(400))")
            #expect(!r.output.contains("error:"), "boot \(n): \(r.output.suffix(400))")
            // What GRUB saved, read by the backend: the spent attempt, the generation as it was.
            if let spent { expected = spent.withGeneration(expected.generation) }
            let out = s.file("saved.env")
            try? FileManager.default.removeItem(atPath: out)
            #expect(try GrubBootControlTests.run("/usr/bin/mcopy", ["-i", disk, "::grubenv", out]).status == 0)
            #expect(try GrubBootControl(envPath: out).read() == expected, "boot \(n)")
        }
    }
}
