import ChildProcess
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
        let outcome: ChildProcess.Outcome
        do {
            outcome = try ChildProcess.run(ChildProcess.Options([path] + arguments), input: input, seconds: Self.secondsMax,
                                           outputByteCountMax: Self.outputByteCountMax)
        } catch {
            throw StorageError("\(path): \(error)")
        }
        guard let termination = outcome.termination else {
            throw StorageError("\(path) \(what): no answer within \(Int(Self.secondsMax)) s; killed")
        }
        // It exited; a child of it that kept the pipes open would have cut its output short.
        guard !outcome.outputIncomplete else {
            throw StorageError("\(path) \(what): exited, but its output did not end (a process it left holds it)")
        }
        guard termination.isSuccess else {
            let said = outcome.errorText.trimmingCharacters(in: .whitespacesAndNewlines)
                .split(separator: "\n").joined(separator: "; ")
            throw StorageError("\(path) \(what) \(termination)\(said.isEmpty ? "" : ": \(said)")")
        }
        return outcome.outputText
    }

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
