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
    private let directory: String
    private let name: String

    /// Named limit: the tool gets this long per call; one that hangs is killed
    /// and the write fails, the old block stays.
    public static let toolSecondsMax = 30.0
    /// Named limit: what the tool may print (`list` of a 1024-byte block is less).
    public static let toolOutputByteCountMax = 64 << 10
    /// Variables this backend owns; any other in the block is kept as it is.
    public static let owned = ["ORDER", "A_OK", "A_TRY", "A_LEFT", "B_OK", "B_TRY", "B_LEFT", "FLEETCAST_GENERATION"]

    public init(envPath: String, tool: String = "/usr/bin/grub-editenv") throws(StorageError) {
        let url = URL(fileURLWithPath: envPath)
        self.envPath = envPath
        self.tool = tool
        directory = url.deletingLastPathComponent().path
        name = url.lastPathComponent
        guard FileManager.default.isExecutableFile(atPath: tool) else {
            throw StorageError("boot backend grub: \(tool) is missing or not executable (Debian: apt-get install grub-common)")
        }
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
        if let old = try? Self.decode(current, path: envPath) {
            precondition(state.generation > old.generation, "a boot state is written with a higher generation (\(state.generation) after \(old.generation))")
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

    /// `<S>_OK` bootable, `<S>_TRY` on trial (not confirmed), `<S>_LEFT` trial boots left,
    /// `ORDER`, and the generation. Exactly invertible by `decode`.
    public static func encode(_ s: BootState) -> [String: String] {
        var vars = ["ORDER": s.order.map(\.description).joined(separator: " "), "FLEETCAST_GENERATION": String(s.generation)]
        for side in Side.allCases {
            let x = s[side]
            vars["\(side)_OK"] = x.bootable ? "1" : "0"
            vars["\(side)_TRY"] = x.confirmed ? "0" : "1"
            vars["\(side)_LEFT"] = String(x.attempts)
        }
        return vars
    }

    /// Named limit: trial boots a block may say are left (the agent's `trial-attempts` range).
    static let attemptsMax: UInt8 = 10

    public static func decode(_ vars: [String: String], path: String) throws(StorageError) -> BootState {
        func flag(_ key: String) throws(StorageError) -> Bool {
            switch vars[key] {
            case "1": return true
            case "0": return false
            case let v: throw StorageError("\(path): \(key) is \(v.map { "'\($0)'" } ?? "missing"), not 0 or 1: no valid boot state")
            }
        }
        guard let orderText = vars["ORDER"] else { throw StorageError("\(path): ORDER is missing: no valid boot state") }
        let order = orderText.split(separator: " ").compactMap { Side(name: String($0)) }
        guard order.count == 2, Set(order).count == 2, orderText.split(separator: " ").count == 2 else {
            throw StorageError("\(path): ORDER is '\(orderText)', not 'A B' or 'B A': no valid boot state")
        }
        guard let g = vars["FLEETCAST_GENERATION"].flatMap({ UInt64($0) }), g >= 1 else {
            throw StorageError("\(path): FLEETCAST_GENERATION is \(vars["FLEETCAST_GENERATION"].map { "'\($0)'" } ?? "missing"): no valid boot state")
        }
        var sides: [BootState.SideState] = []
        for side in Side.allCases {
            let key = "\(side)_LEFT"
            guard let left = vars[key].flatMap({ UInt8($0) }), left <= attemptsMax else {
                throw StorageError("\(path): \(key) is \(vars[key].map { "'\($0)'" } ?? "missing"), not 0 to \(attemptsMax): no valid boot state")
            }
            sides.append(.init(bootable: try flag("\(side)_OK"), confirmed: !(try flag("\(side)_TRY")), attempts: left))
        }
        return BootState(generation: g, order: order, a: sides[0], b: sides[1])
    }

    // MARK: The tool

    /// `grub-editenv FILE list`, parsed: NAME=VALUE per line.
    private func list() throws(StorageError) -> [String: String] {
        guard FileManager.default.fileExists(atPath: envPath) else { throw StorageError("\(envPath): no GRUB environment block") }
        let r = try run(["list"], on: envPath)
        var vars: [String: String] = [:]
        for line in r.split(separator: "\n") {
            guard let eq = line.firstIndex(of: "=") else { continue }
            vars[String(line[..<eq])] = String(line[line.index(after: eq)...])
        }
        return vars
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

    /// Runs the tool on `file`, bounded in time and output; its stdout, or an error
    /// that names the tool, its status and what it said.
    private func run(_ arguments: [String], on file: String) throws(StorageError) -> String {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: tool)
        p.arguments = [file] + arguments
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        let done = DispatchSemaphore(value: 0)
        p.terminationHandler = { _ in done.signal() }
        do { try p.run() } catch { throw StorageError("\(tool): \(error.localizedDescription)") }
        // Both pipes read while it runs (a full pipe would block it), at most the named
        // limit each, off this thread, so that the time limit holds whatever it does.
        let reads = DispatchGroup()
        nonisolated(unsafe) var output = Data(), errors = Data()
        DispatchQueue.global().async(group: reads) { output = out.fileHandleForReading.readData(ofLength: Self.toolOutputByteCountMax) }
        DispatchQueue.global().async(group: reads) { errors = err.fileHandleForReading.readData(ofLength: Self.toolOutputByteCountMax) }
        if done.wait(timeout: .now() + Self.toolSecondsMax) == .timedOut {
            kill(p.processIdentifier, SIGKILL)
            _ = done.wait(timeout: .now() + 5)
            throw StorageError("\(tool) \(arguments.first ?? "") \(file): no answer within \(Int(Self.toolSecondsMax)) s; killed")
        }
        // It exited; a child of it that kept the pipes open would hold the readers: the
        // output is used only once both have finished.
        guard reads.wait(timeout: .now() + 5) == .success else {
            throw StorageError("\(tool) \(arguments.first ?? "") \(file): exited, but its output did not end (a process it left holds it)")
        }
        guard p.terminationStatus == 0 else {
            let said = String(decoding: errors, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
            throw StorageError("\(tool) \(arguments.first ?? "") \(file) exited \(p.terminationStatus)\(said.isEmpty ? "" : ": \(said)")")
        }
        return String(decoding: output, as: UTF8.self)
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
