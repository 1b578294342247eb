import DeliveryCore
import DeviceAgent
import DeviceBackends
import FleetCrypto
import Foundation
import UpdateBundle

/// `fleetcast agent`'s configuration file (Specs/agent.md §7): JSON, every field
/// checked by name and type; an unknown field, a missing one or a wrong type is
/// refused with the field's path. Relative paths are taken from the file's
/// directory.
struct AgentConfig {
    struct HealthCheck {
        var command: [String]
        var timeout: Double
        /// The check must keep passing (re-run every second) this long after its first pass.
        var healthyFor: Double
    }

    var product: String?
    var hardware: String?
    var shipped: Release
    var trustedKeys: [String]
    var threshold: Int
    var deviceKeys: [String]
    var groupKeys: [String]
    var group: String
    var port: UInt16
    var interface: String?
    var stateDirectory: String
    var stagingDirectory: String
    var slots: [String: SlotPair]
    var bootDirectory: String
    /// Specs/agent.md §3: where the boot state lives and in which form.
    enum BootBackend: Equatable {
        case statefile
        /// A GRUB environment block (§3.3), and the grub-editenv to write it with.
        case grub(env: String, tool: String)
        /// A redundant U-Boot environment (§3.4) named by its fw_env.config, and libubootenv's tools.
        case uboot(config: String, printenv: String, setenv: String)
    }
    var bootBackend: BootBackend
    /// Where the booted side is read from: a `fleetcast.side=a|b` word (the kernel command line).
    var bootedFrom: String
    var healthCheck: HealthCheck?
    /// `"activation": "live"` (Specs/agent.md §9): the service's two sides and how to run them; nil: activation by reboot.
    var live: LiveActivation.Settings?
    var trialAttempts: UInt8
    var trigger: AgentSettings.Trigger
    var installPath: AgentSettings.InstallPath
    /// Specs/protocol.md P-29c: how a compressed or encrypted payload is staged.
    var stagingWindow: UpdateReceiver.StagingWindow
    /// Specs/protocol.md P-31a: whether unauthenticated sessions are taken.
    var sessionAuth: SessionAuthentication
    var rebootCommand: [String]
    /// The tests' and the demo's reboot: the agent exits with `AgentExit.simulatedReboot`.
    var simulatedReboot: Bool
    var hooks: [AgentHook: [String]]

    /// The documented example (`fleetcast agent --help`, README).
    static let example = """
    {
      "device": { "product": "demo-gateway", "hardware": "board-7" },
      "shipped": { "version": "1.0", "sequence": 1 },
      "trust": { "keys": ["vendor.pub"], "threshold": 1 },
      "keys": { "device": ["device.key"], "group": [] },
      "network": { "group": "239.192.0.42", "port": 4711, "interface": "eth1" },
      "state-dir": "/var/lib/fleetcast/state",
      "staging-dir": "/var/lib/fleetcast/staging",
      "slots": { "rootfs": { "a": "/dev/disk/by-partlabel/rootfs_a", "b": "/dev/disk/by-partlabel/rootfs_b" } },
      "boot": { "backend": "statefile", "directory": "/boot/fleetcast", "booted-from": "/proc/cmdline" },
      "health-check": { "command": ["/usr/lib/fleetcast/healthy"], "timeout": 60, "healthy-for": 0 },
      "trial-attempts": 3,
      "trigger": "automatic",
      "install": "stream",
      "staging-window": "auto",
      "session-auth": "required",
      "activation": "reboot",
      "reboot-command": ["systemctl", "reboot"],
      "hooks": { "pre-install": [], "post-install": [], "activation": [] }
    }
    """

    static func load(_ path: String) throws(ConfigError) -> AgentConfig {
        guard let data = FileManager.default.contents(atPath: path) else { throw ConfigError(path, "cannot read the file", exit: AgentExit.noInput) }
        guard data.count <= Self.byteCountMax else { throw ConfigError(path, "larger than \(Self.byteCountMax) bytes: not a configuration") }
        let object: JSONValue
        do { object = try JSONDecoder().decode(JSONValue.self, from: data) } catch {
            throw ConfigError(path, "not valid JSON: \(Self.describe(error))")
        }
        let base = URL(fileURLWithPath: path).deletingLastPathComponent().path
        var root = try Fields(object, at: "", file: path)
        return try AgentConfig(&root, base: base)
    }

    private static func describe(_ error: Error) -> String {
        if case DecodingError.dataCorrupted(let c) = error { return (c.underlyingError.map { "\($0)" }) ?? c.debugDescription }
        return "\(error)"
    }

    /// Named limit: a configuration is small.
    static let byteCountMax = 1 << 20

    private init(_ root: inout Fields, base: String) throws(ConfigError) {
        func resolve(_ p: String) -> String { p.hasPrefix("/") ? p : base + "/" + p }
        var device = try root.object("device", required: false)
        product = try device?.string("product", required: false)
        hardware = try device?.string("hardware", required: false)
        try device?.finish()

        var shippedFields = try root.object("shipped")!
        shipped = Release(bundleID: [], version: try shippedFields.string("version")!, sequence: try shippedFields.unsigned("sequence")!)
        try shippedFields.finish()

        var trust = try root.object("trust")!
        trustedKeys = try trust.strings("keys")!.map(resolve)
        guard !trustedKeys.isEmpty else { throw ConfigError(root.file, "trust.keys: at least one trusted key") }
        threshold = Int(try trust.unsigned("threshold", required: false, range: 1...16) ?? 1)
        try trust.finish()

        var keys = try root.object("keys", required: false)
        deviceKeys = try keys?.strings("device", required: false)?.map(resolve) ?? []
        groupKeys = try keys?.strings("group", required: false)?.map(resolve) ?? []
        try keys?.finish()

        var network = try root.object("network")!
        group = try network.string("group")!
        port = UInt16(try network.unsigned("port", required: false, range: 1...65535) ?? 4711)
        interface = try network.string("interface", required: false)
        try network.finish()

        stateDirectory = resolve(try root.string("state-dir")!)
        stagingDirectory = resolve(try root.string("staging-dir")!)

        var slotFields = try root.object("slots")!
        var slots: [String: SlotPair] = [:]
        for target in slotFields.keys {
            var pair = try slotFields.object(target)!
            slots[target] = SlotPair(a: resolve(try pair.string("a")!), b: resolve(try pair.string("b")!))
            try pair.finish()
        }
        guard !slots.isEmpty else { throw ConfigError(root.file, "slots: at least one install target with its a and b slots") }
        self.slots = slots
        try slotFields.finish()

        var boot = try root.object("boot")!
        let backend = try boot.string("backend", required: false) ?? "statefile"
        bootDirectory = resolve(try boot.string("directory")!)
        switch backend {
        case "statefile": bootBackend = .statefile
        case "grub":
            bootBackend = .grub(env: resolve(try boot.string("grubenv", required: false) ?? "grubenv".prefixed(by: bootDirectory)),
                                tool: try boot.string("tool", required: false) ?? "/usr/bin/grub-editenv")
        case "uboot":
            bootBackend = .uboot(config: resolve(try boot.string("fw-env-config", required: false) ?? "fw_env.config".prefixed(by: bootDirectory)),
                                 printenv: try boot.string("printenv", required: false) ?? "/usr/bin/fw_printenv",
                                 setenv: try boot.string("setenv", required: false) ?? "/usr/bin/fw_setenv")
        default:
            throw ConfigError(root.file, "boot.backend: '\(backend)' is not one of 'statefile', 'grub', 'uboot'")
        }
        bootedFrom = resolve(try boot.string("booted-from", required: false) ?? "/proc/cmdline")
        try boot.finish()

        if var health = try root.object("health-check", required: false) {
            let command = try health.strings("command")!
            guard !command.isEmpty else { throw ConfigError(root.file, "health-check.command: a command and its arguments") }
            healthCheck = HealthCheck(command: command, timeout: try health.seconds("timeout", required: false) ?? 60,
                                      healthyFor: try health.seconds("healthy-for", required: false) ?? 0)
            try health.finish()
        }
        trialAttempts = UInt8(try root.unsigned("trial-attempts", required: false, range: 1...10) ?? 3)
        trigger = try root.choice("trigger", AgentSettings.Trigger.self) ?? .automatic
        installPath = try root.choice("install", AgentSettings.InstallPath.self) ?? .stream
        let window = try root.string("staging-window", required: false) ?? "auto"
        guard let w = parseStagingWindow(window) else {
            throw ConfigError(root.file, "staging-window: '\(window)' is not 'auto', 'whole' or a size of at least 1M (such as 64M)")
        }
        stagingWindow = w
        sessionAuth = try root.choice("session-auth", SessionAuthentication.self) ?? .optional
        switch try root.string("activation", required: false) ?? "reboot" {
        case "reboot":
            live = nil
        case "live":
            guard var fields = try root.object("live", required: false) else {
                throw ConfigError(root.file, "live: missing (activation live needs the service's root and command)")
            }
            var settings = LiveActivation.Settings(root: resolve(try fields.string("root")!), command: try fields.strings("command")!)
            guard !settings.command.isEmpty else { throw ConfigError(root.file, "live.command: a command and its arguments") }
            if let listen = try fields.string("listen", required: false) {
                let parts = listen.split(separator: ":")
                guard parts.count == 2, let port = UInt16(parts[1]), port > 0 else {
                    throw ConfigError(root.file, "live.listen: '\(listen)' is not HOST:PORT (an IPv4 address and a port)")
                }
                settings.listen = (String(parts[0]), port)
            }
            settings.ready = try fields.choice("ready", LiveActivation.Settings.Ready.self) ?? .notify
            settings.readySeconds = try fields.seconds("ready-timeout", required: false) ?? 10
            settings.stopSeconds = try fields.seconds("stop-timeout", required: false) ?? 10
            for (key, value) in [("ready-timeout", settings.readySeconds), ("stop-timeout", settings.stopSeconds)]
            where !(0.1...LiveActivation.timeoutSecondsMax).contains(value) {
                throw ConfigError(root.file, "live.\(key): \(value) s is outside 0.1...\(Int(LiveActivation.timeoutSecondsMax)) s")
            }
            try fields.finish()
            live = settings
        case let other:
            throw ConfigError(root.file, "activation: '\(other)' is not one of 'reboot', 'live'")
        }
        rebootCommand = try root.strings("reboot-command", required: false) ?? ["systemctl", "reboot"]
        guard !rebootCommand.isEmpty else { throw ConfigError(root.file, "reboot-command: a command and its arguments") }
        simulatedReboot = try root.bool("simulated-reboot", required: false) ?? false
        var hooks: [AgentHook: [String]] = [:]
        if var hookFields = try root.object("hooks", required: false) {
            for hook in AgentHook.allCases {
                if let command = try hookFields.strings(hook.rawValue, required: false), !command.isEmpty { hooks[hook] = command }
            }
            try hookFields.finish()
        }
        self.hooks = hooks
        try root.finish()
    }

    /// The device's identity and keys; a key file that is missing or not a key is named.
    func identity(deviceID: String) throws(ConfigError) -> DeviceIdentity {
        do {
            let trust = TrustPolicy(trustedKeys: try trustedKeys.map(loadKeyFile(loadPublicKey)), threshold: threshold)
            let keys = DecryptionKeys(deviceKeys: try deviceKeys.map(loadKeyFile(loadPrivateKey)), groupKeys: try groupKeys.map(loadKeyFile(loadGroupKey)))
            return DeviceIdentity(deviceID: deviceID, productID: product, hardwareID: hardware, trust: trust, keys: keys)
        } catch let e as ConfigError { throw e } catch { throw ConfigError("keys", "\(error)", exit: AgentExit.noInput) }
    }

    private func loadKeyFile<K>(_ load: @escaping (String) throws -> K) -> (String) throws -> K {
        { path in
            guard FileManager.default.fileExists(atPath: path) else { throw ConfigError(path, "key file missing", exit: AgentExit.noInput) }
            do { return try load(path) } catch let e as BundleError { throw ConfigError(path, e.reason, exit: AgentExit.noInput) }
        }
    }
}

/// Specs/protocol.md P-29c: "auto" (whole where staging has room, else a window of
/// that room), "whole", or a window such as "64M" (decimal multiples, at least 1M).
func parseStagingWindow(_ text: String) -> UpdateReceiver.StagingWindow? {
    switch text {
    case "auto": return .automatic
    case "whole": return .whole
    default: return parseByteCount(text).flatMap { $0 >= 1_000_000 ? .bytes(UInt64($0)) : nil }
    }
}

private extension String {
    /// `dir/self`.
    func prefixed(by dir: String) -> String { dir + "/" + self }
}

/// Exit statuses of `fleetcast agent` (sysexits where one fits).
enum AgentExit {
    /// The configuration is not valid (a field unknown, missing or of the wrong type).
    static let config: Int32 = 64
    /// A file the configuration names is missing (a key file).
    static let noInput: Int32 = 66
    /// The agent is not running (`status` falls back to the files; the others need it).
    static let notRunning: Int32 = 69
    /// The running agent refused the request (`install` with nothing ready).
    static let refused: Int32 = 65
    /// `simulated-reboot`: the agent stopped for the harness to "reboot" it.
    static let simulatedReboot: Int32 = 75
    /// The record or the boot state could not be read or written.
    static let storage: Int32 = 20
}

struct ConfigError: Error, CustomStringConvertible {
    let place: String
    let reason: String
    let exit: Int32
    init(_ place: String, _ reason: String, exit: Int32 = AgentExit.config) { self.place = place; self.reason = reason; self.exit = exit }
    var description: String { "\(place): \(reason)" }
}

/// A JSON value as parsed, typed: booleans, numbers and strings stay apart.
enum JSONValue: Decodable {
    case bool(Bool), number(Double), string(String), list([JSONValue]), object([String: JSONValue]), null

    init(from decoder: Decoder) throws {
        let c = try decoder.singleValueContainer()
        if c.decodeNil() { self = .null }
        else if let b = try? c.decode(Bool.self) { self = .bool(b) }
        else if let n = try? c.decode(Double.self) { self = .number(n) }
        else if let s = try? c.decode(String.self) { self = .string(s) }
        else if let l = try? c.decode([JSONValue].self) { self = .list(l) }
        else { self = .object(try c.decode([String: JSONValue].self)) }
    }

    var kind: String {
        switch self {
        case .bool: "a boolean"
        case .number: "a number"
        case .string: "a string"
        case .list: "a list"
        case .object: "an object"
        case .null: "null"
        }
    }
}

/// One JSON object of the configuration, read field by field; `finish()` refuses
/// whatever field was not read.
struct Fields {
    let file: String
    let path: String
    private let dict: [String: JSONValue]
    private var read: Set<String> = []

    init(_ value: JSONValue, at path: String, file: String) throws(ConfigError) {
        guard case .object(let dict) = value else { throw ConfigError(file, "\(path.isEmpty ? "the file" : path): expected an object, got \(value.kind)") }
        self.dict = dict; self.path = path; self.file = file
    }

    var keys: [String] { dict.keys.sorted() }

    private func name(_ key: String) -> String { path.isEmpty ? key : "\(path).\(key)" }

    private mutating func value(_ key: String, required: Bool) throws(ConfigError) -> JSONValue? {
        read.insert(key)
        guard let v = dict[key] else {
            if required { throw ConfigError(file, "\(name(key)): missing") }
            return nil
        }
        if case .null = v { throw ConfigError(file, "\(name(key)): null; leave the field out instead") }
        return v
    }

    private func wrongType(_ key: String, _ expected: String, _ v: JSONValue) -> ConfigError {
        ConfigError(file, "\(name(key)): expected \(expected), got \(v.kind)")
    }

    mutating func object(_ key: String, required: Bool = true) throws(ConfigError) -> Fields? {
        guard let v = try value(key, required: required) else { return nil }
        guard case .object = v else { throw wrongType(key, "an object", v) }
        return try Fields(v, at: name(key), file: file)
    }

    mutating func string(_ key: String, required: Bool = true) throws(ConfigError) -> String? {
        guard let v = try value(key, required: required) else { return nil }
        guard case .string(let s) = v else { throw wrongType(key, "a string", v) }
        guard !s.isEmpty, s.utf8.count <= Self.stringByteCountMax else {
            throw ConfigError(file, "\(name(key)): expected a non-empty string of at most \(Self.stringByteCountMax) bytes")
        }
        return s
    }

    /// Named limits on a configuration's strings and lists.
    static let stringByteCountMax = 4096
    static let listCountMax = 64

    mutating func strings(_ key: String, required: Bool = true) throws(ConfigError) -> [String]? {
        guard let v = try value(key, required: required) else { return nil }
        guard case .list(let list) = v, list.count <= Self.listCountMax else { throw wrongType(key, "a list of at most \(Self.listCountMax) strings", v) }
        return try list.enumerated().map { (i, item) throws(ConfigError) in
            guard case .string(let s) = item, !s.isEmpty, s.utf8.count <= Self.stringByteCountMax else {
                throw ConfigError(file, "\(name(key))[\(i)]: expected a non-empty string, got \(item.kind)")
            }
            return s
        }
    }

    mutating func unsigned(_ key: String, required: Bool = true, range: ClosedRange<UInt64> = 0...UInt64.max) throws(ConfigError) -> UInt64? {
        guard let v = try value(key, required: required) else { return nil }
        guard case .number(let n) = v, n >= 0, n == n.rounded(), let u = UInt64(exactly: n) else { throw wrongType(key, "a whole number", v) }
        guard range.contains(u) else { throw ConfigError(file, "\(name(key)): \(u) is outside \(range.lowerBound)...\(range.upperBound)") }
        return u
    }

    mutating func seconds(_ key: String, required: Bool = true) throws(ConfigError) -> Double? {
        guard let v = try value(key, required: required) else { return nil }
        guard case .number(let n) = v, n >= 0, n <= 86_400 else { throw wrongType(key, "seconds (0 to 86400)", v) }
        return n
    }

    mutating func bool(_ key: String, required: Bool = true) throws(ConfigError) -> Bool? {
        guard let v = try value(key, required: required) else { return nil }
        guard case .bool(let b) = v else { throw wrongType(key, "true or false", v) }
        return b
    }

    mutating func choice<T: RawRepresentable & CaseIterable>(_ key: String, _: T.Type) throws(ConfigError) -> T? where T.RawValue == String {
        guard let s = try string(key, required: false) else { return nil }
        guard let c = T(rawValue: s) else {
            throw ConfigError(file, "\(name(key)): '\(s)' is not one of \(T.allCases.map { "'\($0.rawValue)'" }.joined(separator: ", "))")
        }
        return c
    }

    /// Refuses any field not read: a misspelt field is an error, not a default.
    func finish() throws(ConfigError) {
        if let unknown = dict.keys.sorted().first(where: { !read.contains($0) }) {
            throw ConfigError(file, "\(name(unknown)): unknown field")
        }
    }
}
