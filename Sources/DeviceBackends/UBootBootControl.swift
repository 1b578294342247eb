import CZlib
import DeviceAgent
import Foundation

/// The `uboot` boot-control backend (Specs/agent.md §3.4): the boot state kept in
/// a U-Boot environment under RAUC's names (`BOOT_ORDER`, `BOOT_<S>_LEFT`), read
/// with `fw_printenv` and written with `fw_setenv` (Debian's libubootenv-tool),
/// and consumed at power-on by `contrib/uboot/fleetcast.cmd`.
///
/// The environment must be redundant (two copies, as `mkenvimage -r` makes and
/// `fw_env.config` names with two lines): `fw_setenv` then writes the copy that
/// is not current, in place, with its flag one higher, and fsyncs it (strace on
/// Debian 12's libubootenv 0.3.2); a power cut inside leaves that copy torn,
/// its CRC fails, and the old copy is still the environment. Every write is one
/// `fw_setenv -s` with every variable, so no copy ever holds half a switch (A-3b),
/// and it is read back before it counts: libubootenv 0.3.2 silently ignores a
/// script line it cannot parse and still exits 0.
public final class UBootBootControl: BootControl {
    /// The `fw_env.config` that names the environment's two copies.
    public let configPath: String
    private let printenv: BootTool
    private let setenv: BootTool

    /// Variables this backend owns; any other is kept as it is.
    public static var owned: [String] { variables.owned }
    /// Named limit: a fw_env.config is a few lines.
    static let configByteCountMax = 64 << 10

    public init(config: String, printenv: String = "/usr/bin/fw_printenv", setenv: String = "/usr/bin/fw_setenv") throws(StorageError) {
        configPath = config
        self.printenv = try BootTool(path: printenv, backend: "uboot", package: "libubootenv-tool")
        self.setenv = try BootTool(path: setenv, backend: "uboot", package: "libubootenv-tool")
        guard FileManager.default.isReadableFile(atPath: config), let text = try? String(contentsOfFile: config, encoding: .utf8),
              text.utf8.count <= Self.configByteCountMax else {
            throw StorageError("boot backend uboot: \(config) (the fw_env.config naming the environment's two copies) is missing or unreadable")
        }
        // A-3b: only a redundant environment keeps the old state through a torn write.
        let copies = text.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty && !$0.hasPrefix("#") }
        guard copies.count == 2 else {
            throw StorageError("boot backend uboot: \(config) names \(copies.count) environment cop\(copies.count == 1 ? "y" : "ies"), not 2: the backend needs a redundant environment (two lines; mkenvimage -r makes one), so that a write torn by a power cut leaves the old copy")
        }
    }

    // MARK: BootControl

    /// Specs/agent.md A-1b: every owned variable present and valid, or an error.
    public func read() throws(StorageError) -> BootState {
        try Self.decode(try list(), path: configPath)
    }

    public func write(_ state: BootState) throws(StorageError) {
        // The stored generation comes from a file others can write: a higher one is refused, not trusted to a trap.
        if let old = try? read(), state.generation <= old.generation {
            throw StorageError("\(configPath): the environment's generation \(old.generation) is not below the one written (\(state.generation)): refused")
        }
        try set(Self.encode(state), expecting: state)
    }

    /// A fresh device's boot state, when the environment holds none yet. An
    /// environment that is not valid at all is refused, not replaced: U-Boot
    /// would then run on its built-in defaults, and a new environment holding
    /// only these variables would lose its `bootcmd`.
    public func initialize(current: Side) throws(StorageError) {
        if (try? read()) != nil { return }
        do { _ = try list() } catch {
            throw StorageError("\(error.reason): no valid U-Boot environment to keep the boot state in (the agent does not create one; make it with mkenvimage -r)")
        }
        let state = BootState.initial(current: current)
        try set(Self.encode(state), expecting: state)
    }

    // MARK: The mapping (Specs/agent.md §3.4)

    /// The variables (Specs/agent.md §3.4 table).
    static let variables = BootVariables(order: "BOOT_ORDER", sidePrefix: "BOOT_", leftRadix: 16)

    public static func encode(_ s: BootState) -> [String: String] { variables.encode(s) }

    /// Only the trial boots left, as the bootloader saves a spent attempt (the crash explorer's model of it).
    public static func encodeAttempts(_ s: BootState) -> [String: String] {
        variables.encode(s).filter { key, _ in Side.allCases.contains { variables.left($0) == key } }
    }

    public static func decode(_ vars: [String: String], path: String) throws(StorageError) -> BootState {
        try variables.decode(vars, path: path)
    }

    // MARK: The tools

    /// `fw_printenv -c CONFIG`, parsed. Fails (exit 243, "Cannot read environment")
    /// when neither copy is valid.
    private func list() throws(StorageError) -> [String: String] {
        BootTool.variables(try printenv.run(["-c", configPath], what: "-c \(configPath)"))
    }

    /// A-3b: one `fw_setenv -s` of every variable, then read back.
    private func set(_ vars: [String: String], expecting state: BootState) throws(StorageError) {
        let script = vars.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)\n" }.joined()
        _ = try setenv.run(["-c", configPath, "-s", "/dev/stdin"], input: Array(script.utf8), what: "-c \(configPath) -s")
        let back: BootState
        do { back = try read() } catch {
            throw StorageError("fw_setenv exited 0, but the environment read back holds no valid boot state: \(error.reason)")
        }
        guard back == state else {
            throw StorageError("fw_setenv exited 0, but the environment read back holds \(back), not \(state)")
        }
    }
}

/// One copy of a U-Boot environment as U-Boot and libubootenv lay it out: a
/// CRC-32 (little-endian) over the data, a flag byte when the environment is
/// redundant (the copy with the higher one, modulo 256, is current), then
/// `NAME=VALUE` strings each ended by a NUL, an empty string, and padding to
/// the copy's size. The crash explorer writes and tears real copies with it
/// (Specs/agent.md §3.4); the tests check it against the real tools.
public enum UBootEnvImage {
    /// The copy for `vars` (sorted by name), or nil when they do not fit.
    public static func encode(_ vars: [String: String], flag: UInt8?, size: Int) -> [UInt8]? {
        var data: [UInt8] = []
        for (k, v) in vars.sorted(by: { $0.key < $1.key }) { data += Array("\(k)=\(v)".utf8) + [0] }
        data.append(0)
        let header = flag == nil ? 4 : 5
        guard data.count <= size - header else { return nil }
        data += [UInt8](repeating: 0xFF, count: size - header - data.count)
        let crc = crc(data)
        return [UInt8(crc & 0xFF), UInt8(crc >> 8 & 0xFF), UInt8(crc >> 16 & 0xFF), UInt8(crc >> 24)] + (flag.map { [$0] } ?? []) + data
    }

    /// A copy's flag and variables, or nil when its CRC fails or its strings do not parse.
    public static func decode(_ copy: [UInt8], redundant: Bool) -> (flag: UInt8?, vars: [String: String])? {
        let header = redundant ? 5 : 4
        guard copy.count > header + 1 else { return nil }
        let data = copy[header...]
        let stored = UInt32(copy[0]) | UInt32(copy[1]) << 8 | UInt32(copy[2]) << 16 | UInt32(copy[3]) << 24
        guard stored == crc(data) else { return nil }
        var vars: [String: String] = [:]
        var i = data.startIndex
        while i < data.endIndex, data[i] != 0 {
            guard let end = data[i...].firstIndex(of: 0), let eq = data[i..<end].firstIndex(of: UInt8(ascii: "=")) else { return nil }
            vars[String(decoding: data[i..<eq], as: UTF8.self)] = String(decoding: data[(eq + 1)..<end], as: UTF8.self)
            i = end + 1
        }
        guard i < data.endIndex else { return nil }
        return (redundant ? copy[4] : nil, vars)
    }

    /// Which of two redundant copies is the environment (libubootenv's and U-Boot's
    /// rule): the only valid one, or of two valid ones the one whose flag is one
    /// ahead modulo 256 (255 then 0), else the higher; nil when neither is valid.
    public static func current(_ flags: (UInt8?, UInt8?)) -> Int? {
        switch flags {
        case (nil, nil): return nil
        case (.some, nil): return 0
        case (nil, .some): return 1
        case let (.some(f0), .some(f1)):
            if f0 == 0xFF && f1 == 0 { return 1 }
            if f1 == 0xFF && f0 == 0 { return 0 }
            return f1 > f0 ? 1 : 0
        }
    }

    static func crc(_ bytes: ArraySlice<UInt8>) -> UInt32 {
        bytes.withUnsafeBufferPointer { UInt32(crc32(0, $0.baseAddress, uInt($0.count))) }
    }
    static func crc(_ bytes: [UInt8]) -> UInt32 { crc(bytes[...]) }
}
