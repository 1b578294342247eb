import ArgumentParser
import FleetCrypto
import Foundation
import Logging
import UpdateBundle

enum ProcessEnvironment {
    static var verbose: Bool { CommandLine.arguments.contains("--verbose") || ProcessInfo.processInfo.environment["FLEETCAST_VERBOSE"] != nil }
}

let log = Logger(label: "fleetcast")

/// Runs `body`, turning a BundleError into its message and exit status.
func reportingFailures(_ body: () throws -> Void) throws {
    do {
        try body()
    } catch let error as BundleError {
        printError("refused (\(error.code.rawValue)): \(error.reason)")
        throw ExitCode(error.exitCode)
    } catch let error as CryptoError {
        printError("key error: \(error)")
        throw ExitCode(BundleError(.invalidInput, "").exitCode)
    }
}

/// A line on standard output, written at once (print() buffers when output is a
/// file, which scrambles the order against standard error in logs).
func say(_ line: String) {
    FileHandle.standardOutput.write(Data((line + "\n").utf8))
}

func printError(_ message: String) {
    FileHandle.standardError.write(Data("fleetcast: \(message)\n".utf8))
}

func readText(_ path: String, what: String) throws -> String {
    guard let data = FileManager.default.contents(atPath: path) else {
        throw BundleError(.io, "cannot read \(what) '\(path)'")
    }
    return String(decoding: data, as: UTF8.self)
}

func loadPrivateKey(_ path: String) throws -> PrivateKey {
    do { return try PrivateKey(pem: try readText(path, what: "private key")) }
    catch let e as CryptoError { throw BundleError(.invalidInput, "\(path): \(e.reason)") }
}

func loadPublicKey(_ path: String) throws -> PublicKey {
    let text = try readText(path, what: "public key")
    if let key = try? PublicKey(pem: text) { return key }
    // A private key file also names its public key.
    if let key = try? PrivateKey(pem: text) { return key.publicKey }
    throw BundleError(.invalidInput, "\(path): not a PEM public or private key")
}

func loadGroupKey(_ path: String) throws -> GroupKey {
    let text = try readText(path, what: "group key").trimmingCharacters(in: .whitespacesAndNewlines)
    guard let bytes = [UInt8](hex: text) else { throw BundleError(.invalidInput, "\(path): a group key file holds 64 hex digits") }
    return try GroupKey(bytes)
}

/// Writes a file atomically with the given permissions (a temporary beside it,
/// fsync, rename, fsync of the directory), never through a symbolic link, and
/// refusing to replace anything already there (a link included) unless asked.
func writeFile(_ path: String, _ text: String, mode: Int, force: Bool) throws {
    let slash = path.lastIndex(of: "/")
    let directory = slash.map { $0 == path.startIndex ? "/" : String(path[..<$0]) } ?? "."
    let name = slash.map { String(path[path.index(after: $0)...]) } ?? path
    guard !name.isEmpty, name != ".", name != ".." else { throw BundleError(.invalidInput, "'\(path)' names a directory, not a file") }
    let dir = try SafeDirectory(path: directory)
    if !force && dir.exists(name) {
        throw BundleError(.invalidInput, "\(path) exists; use --force to overwrite")
    }
    // Without --force the rename itself refuses a file that appeared meanwhile.
    do { try dir.writeAtomically(Array(text.utf8), to: name, mode: mode_t(mode), temporary: ".\(name).fleetcast-tmp", replacing: force) } catch {
        throw error.code == .invalidInput ? BundleError(.invalidInput, "\(path) exists; use --force to overwrite") : error
    }
}

func currentUnixTime() -> UInt64 { UInt64(time(nil)) }

/// Text that came from a bundle or the network, made safe for a terminal: control
/// characters (C0, DEL, C1, where escape sequences begin) and the bidirectional
/// overrides are printed as `\u{...}`, so that a forged string cannot move the
/// cursor, clear the screen, colour a line or reorder it (issue 15, item 9).
func terminalSafe(_ text: String) -> String {
    var out = String.UnicodeScalarView()
    for u in text.unicodeScalars {
        let v = u.value
        if v < 0x20 || (0x7F...0x9F).contains(v) || (0x202A...0x202E).contains(v) || (0x2066...0x2069).contains(v) {
            out.append(contentsOf: "\\u{\(String(v, radix: 16))}".unicodeScalars)
        } else {
            out.append(u)
        }
    }
    return String(out)
}

/// Named limit: the longest duration an argument may give (100 years), so that
/// no deadline or expiry computed from one can wrap or trap.
let durationSecondsMax: UInt64 = 100 * 31_536_000

/// Parses durations such as 90s, 15m, 12h, 30d, 1y (at most `durationSecondsMax`;
/// nil otherwise, the multiplication checked).
func parseDuration(_ text: String) -> UInt64? {
    let unit = text.last.flatMap { $0.isNumber ? nil : $0 }
    guard let value = UInt64(unit == nil ? text : String(text.dropLast())) else { return nil }
    let scale: UInt64? = switch unit {
    case nil, "s": 1
    case "m": 60
    case "h": 3600
    case "d": 86_400
    case "y": 31_536_000
    default: nil
    }
    guard let scale else { return nil }
    let (seconds, overflow) = value.multipliedReportingOverflow(by: scale)
    return overflow || seconds > durationSecondsMax ? nil : seconds
}

/// Seconds given as a plain number (`--timeout 2.5`): finite, not negative, at most `durationSecondsMax`.
func isSaneSeconds(_ s: Double) -> Bool { s.isFinite && s >= 0 && s <= Double(durationSecondsMax) }

/// A progress line on standard error, redrawn at most every 200 ms.
final class ProgressLine {
    private let label: String
    private let enabled: Bool
    private var last: UInt64 = 0
    private let start = DispatchTime.now().uptimeNanoseconds

    init(_ label: String, enabled: Bool) {
        self.label = label
        self.enabled = enabled
    }

    func update(_ done: UInt64, _ total: UInt64) {
        guard enabled else { return }
        let now = DispatchTime.now().uptimeNanoseconds
        guard now - last > 200_000_000 || done == total else { return }
        last = now
        let seconds = Double(now - start) / 1e9
        let rate = seconds > 0 ? Double(done) / seconds / 1e6 : 0
        let percent = total > 0 ? Double(done) * 100 / Double(total) : 100
        FileHandle.standardError.write(Data(String(format: "\r%@ %5.1f%%  %@ / %@  %.1f MB/s ", label, percent, formatBytes(done), formatBytes(total), rate).utf8))
    }

    func finish() {
        if enabled { FileHandle.standardError.write(Data("\n".utf8)) }
    }
}

func formatBytes(_ n: UInt64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"]
    var value = Double(n)
    var unit = 0
    while value >= 1024 && unit < units.count - 1 { value /= 1024; unit += 1 }
    return unit == 0 ? "\(n) B" : String(format: "%.1f %@", value, units[unit])
}

func formatTime(_ unix: UInt64) -> String {
    let formatter = ISO8601DateFormatter()
    return formatter.string(from: Date(timeIntervalSince1970: TimeInterval(unix)))
}

/// What a device trusts and is: the options `verify` and `receive` share.
struct DeviceOptions: ParsableArguments {
    @Option(name: .customLong("trusted-key"), help: "Trusted signing public key (PEM); repeatable.")
    var trustedKeys: [String]

    @Option(help: "Signatures required (the manifest's own threshold applies too).")
    var threshold: Int = 1

    @Option(name: .customLong("device-key"), help: "This device's decryption private key (PEM); repeatable.")
    var deviceKeys: [String] = []

    @Option(name: .customLong("group-key"), help: "Group key file; repeatable.")
    var groupKeys: [String] = []

    @Option(help: "This device's hardware ID: the manifest must list it.")
    var hardwareID: String?

    @Option(help: "This device's product ID: the manifest must name it.")
    var product: String?

    @Option(help: "Installed anti-rollback sequence: the update's must be larger.")
    var installedSequence: UInt64?

    func trust() throws -> TrustPolicy { TrustPolicy(trustedKeys: try trustedKeys.map(loadPublicKey), threshold: threshold) }
    func policy(now: UInt64) -> DevicePolicy { DevicePolicy(now: now, hardwareID: hardwareID, installedSequence: installedSequence, productID: product) }
    func keys() throws -> DecryptionKeys { DecryptionKeys(deviceKeys: try deviceKeys.map(loadPrivateKey), groupKeys: try groupKeys.map(loadGroupKey)) }
}
