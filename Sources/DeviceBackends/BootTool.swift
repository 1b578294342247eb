import DeviceAgent
import Foundation

/// One bootloader tool (`grub-editenv`, `fw_printenv`, `fw_setenv`) as the boot
/// backends run it: bounded in time and in what it may print, its input given
/// whole, its failure an error that names the tool, its status and what it said
/// (Specs/agent.md §3.3, §3.4). A tool that hangs is killed and the write it was
/// part of fails; the environment it was writing is then whatever the tool left,
/// which each backend's write order makes safe.
struct BootTool {
    let path: String
    /// What the error messages call the backend ("grub", "uboot").
    let backend: String

    /// Named limit: the tool gets this long per call.
    static let secondsMax = 30.0
    /// Named limit: what the tool may print (a `list` of a whole environment is far less).
    static let outputByteCountMax = 64 << 10

    /// Refuses a tool that is not there, with the Debian package that ships it.
    init(path: String, backend: String, package: String) throws(StorageError) {
        guard FileManager.default.isExecutableFile(atPath: path) else {
            throw StorageError("boot backend \(backend): \(path) is missing or not executable (Debian: apt-get install \(package))")
        }
        self.path = path
        self.backend = backend
    }

    /// Runs the tool with `arguments`, `input` on its standard input; its standard
    /// output, or an error. `what` names the call in errors ("list /boot/grubenv").
    func run(_ arguments: [String], input: [UInt8] = [], what: String) throws(StorageError) -> String {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: path)
        p.arguments = arguments
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        let inp = input.isEmpty ? nil : Pipe()
        p.standardInput = inp ?? FileHandle.nullDevice
        // A tool that exits without reading its input would make the write below raise
        // SIGPIPE, which ends a process by default: this one takes EPIPE instead.
        if inp != nil { Self.ignoreBrokenPipes }
        let done = DispatchSemaphore(value: 0)
        p.terminationHandler = { _ in done.signal() }
        do { try p.run() } catch { throw StorageError("\(path): \(error.localizedDescription)") }
        // Input written and both pipes read while it runs (a full pipe would block it), at
        // most the named limit each, off this thread, so that the time limit holds whatever it does.
        let reads = DispatchGroup()
        nonisolated(unsafe) var output = Data(), errors = Data()
        let payload = Data(input)
        if let inp {
            DispatchQueue.global().async {
                try? inp.fileHandleForWriting.write(contentsOf: payload)
                try? inp.fileHandleForWriting.close()
            }
        }
        DispatchQueue.global().async(group: reads) { output = out.fileHandleForReading.readData(ofLength: Self.outputByteCountMax) }
        DispatchQueue.global().async(group: reads) { errors = err.fileHandleForReading.readData(ofLength: Self.outputByteCountMax) }
        if done.wait(timeout: .now() + Self.secondsMax) == .timedOut {
            kill(p.processIdentifier, SIGKILL)
            _ = done.wait(timeout: .now() + 5)
            throw StorageError("\(path) \(what): no answer within \(Int(Self.secondsMax)) s; killed")
        }
        // It exited; a child of it that kept the pipes open would hold the readers: the
        // output is used only once both have finished.
        guard reads.wait(timeout: .now() + 5) == .success else {
            throw StorageError("\(path) \(what): exited, but its output did not end (a process it left holds it)")
        }
        guard p.terminationStatus == 0 else {
            let said = String(decoding: errors, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
                .split(separator: "\n").joined(separator: "; ")
            let ended = p.terminationReason == .uncaughtSignal ? "was killed by signal \(p.terminationStatus)" : "exited \(p.terminationStatus)"
            throw StorageError("\(path) \(what) \(ended)\(said.isEmpty ? "" : ": \(said)")")
        }
        return String(decoding: output, as: UTF8.self)
    }

    private static let ignoreBrokenPipes: Void = { _ = signal(SIGPIPE, SIG_IGN) }()

    /// `NAME=VALUE` lines (what `grub-editenv list` and `fw_printenv` print), parsed.
    static func variables(_ listing: String) -> [String: String] {
        var vars: [String: String] = [:]
        for line in listing.split(separator: "\n") {
            guard let eq = line.firstIndex(of: "=") else { continue }
            vars[String(line[..<eq])] = String(line[line.index(after: eq)...])
        }
        return vars
    }
}
