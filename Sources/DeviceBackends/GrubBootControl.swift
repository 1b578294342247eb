import DeviceAgent
import Foundation

/// The `grub` boot-control backend (Specs/agent.md §3.3): the boot state kept in
/// a GRUB environment block (`grubenv`) under RAUC's variable names, read and
/// written with Debian's `grub-editenv`, and consumed at power-on by the
/// fragment shipped in `contrib/grub/fleetcast.cfg`.
///
/// `grub-editenv` rewrites its file in place (open with O_TRUNC, one 1024-byte
/// write, fsync): a power cut inside it can leave an empty or torn block. So a
/// write never runs it on the live file: it builds `grubenv.new` with the tool
/// (`create`, then one `set` of every variable), which fsyncs it, renames it
/// over `grubenv` and fsyncs the directory (A-3a). A crash at any point leaves
/// the old block or the new one.
public final class GrubBootControl: BootControl {
    /// The grubenv file (GRUB reads it with `load_env --file`).
    public let envPath: String
    public let tool: String
    private let runner: BootTool
    private let directory: String
    private let name: String

    /// Variables this backend owns; any other is kept as it is.
    public static var owned: [String] { variables.owned }

    public init(envPath: String, tool: String = "/usr/bin/grub-editenv") throws(StorageError) {
        let url = URL(fileURLWithPath: envPath)
        self.envPath = envPath
        self.tool = tool
        directory = url.deletingLastPathComponent().path
        name = url.lastPathComponent
        runner = try BootTool(path: tool, backend: "grub", package: "grub-common")
    }

    // MARK: BootControl

    /// Specs/agent.md A-1a: every owned variable present and valid, or an error.
    public func read() throws(StorageError) -> BootState {
        let vars = try list()
        return try Self.decode(vars, path: envPath)
    }

    public func write(_ state: BootState) throws(StorageError) {
        // Others' variables (GRUB's own `saved_entry`, a vendor's) are carried over.
        let current = (try? list()) ?? [:]
        // The stored generation comes from a file others can write: a higher one is refused, not trusted to a trap.
        if let old = try? Self.decode(current, path: envPath), state.generation <= old.generation {
            throw StorageError("\(envPath): the block's generation \(old.generation) is not below the one written (\(state.generation)): refused")
        }
        var vars = current.filter { !Self.owned.contains($0.key) }
        for (k, v) in Self.encode(state) { vars[k] = v }
        try replace(with: vars)
    }

    /// A fresh device's boot state, when the block holds none yet.
    public func initialize(current: Side) throws(StorageError) {
        if (try? read()) != nil { return }
        var vars = ((try? list()) ?? [:]).filter { !Self.owned.contains($0.key) }
        for (k, v) in Self.encode(BootState.initial(current: current)) { vars[k] = v }
        try replace(with: vars)
    }

    // MARK: The mapping (Specs/agent.md §3.3)

    /// The variables (Specs/agent.md §3.3 table).
    static let variables = BootVariables(order: "ORDER", sidePrefix: "", leftRadix: 10)

    public static func encode(_ s: BootState) -> [String: String] { variables.encode(s) }

    /// Only the trial boots left, as the bootloader saves a spent attempt (the crash explorer's model of it).
    public static func encodeAttempts(_ s: BootState) -> [String: String] {
        variables.encode(s).filter { key, _ in Side.allCases.contains { variables.left($0) == key } }
    }

    public static func decode(_ vars: [String: String], path: String) throws(StorageError) -> BootState {
        try variables.decode(vars, path: path)
    }

    // MARK: The tool

    /// `grub-editenv FILE list`, parsed: NAME=VALUE per line.
    private func list() throws(StorageError) -> [String: String] {
        guard let size = (try? FileManager.default.attributesOfItem(atPath: envPath))?[.size] as? Int else {
            throw StorageError("\(envPath): no GRUB environment block")
        }
        // grub-editenv lists a short file as it is, but GRUB's save_env writes in place and
        // cannot grow it: only a whole block is one (A-1a).
        guard size == GrubEnvBlock.byteCount else {
            throw StorageError("\(envPath) is \(size) bytes, not a \(GrubEnvBlock.byteCount)-byte GRUB environment block: no valid boot state")
        }
        return BootTool.variables(try run(["list"], on: envPath))
    }

    /// A-3a: the new block built beside the old with the tool, then renamed over it.
    private func replace(with vars: [String: String]) throws(StorageError) {
        let temporary = directory + "/" + name + ".new"
        unlink(temporary)
        _ = try run(["create"], on: temporary)
        // One `set` with every variable: the block is written (and fsynced) once.
        _ = try run(["set"] + vars.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }, on: temporary)
        guard rename(temporary, envPath) == 0 else {
            let reason = String(cString: strerror(errno))
            unlink(temporary)
            throw StorageError("rename \(temporary) over \(envPath): \(reason)")
        }
        let fd = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw StorageError("open \(directory): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        guard fsync(fd) == 0 else { throw StorageError("fsync \(directory): \(String(cString: strerror(errno)))") }
    }

    private func run(_ arguments: [String], on file: String) throws(StorageError) -> String {
        try runner.run([file] + arguments, what: "\(arguments.first ?? "") \(file)")
    }
}

/// A GRUB environment block as GRUB and grub-editenv lay it out: exactly 1024
/// bytes, the header line, `NAME=VALUE` lines, then `#` to the end. The crash
/// explorer writes and tears real blocks with it (Specs/agent.md §3.3).
public enum GrubEnvBlock {
    public static let byteCount = 1024
    static let header = Array("# GRUB Environment Block\n".utf8)

    /// The block for `vars` (sorted by name), or nil when they do not fit.
    public static func encode(_ vars: [String: String]) -> [UInt8]? {
        var out = header
        for (k, v) in vars.sorted(by: { $0.key < $1.key }) { out += Array("\(k)=\(v)\n".utf8) }
        guard out.count <= byteCount else { return nil }
        return out + [UInt8](repeating: UInt8(ascii: "#"), count: byteCount - out.count)
    }

    /// The variables of a block, or nil when it is not one (size, header, a line without `=`).
    public static func decode(_ bytes: [UInt8]) -> [String: String]? {
        guard bytes.count == byteCount, bytes.starts(with: header) else { return nil }
        var vars: [String: String] = [:]
        for line in bytes[header.count...].split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false) {
            guard let first = line.first, first != UInt8(ascii: "#") else { break }
            guard let eq = line.firstIndex(of: UInt8(ascii: "=")) else { return nil }
            vars[String(decoding: line[line.startIndex..<eq], as: UTF8.self)] = String(decoding: line[(eq + 1)...], as: UTF8.self)
        }
        return vars
    }
}
