import AgentSimulation
import ArgumentParser
import DeliveryCore
import DeviceAgent
import DeviceBackends
import FleetCrypto
import Foundation
import Logging
import Transport
import UpdateBundle

/// `fleetcast agent`: the device side, steps 3 and 4 (Specs/agent.md).
struct Agent: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "The device agent: receive, install into the spare A/B side, activate, health-check, confirm or roll back (steps 1-4).",
        discussion: """
        `agent run` is the long-running daemon. It listens for announces and judges each \
        offer against its own durable record (installed release and anti-rollback sequence \
        in --config's state-dir, not flags). An accepted update streams into the spare \
        side's slots as step 2 releases verified bytes; that side is made not bootable \
        before the first byte, and is put on trial only after every slot was read back and \
        hashed against the signed digest. Activation is a reboot with the spare on trial \
        (trial-attempts boots); after it the agent runs the health check: healthy, it \
        confirms the side and only then raises the stored sequence; unhealthy, it makes the \
        side not bootable and reboots back. If the bootloader fell back by itself, the agent \
        notices and reports the rollback. Each outcome goes to the sender it came from.

        The configuration is JSON; every field is checked and an unknown one refused:

        \(AgentConfig.example)

        Relative paths are taken from the configuration file's directory. "trigger": \
        "manual" installs and then waits for `fleetcast agent install`. Without a \
        "health-check", a trial waits for `agent mark-good` or `mark-bad`. "install": \
        "bundle-first" stages and verifies the whole bundle before writing the slots. \
        "boot": {"backend": "grub"} keeps the boot state in a GRUB environment block \
        ("grubenv", default <directory>/grubenv) written with grub-editenv, read at \
        power-on by contrib/grub/fleetcast.cfg (Specs/agent.md §3.3); {"backend": "uboot"} \
        keeps it in a redundant U-Boot environment ("fw-env-config", default \
        <directory>/fw_env.config, naming its two copies) written with one fw_setenv -s \
        per change and read back, read at power-on by contrib/uboot/fleetcast.cmd (§3.4). \
        "activation": "live" switches a critical service without a reboot (Specs/agent.md §9): \
        the sides are the directories "live.root"/a and /b, "current" links the running one; \
        the new version is started with "live.command" beside the old one (handed the \
        "live.listen" socket as fd 3, LISTEN_FDS=1), made current once it says READY=1 \
        (NOTIFY_SOCKET) or still runs after "ready-timeout" ("ready": "running"), then the \
        old one is stopped; if it fails, nothing switched. \
        "staging-window": a compressed or encrypted payload is staged whole where \
        staging has room for it ("auto", the default), else at most as far ahead of the \
        slot writes as the room allows and freed as it is written, so a device without \
        room for the bundle still installs it; a size ("64M") fixes the window, "whole" \
        always stages it whole. "session-auth": "required" takes only sessions whose \
        sender signed a SESSION record with a key the vendor delegated (`fleetcast \
        delegate`; Specs/protocol.md P-31), so that nobody on the LAN can steer the agent \
        with a forged or replayed ANNOUNCE, POLL or CLOSE; "optional" (the default, for \
        keyless lab senders) takes unsigned ones too. A \
        file slot must exist at its full size (truncate -s 512M rootfs.b). Hooks get \
        FLEETCAST_HOOK, FLEETCAST_VERSION, FLEETCAST_SEQUENCE, FLEETCAST_SIDE and \
        FLEETCAST_SLOT_<TARGET>. "simulated-reboot": true makes the agent exit with status \
        75 where it would reboot (tests, the demo): `fleetcast agent boot` then plays the \
        bootloader, and the agent is started again.

        Exit status of `agent run`: 64 configuration invalid; 66 a key file missing or not a \
        key; 20 state or boot state unreadable or unwritable; 33 network; 75 simulated \
        reboot; 130 interrupted.
        """,
        subcommands: [AgentRun.self, AgentStatus.self, AgentInstall.self, AgentMark.self, AgentMarkBad.self, AgentBoot.self, AgentExplore.self]
    )
}

/// Options every `agent` subcommand shares.
struct AgentOptions: ParsableArguments {
    @Option(help: "The agent's configuration file (JSON; see `fleetcast agent --help`).")
    var config: String

    func load() throws -> AgentConfig {
        do { return try AgentConfig.load(config) } catch {
            printError("configuration \(error)")
            throw ExitCode(error.exit)
        }
    }
}

/// The durable state the agent and its tools read: record, boot state, booted side.
struct AgentFiles {
    let state: SafeDirectory
    let bootDirectory: SafeDirectory
    let records: RecordStore
    let boot: BootControl

    init(_ config: AgentConfig, create: Bool) throws {
        if create {
            try FileManager.default.createDirectory(atPath: config.stateDirectory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            try FileManager.default.createDirectory(atPath: config.bootDirectory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o755])
        }
        state = try SafeDirectory(path: config.stateDirectory, requirePrivate: true)
        bootDirectory = try SafeDirectory(path: config.bootDirectory)
        records = RecordStore(files: state)
        switch config.bootBackend {
        case .statefile: boot = StateFileBootControl(files: bootDirectory)
        case .grub(let env, let tool):
            do { boot = try GrubBootControl(envPath: env, tool: tool) } catch { throw ConfigError("boot", error.reason, exit: AgentExit.noInput) }
        case .uboot(let fwConfig, let printenv, let setenv):
            do { boot = try UBootBootControl(config: fwConfig, printenv: printenv, setenv: setenv) } catch {
                throw ConfigError("boot", error.reason, exit: AgentExit.noInput)
            }
        }
    }

    /// `fleetcast.side=a|b` in `booted-from` (the kernel command line, or the simulated bootloader's file).
    static func bootedSide(_ config: AgentConfig) throws -> Side {
        // Live activation: the `current` link, or at the first start the side the boot state runs.
        if let live = config.live {
            if let side = try LiveActivation.currentSide(root: live.root) { return side }
            // No link: a device's first start runs the side its boot state confirms (A as shipped).
            let files = try AgentFiles(config, create: false)
            if let state = try? files.boot.read() { return state.confirmedSide ?? .a }
            guard try files.records.read() == nil else {
                throw BundleError(.io, "\(live.root)/current is missing and the boot state cannot be read, though the agent has run here: not guessing which side runs")
            }
            return .a
        }
        guard let data = FileManager.default.contents(atPath: config.bootedFrom), data.count <= 1 << 16 else {
            throw BundleError(.io, "cannot read \(config.bootedFrom) to learn which side booted")
        }
        let words = String(decoding: data, as: UTF8.self).split(whereSeparator: \.isWhitespace)
        guard let word = words.last(where: { $0.hasPrefix("fleetcast.side=") }), let side = Side(name: String(word.dropFirst("fleetcast.side=".count))) else {
            throw BundleError(.invalidInput, "\(config.bootedFrom) has no fleetcast.side=a or fleetcast.side=b: the bootloader must say which side it booted")
        }
        return side
    }
}

struct AgentRun: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "run", abstract: "Run the device agent (a daemon; see `fleetcast agent --help`).")

    @OptionGroup var options: AgentOptions

    @Flag(help: "No periodic progress in the log while receiving.")
    var quiet = false

    @Option(help: "Drop this percentage of incoming data datagrams at random, to see repair work (tests, demos).")
    var simulateLoss: Double = 0

    func validate() throws {
        guard (0..<100).contains(simulateLoss) else { throw ValidationError("--simulate-loss is a percentage below 100") }
    }

    func run() throws {
        let config = try options.load()
        let logger = Logger(label: "fleetcast.agent")
        try reportingAgentFailures {
            installInterruptHandlers()
            // A missing or bad key file is a ConfigError (exit 66), reported below, before anything is touched.
            let identity = try config.identity(deviceID: "unset")
            let files = try AgentFiles(config, create: true)
            // Activation live (Specs/agent.md §9): the running side is the service's `current`
            // link, and its version is started here.
            let live: LiveActivation? = try config.live.map { settings in
                do throws(StorageError) { return try LiveActivation(settings) } catch {
                    // A port in use is not the configuration's fault and may pass: not an exit
                    // that the unit's RestartPreventExitStatus= keeps from restarting.
                    if error.reason.hasPrefix("live.listen") && !error.reason.contains("not an IPv4 address") {
                        printError("agent: \(error.reason)")
                        throw ExitCode(AgentExit.storage)
                    }
                    throw ConfigError("live", error.reason, exit: AgentExit.noInput)
                }
            }
            defer { live?.stopRunning() }
            var booted = try AgentFiles.bootedSide(config)
            // A device's first start: the boot state as shipped, the running side good.
            if try files.records.read() == nil, (try? files.boot.read()) == nil { try files.boot.initialize(current: booted) }
            if let live {
                // A start is a power-on: the boot logic runs (a side on trial spends an attempt).
                try live.makeCurrent(booted)
                booted = try Self.liveBoot(live, boot: files.boot, running: booted, logger: logger)
            }
            while true {
                try runOnce(config: config, identity: identity, files: files, booted: booted, logger: logger)
                guard let live else { return }
                // The in-process reboot of a live activation: the switch plays the bootloader.
                booted = try Self.liveBoot(live, boot: files.boot, running: booted, logger: logger)
            }
        }
    }

    /// The agent from its start to its reboot (returns: live activation's) or its end (throws an exit).
    private func runOnce(config: AgentConfig, identity: DeviceIdentity, files: AgentFiles, booted: Side, logger: Logger) throws {
        var receiving = UpdateReceiver.Configuration(identity: identity, stagingDirectory: config.stagingDirectory)
        receiving.stepTwoThread = true
        receiving.stagingWindow = config.stagingWindow
        receiving.tuning.inactivityTimeout = .seconds(10)
        receiving.tuning.sessionAuthentication = config.sessionAuth
        var settings = AgentSettings(slots: config.slots, booted: booted, shipped: config.shipped)
        settings.trialAttempts = config.trialAttempts
        settings.trigger = config.trigger
        settings.installPath = config.installPath
        let effects = CommandEffects(config: config, logger: logger)
        let service: AgentService
        do {
            service = try AgentService(settings: settings, receiver: receiving, records: files.records, boot: files.boot, effects: effects,
                                       unixTime: currentUnixTime)
        } catch {
            printError("agent: \(error)")
            throw ExitCode(AgentExit.storage)
        }
        let group = try SocketAddress(host: config.group, port: config.port)
        let interface = try config.interface.map { try NetworkInterface(name: $0) }
        let pump = try ReceiverPump(endpoint: service, settings: ReceiverEndpoint(group: group, interface: interface),
                                    simulatedLoss: simulateLoss / 100, seed: UInt64(fromBytes: try SecureRandom.bytes(8)))
        let control = try ControlSocket(directory: config.stateDirectory)
        let r = service.driver.machine.record
        logger.info("device \(r.deviceID): \(config.live == nil ? "booted" : "running") side \(booted.name), installed \(r.installed.version) (sequence \(r.sequence)) on side \(r.installedSide.name), \(service.describe(service.driver.machine.standing)); listening on \(group)\(interface.map { " on \($0)" } ?? "")")
        service.onEvent = { log($0, logger) }
        service.start(at: MonotonicClock.now())
        var lastProgress = MonotonicClock.now()
        try pump.run(tick: { now in
            control.serve { request in Self.answer(request, service: service, booted: booted, files: files) }
            if !quiet, let m = service.receiver.manifest, now >= lastProgress + .seconds(5) {
                lastProgress = now
                let total = BlockGeometry(payloadSize: m.payload.size, profile: m.transport).blockCount
                logger.info("receiving \(m.version): \(service.receiver.blocksDone)/\(total) blocks\(service.receiver.isVerifying ? ", verifying" : "")")
            }
        }, shouldStop: { interrupted })
        if let fault = service.fault {
            logger.critical("state could not be kept: \(fault.reason); the agent stops (the running side stays as it was)")
            throw ExitCode(AgentExit.storage)
        }
        if interrupted { throw ExitCode(130) }
        guard service.rebootStartedAt != nil else { throw ExitCode(0) }
        if config.live != nil { return }
        if config.simulatedReboot { throw ExitCode(AgentExit.simulatedReboot) }
        // The system stops the agent as it reboots; if it does not, say so.
        let giveUpAt = MonotonicClock.now() + .seconds(300)
        while !interrupted && MonotonicClock.now() < giveUpAt { usleep(100_000) }
        if interrupted { throw ExitCode(0) }
        logger.critical("the reboot command succeeded but the system did not reboot within 300 s")
        throw ExitCode(1)
    }

    /// Specs/agent.md §9: the boot logic (§3.2) over the boot state, as a bootloader
    /// runs it, with the service's versions for sides: the side it picks is started
    /// beside the running one and made current once ready; a side that does not get
    /// ready has spent its attempt, and the logic runs again (at most as often as a
    /// side may have attempts). Returns the side now running.
    static func liveBoot(_ live: LiveActivation, boot: BootControl, running: Side, logger: Logger) throws -> Side {
        for _ in 0...(Int(LiveActivation.attemptsMax) + 1) {
            if interrupted { throw ExitCode(130) }
            let state = try boot.read()
            guard let (side, spent) = BootLogic.boot(state) else { throw StorageError("no side to run in \(state)") }
            if let spent { try boot.write(spent) }
            if side == running {
                if let why = live.switchTo(running) { logger.error("the service of side \(running.name) did not start again: \(why)") }
                return running
            }
            logger.notice("live switch: starting side \(side.name) while side \(running.name) serves")
            if let why = live.switchTo(side) {
                logger.error("live switch to side \(side.name) failed, nothing switched, side \(running.name) serves on: \(why)")
                // A confirmed side spends no attempt: trying it again would fail the same way.
                if spent == nil { return running }
                continue
            }
            logger.notice("live switch: side \(side.name) is current; side \(running.name) stopped, kept until the update is confirmed")
            return side
        }
        throw StorageError("the boot logic kept picking a side that does not start")
    }

    private func log(_ e: AgentEvent, _ logger: Logger) {
        switch e {
        case .installing(let r, let side): logger.notice("installing \(r.version) (sequence \(r.sequence)) into side \(side.name) as it is received")
        case .installed(let r, let side, let st) where st.writtenInPlace:
            logger.notice("installed \(r.version) on side \(side.name): every slot read back and matched; \(formatBytes(st.bytes)) staged in the slot as it arrived (written once), its final fsync \(String(format: "%.2f", st.writeSeconds)) s, read back in \(String(format: "%.2f", st.readBackSeconds)) s")
        case .installed(let r, let side, let st):
            let window = st.stagingPeakBytes > 0 ? "; staged through the window, at most \(formatBytes(st.stagingPeakBytes)) on disk" : ""
            logger.notice("installed \(r.version) on side \(side.name): every slot read back and matched; \(formatBytes(st.bytes)) written in \(String(format: "%.2f", st.writeSeconds)) s of writes and fsyncs (\(formatRate(st.bytes, st.writeSeconds))), read back in \(String(format: "%.2f", st.readBackSeconds)) s\(window)")
        case .ready(let r): logger.notice("\(r.version) is ready: `fleetcast agent install` activates it")
        case .rebooting(let r): logger.notice("activating \(r.version): rebooting into it on trial")
        case .healthCheck(let r): logger.notice("\(r.version) on trial: checking its health")
        case .outcome(let o):
            switch o.kind {
            case .confirmed: logger.notice("confirmed \(o.release.version) (sequence \(o.release.sequence))")
            case .rolledBack: logger.error("rolled back \(o.release.version): \(o.reason)")
            case .failed: logger.error("update \(o.release.version) failed: \(o.reason)")
            }
        case .declined(let why): logger.warning("offer declined: \(why)")
        case .reported(let o): logger.info("the sender acknowledged: \(o.kind) \(o.release.version)")
        }
    }

    /// One control request: `status`, `install`, `mark-good`, `mark-bad`.
    static func answer(_ request: String, service: AgentService, booted: Side, files: AgentFiles) -> String {
        func reply(_ ok: Bool, _ message: String) -> String {
            let status = report(service, booted: booted, files: files)
            let object: [String: Any] = ["ok": ok, "message": message, "status": (try? JSONSerialization.jsonObject(with: JSONEncoder().encode(status))) ?? [:]]
            return (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])).map { String(decoding: $0, as: UTF8.self) } ?? "{}"
        }
        let now = MonotonicClock.now()
        do {
            switch request {
            case "status": return reply(true, "")
            case "install":
                try service.install(at: now)
                return reply(true, "activating: the device reboots into the update on trial")
            case "mark-good":
                try service.mark(good: true, at: now)
                return reply(true, "confirmed")
            case "mark-bad":
                try service.mark(good: false, at: now)
                return reply(true, "rolling back")
            default: return reply(false, "unknown request '\(request.prefix(40))'")
            }
        } catch { return reply(false, error.reason) }
    }

    static func report(_ service: AgentService, booted: Side, files: AgentFiles) -> AgentStatusReport {
        let m = service.driver.machine
        var transfer: AgentStatusReport.Transfer?
        if let manifest = service.receiver.manifest {
            transfer = .init(version: manifest.version, blocksDone: service.receiver.blocksDone,
                             blocksTotal: BlockGeometry(payloadSize: manifest.payload.size, profile: manifest.transport).blockCount,
                             verifying: service.receiver.isVerifying)
        }
        return AgentStatusReport(record: m.record, boot: m.boot, booted: booted, standing: service.describe(m.standing), running: true, transfer: transfer)
    }
}

func reportingAgentFailures(_ body: () throws -> Void) throws {
    do { try reportingTransportFailures(body) } catch let error as ConfigError {
        printError("configuration \(error)")
        throw ExitCode(error.exit)
    }
}

/// The client side of the control socket.
private func askAgent(_ request: String, options: AgentOptions) throws -> (ok: Bool, message: String, status: AgentStatusReport?)? {
    let config = try options.load()
    guard let text = try ControlSocket.request(request, directory: config.stateDirectory) else { return nil }
    guard let object = try? JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any], let ok = object["ok"] as? Bool else {
        throw BundleError(.malformed, "the agent's reply is not understood: \(text.prefix(200))")
    }
    let status = (object["status"]).flatMap { try? JSONSerialization.data(withJSONObject: $0) }.flatMap { try? JSONDecoder().decode(AgentStatusReport.self, from: $0) }
    return (ok, object["message"] as? String ?? "", status)
}

struct AgentStatus: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status",
        abstract: "Show the agent's state: installed release, anything pending, the boot state, a transfer under way.",
        discussion: "Asks the running agent over its control socket; when none runs, reads its record and boot state from the files (read-only).")

    @OptionGroup var options: AgentOptions

    @Flag(help: "Print JSON instead of lines.")
    var json = false

    func run() throws {
        try reportingAgentFailures {
            var report: AgentStatusReport
            if let answer = try askAgent("status", options: options), let status = answer.status {
                report = status
            } else {
                let config = try options.load()
                let files = try AgentFiles(config, create: false)
                guard let record = try files.records.read() else {
                    printError("no agent record in \(config.stateDirectory): the agent has never run there")
                    throw ExitCode(AgentExit.notRunning)
                }
                report = AgentStatusReport(record: record, boot: try? files.boot.read(), booted: try? AgentFiles.bootedSide(config),
                                           standing: record.pending.map { "\($0.phase) \($0.release.version)" } ?? "idle", running: false, transfer: nil)
            }
            if json {
                let encoder = JSONEncoder()
                encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
                say(String(decoding: try encoder.encode(report), as: UTF8.self))
            } else {
                say(report.text)
            }
        }
    }
}

/// `install`, `mark-good`, `mark-bad`: one request to the running agent.
/// `--wait` of the control commands: an agent that is still starting (a unit
/// ordered after it, such as contrib/fleetcast-mark-good.service) is waited for.
struct ControlWaitOptions: ParsableArguments {
    @Option(help: "Seconds to wait for the agent to be running (its control socket), instead of exiting 69 at once (0 to 3600).")
    var wait: Double = 0

    func validate() throws {
        guard wait >= 0 && wait <= 3600 else { throw ValidationError("--wait is 0 to 3600 seconds") }
    }
}

private func controlCommand(_ request: String, options: AgentOptions, wait: ControlWaitOptions) throws {
    try reportingAgentFailures {
        let giveUpAt = MonotonicClock.now() + .seconds(wait.wait)
        var reply = try askAgent(request, options: options)
        // Bounded: one try every 100 ms until --wait has passed.
        while reply == nil && MonotonicClock.now() < giveUpAt {
            usleep(100_000)
            reply = try askAgent(request, options: options)
        }
        guard let answer = reply else {
            printError("no agent is running for this configuration (no control socket in its state-dir)\(wait.wait > 0 ? " after \(wait.wait) s" : "")")
            throw ExitCode(AgentExit.notRunning)
        }
        if answer.ok { say(answer.message) } else {
            printError(answer.message)
            throw ExitCode(AgentExit.refused)
        }
    }
}

struct AgentInstall: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "install",
        abstract: "Activate the installed update (manual trigger): reboot into it on trial.",
        discussion: "Exit status: 0 activating; 65 nothing is ready to install; 69 no agent running.")
    @OptionGroup var options: AgentOptions
    @OptionGroup var waiting: ControlWaitOptions
    func run() throws { try controlCommand("install", options: options, wait: waiting) }
}

struct AgentMark: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mark-good",
        abstract: "Confirm the update on trial on the running side, as a passing health check would.",
        discussion: "Exit status: 0 confirmed; 65 no update on trial on the running side; 69 no agent running.")
    @OptionGroup var options: AgentOptions
    @OptionGroup var waiting: ControlWaitOptions
    func run() throws { try controlCommand("mark-good", options: options, wait: waiting) }
}

struct AgentMarkBad: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mark-bad",
        abstract: "Reject the update on trial on the running side: it is made not bootable and the device reboots back.",
        discussion: "Exit status: 0 rolling back; 65 no update on trial on the running side; 69 no agent running.")
    @OptionGroup var options: AgentOptions
    @OptionGroup var waiting: ControlWaitOptions
    func run() throws { try controlCommand("mark-bad", options: options, wait: waiting) }
}

struct AgentBoot: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "boot",
        abstract: "The simulated bootloader: pick the side to boot from the boot state, as Specs/agent.md §3.2 says.",
        discussion: """
        For tests and the demo, where `agent run` exits with status 75 instead of \
        rebooting. Reads the statefile boot state, takes the first side that is good or \
        has trial attempts left (spending one, written like any boot-state write), and \
        writes `fleetcast.side=<side>` to the configuration's boot.booted-from file. With \
        no valid boot state at all it boots side a, the built-in default.
        """)
    @OptionGroup var options: AgentOptions

    func run() throws {
        let config = try options.load()
        try reportingAgentFailures {
            guard !config.bootedFrom.hasPrefix("/proc/") else {
                throw BundleError(.invalidInput, "boot.booted-from is \(config.bootedFrom): the simulated bootloader writes a file; point it at one")
            }
            let files = try AgentFiles(config, create: true)
            var side = Side.a
            var note = "no valid boot state: the built-in default"
            if let state = try? files.boot.read() {
                guard let (chosen, spent) = BootLogic.boot(state) else { throw BundleError(.invalidInput, "nothing bootable in \(state)") }
                if let spent { try files.boot.write(spent) }
                side = chosen
                let s = (spent ?? state)[chosen]
                note = s.confirmed ? "good" : "on trial, \(s.attempts) attempt(s) left"
            }
            let url = URL(fileURLWithPath: config.bootedFrom)
            let directory = try SafeDirectory(path: url.deletingLastPathComponent().path)
            try directory.writeAtomically(Array("fleetcast.side=\(side.name)\n".utf8), to: url.lastPathComponent, mode: 0o644)
            say("booted side \(side.name) (\(note))")
        }
    }
}

struct AgentExplore: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "explore",
        abstract: "Run the crash explorer and the model check of the slot state machine (Specs/agent.md §8).",
        discussion: """
            The crash explorer cuts the power at every operation of an install, activation, confirm and rollback on a \
            simulated disk (and again at every operation of each recovery), once per boot backend (statefile; grub: \
            grub-editenv's and GRUB's own writes, operation for operation; uboot: fw_setenv's and U-Boot's writes of the other copy); the model check explores every state a device \
            can reach with power cuts before any step, several releases offered in any order, failing writes, reboots and \
            reports. Prints what each covered; exit status 1 if any invariant (I1-I5) failed.
            """)

    @Option(help: "The crash explorer's depth. 1: one cut per run; 2: also a second cut at every operation of each recovery.")
    var depth = 2

    @Option(help: "Trial boots the model check gives a new side.")
    var trialAttempts: UInt8 = 3

    func run() throws {
        var failed = false
        for backend in CrashExplorer.Backend.allCases {
            var explorer = CrashExplorer()
            explorer.depth = depth
            explorer.backend = backend
            let report = explorer.explore()
            say("\(report)")
            failed = failed || !report.violations.isEmpty
        }
        for automatic in [true, false] {
            var checker = SlotModelChecker()
            checker.trialAttempts = max(1, trialAttempts)
            checker.activatesAutomatically = automatic
            let model = checker.check()
            say("\(model)")
            failed = failed || !model.violations.isEmpty
        }
        if failed { throw ExitCode(1) }
    }
}
