import BundleFormat
import DeliveryCore
import FleetCrypto
import UpdateBundle
import WireFormat

/// What a device agent does outside its storage, supplied by its embedder
/// (`fleetcast agent run` runs configured commands): the health check, the
/// hooks and the reboot. Called from the agent's loop; none may block long
/// except the hooks, which the install waits for.
public protocol AgentEffects: AnyObject {
    /// Starts the health check of the side on trial (Specs/agent.md A-6).
    func startHealthCheck(at now: Instant)
    /// Its answer; `.pending` while it runs (or, with no check configured, until
    /// `AgentService.mark` gives the answer by hand).
    func pollHealthCheck(at now: Instant) -> SlotDriver.HealthResult
    /// Runs a hook to its end: nil when it succeeded, or why not.
    func runHook(_ hook: AgentHook, update: Release, side: Side) -> String?
    /// Starts the reboot: nil when it started, or why it could not (A-5a).
    func reboot() -> String?
}

/// Commands the agent runs around an install (Specs/agent.md §7).
public enum AgentHook: String, Sendable, CaseIterable {
    /// Before anything is written; a failure declines the update.
    case preInstall = "pre-install"
    /// After the read-back matched, before the side may boot; a failure fails the install.
    case postInstall = "post-install"
    /// Just before the reboot into the update; a failure undoes the activation.
    case activation
}

/// How an agent installs and activates (the configuration's fields, typed).
public struct AgentSettings: Sendable {
    public enum Trigger: String, Sendable, CaseIterable {
        /// Install as soon as the update is verified, and activate.
        case automatic
        /// Receive, verify and install; wait in `installed` ("ready") for `install()`.
        case manual
    }
    public enum InstallPath: String, Sendable, CaseIterable {
        /// Verified bytes go into the spare slots as step 2 releases them.
        case stream
        /// The whole bundle is staged and verified first, then written to the slots.
        case bundleFirst = "bundle-first"
    }
    /// Slot pairs by install target.
    public var slots: [String: SlotPair]
    /// The side that booted this time.
    public var booted: Side
    public var trialAttempts: UInt8 = 3
    public var trigger: Trigger = .automatic
    public var installPath: InstallPath = .stream
    /// The release the device shipped with: its record's first content.
    public var shipped: Release
    /// How often a running health check is looked at.
    public var healthPollInterval = Interval.milliseconds(100)
    /// Specs/agent.md A-5b: a failed reboot back to the installed side is tried again this often.
    public var rebootRetryInterval = Interval.seconds(30)
    public init(slots: [String: SlotPair], booted: Side, shipped: Release) { self.slots = slots; self.booted = booted; self.shipped = shipped }
}

/// What the agent tells its embedder (the log, `agent status`), in order.
public enum AgentEvent: Sendable {
    /// An update was accepted; its bytes go to the spare side.
    case installing(Release, side: Side)
    /// Written, read back, verified on the spare side; what the writing cost.
    case installed(Release, side: Side, InstallStats)
    /// Manual trigger: installed, waiting for `install()`.
    case ready(Release)
    /// The reboot into the update starts.
    case rebooting(Release)
    case healthCheck(Release)
    /// Confirmed, rolled back or failed (`Outcome.reason` says why).
    case outcome(Outcome)
    /// An offer declined (busy, no slot, a hook), or refused by the receiver's policy.
    case declined(String)
    /// The outcome reached its sender.
    case reported(Outcome)
}

/// What an install cost, beside the transfer it overlapped.
public struct InstallStats: Sendable {
    public var bytes: UInt64
    /// The payload was staged in the slot as it arrived (Specs/protocol.md P-29b):
    /// `writeSeconds` is then the final fsync only.
    public var writtenInPlace: Bool
    /// Inside the slots' writes and fsyncs.
    public var writeSeconds: Double
    /// Reading every slot back and hashing it.
    public var readBackSeconds: Double
    /// Specs/protocol.md P-29c: the most the staged bundle held on disk while the
    /// payload went through the staging window (0: no window).
    public var stagingPeakBytes: UInt64 = 0
}

public struct AgentError: Error, Sendable, CustomStringConvertible {
    public let reason: String
    public init(_ reason: String) { self.reason = reason }
    public var description: String { reason }
}

/// The device agent's core (Specs/agent.md): the embeddable receiver, the slot
/// driver on the device's storage, and the reports to the sender, as one
/// `DatagramEndpoint` that a pump (Transport's `ReceiverPump`, or the
/// embedder's own loop) feeds with datagrams and time. It decides each offer
/// against its durable record (installed release, stored sequence, anything
/// pending), streams the verified update into the spare slots, activates,
/// health-checks, confirms or rolls back, and tells the sender the outcome,
/// also after the reboot.
public final class AgentService: DatagramEndpoint {
    public let receiver: UpdateReceiver
    public let settings: AgentSettings
    public let driver: SlotDriver
    private let effects: AgentEffects
    private var reporter = AgentReporter()
    private var events: [AgentEvent] = [] {
        didSet { if let onEvent, !events.isEmpty { let e = events; events = []; e.forEach(onEvent) } }
    }
    /// When set, each event goes here as it happens (in order with the effects'
    /// own output) instead of waiting for `pollEvent`.
    public var onEvent: ((AgentEvent) -> Void)?
    /// The slots of the update being installed (from its offer).
    private var plan: SlotPlan?
    private var sink: SlotSink?
    private var healthRunning = false
    private var healthPollAt: Instant?
    private var rebootRetryAt: Instant?
    private var now = Instant.zero
    /// When the reboot was started: the loop ends a moment later (`isDone`).
    public private(set) var rebootStartedAt: Instant?
    /// A storage failure of the record or the boot state: the agent stops.
    public private(set) var fault: StorageError?
    /// Time given to the last reports before `isDone` after a reboot was started.
    public static let rebootDrain = Interval.milliseconds(300)

    /// `records` and `boot` are the device's durable state; the receiver's
    /// configuration names the staging directory and the device's identity (its
    /// `deviceID` is replaced by the record's, made once at random).
    public init(settings: AgentSettings, receiver configuration: UpdateReceiver.Configuration, records: RecordStore, boot: BootControl,
                effects: AgentEffects, unixTime: @escaping () -> UInt64, seed: UInt64? = nil) throws(AgentError) {
        self.settings = settings
        self.effects = effects
        let bridge = Bridge()
        let driver: SlotDriver
        do {
            driver = try SlotDriver(records: records, boot: boot, booted: settings.booted, trialAttempts: settings.trialAttempts,
                                    activatesAutomatically: settings.trigger == .automatic,
                                    initial: { AgentRecord(deviceID: Self.randomDeviceID(), installed: settings.shipped, installedSide: settings.booted) },
                                    health: { bridge.service?.healthRequested() ?? .pending },
                                    reboot: {
                                        guard let service = bridge.service else { return "no agent" }
                                        return service.rebootRequested()
                                    },
                                    report: { outcome, target in bridge.service?.reportRequested(outcome, target) ?? false })
        } catch { throw AgentError("state: \(error.reason)") }
        self.driver = driver
        var config = configuration
        config.identity.deviceID = driver.machine.record.deviceID
        config.listensAfterSession = true
        if settings.installPath == .bundleFirst { config.keepBundle = true }
        do {
            // Specs/protocol.md P-29b: a lone plain component's payload is staged in the
            // spare slot it goes to, so that the image is written once and staging holds
            // no copy of it. (Asked at offers and at a resume; written only once accepted,
            // after A-3 made the spare not bootable.)
            let slots = settings.slots
            let payloadSlot: ((Manifest) -> StagingArea.PayloadPlace?)? = settings.installPath == .bundleFirst ? nil : { [unowned driver] m in
                guard m.components.count == 1, let pair = slots[m.components[0].installTarget],
                      let slot = try? FileSlot(path: pair[driver.machine.spare]), slot.capacity >= m.payload.size else { return nil }
                return .slot(slot.file, path: slot.path)
            }
            receiver = try UpdateReceiver(configuration: config, installed: { [unowned driver] in
                let r = driver.machine.record
                return InstalledSoftware(version: r.installed.version, sequence: r.sequence)
            }, unixTime: unixTime, seed: seed, payloadSlot: payloadSlot)
        } catch { throw AgentError("staging: \(error.text)") }
        bridge.service = self
        // The reports' REGISTER (P-30): this device as its receiver says it, what it runs now.
        let deviceID = Register.fitting(config.identity.deviceID)
        reporter.registration = { [unowned driver] session, id in
            let r = driver.machine.record
            return Register(session: session, receiver: id, installedSequence: r.sequence, deviceID: deviceID,
                            version: Register.fitting(r.installed.version))
        }
        receiver.decideOffer = { [unowned self] offer in decide(offer) }
        receiver.ignoresBundle = { [unowned self] manifest, session in knows(manifest.bundleID, session: session) }
        if settings.installPath == .stream {
            receiver.makeSink = { [unowned self] _, inSlot throws(ReceiveFailure) in
                guard let plan else { throw ReceiveFailure(.storage, "no slot plan for this update") }
                let s = SlotSink(plan: plan, writtenInPlace: inSlot)
                sink = s
                return s
            }
        }
    }

    /// The closures given to the driver reach the service through this, once it exists.
    private final class Bridge { weak var service: AgentService? }

    private static func randomDeviceID() -> String {
        let bytes = (try? SecureRandom.bytes(8)) ?? []
        return "dev-" + bytes.hexString
    }

    /// Specs/agent.md A-6: reconcile the record with the boot state and the booted
    /// side, and go on with what was under way (a health check, a rollback, a report).
    public func start(at now: Instant) {
        self.now = now
        guarded { () throws(StorageError) in try driver.start() }
        scheduleRebootRetry()
    }

    /// Specs/agent.md A-5b: while the device runs a side it must leave and no reboot
    /// is under way, the reboot is tried again every `rebootRetryInterval`.
    private func scheduleRebootRetry() {
        if driver.isRebooting || !driver.machine.needsReboot { rebootRetryAt = nil }
        else if rebootRetryAt == nil { rebootRetryAt = now + settings.rebootRetryInterval }
    }

    public func pollEvent() -> AgentEvent? { events.isEmpty ? nil : events.removeFirst() }

    // MARK: Control (`fleetcast agent install`, `mark-good`, `mark-bad`)

    /// Manual trigger: activate the installed update (reboot into it).
    public func install(at now: Instant) throws(AgentError) {
        self.now = now
        guard case .installed = driver.machine.standing else {
            throw AgentError("nothing is ready to install (\(describe(driver.machine.standing)))")
        }
        try checked { () throws(StorageError) in try driver.activate() }
    }

    /// The health check's answer by hand, for the side on trial that booted.
    public func mark(good: Bool, at now: Instant) throws(AgentError) {
        self.now = now
        guard case .trial = driver.machine.standing, driver.machine.booted == driver.machine.record.pending?.side,
              !driver.machine.boot[driver.machine.booted].confirmed else {
            throw AgentError("no update is on trial on the running side (\(describe(driver.machine.standing)))")
        }
        healthRunning = false
        healthPollAt = nil
        try checked { () throws(StorageError) in try driver.mark(healthy: good, reason: good ? "" : "marked bad by hand") }
        scheduleRebootRetry()
    }

    public func describe(_ s: SlotMachine.Standing) -> String {
        switch s {
        case .idle: "idle"
        case .installing(let r): "installing \(r.version)"
        case .installed(let r): "installed \(r.version), ready to activate"
        case .trial(let r): "on trial: \(r.version)"
        case .rollingBack(let r, _): "rolling back \(r.version)"
        }
    }

    // MARK: DatagramEndpoint

    public func handleDatagram(_ bytes: [UInt8], from peer: PeerAddress, at now: Instant, arrivedAt: Instant) {
        self.now = now
        if bytes.count > 1, bytes[1] == Datagram.Kind.ack.rawValue, case .ack(let ack)? = try? Datagram(parsing: bytes), reporter.acknowledge(ack) {
            guarded { () throws(StorageError) in try driver.outcomeDelivered() }
            if let o = lastReported { events.append(.reported(o)) }
        }
        // Specs/protocol.md P-30: the reports' cookie (the receiver may be waiting for one too).
        if bytes.count > 1, bytes[1] == Datagram.Kind.cookie.rawValue, case .cookie(let c)? = try? Datagram(parsing: bytes) {
            _ = reporter.handle(c, at: now)
        }
        receiver.handleDatagram(bytes, from: peer, at: now, arrivedAt: arrivedAt)
        drainReceiver()
    }

    public func handleTimeout(at now: Instant) {
        self.now = now
        if let d = receiver.nextDeadline, now >= d { receiver.handleTimeout(at: now) }
        if healthRunning, let at = healthPollAt, now >= at { pollHealth() }
        if let at = rebootRetryAt, now >= at {
            rebootRetryAt = nil
            guarded { () throws(StorageError) in try driver.retryReboot() }
        }
        drainReceiver()
        scheduleRebootRetry()
    }

    public func pollTransmit() -> Transmit? {
        if let t = reporter.poll(at: now) { return t }
        return receiver.pollTransmit()
    }

    public var nextDeadline: Instant? {
        // The end of a started reboot's drain is a deadline too: with nothing else due, the
        // loop would otherwise sleep past it and `isDone` would wait for the next datagram.
        [receiver.nextDeadline, reporter.nextDeadline, healthRunning ? healthPollAt : nil, rebootRetryAt,
         rebootStartedAt.map { $0 + Self.rebootDrain }].compactMap { $0 }.min()
    }

    public var hasPendingWork: Bool { receiver.hasPendingWork }

    public func performPendingWork(at now: Instant) {
        self.now = now
        receiver.performPendingWork(at: now)
        drainReceiver()
    }

    /// After a reboot was started (and its last reports had their moment), or a fault.
    public var isDone: Bool {
        if fault != nil { return true }
        guard let at = rebootStartedAt else { return false }
        return now >= at + Self.rebootDrain
    }

    // MARK: Offers (Specs/agent.md A-3)

    /// Bundles installed, pending, confirmed or rolled back here: ignored without a word.
    private func knows(_ bundleID: [UInt8], session: SessionID) -> Bool {
        let r = driver.machine.record
        if bundleID == r.installed.bundleID || bundleID == r.pending?.release.bundleID { return true }
        if let o = r.outcome, o.kind != .failed, o.release.bundleID == bundleID { return true }
        // a bundle that failed in this session (other than by an interruption) would
        // fail again; its sender has the failure, and the session's announces are ignored.
        if let f = failedInSession, f.session == session, f.bundleID == bundleID { return true }
        return driver.machine.hasRolledBack(bundleID)
    }

    /// The last update that failed, other than by an interruption, and its session.
    private var failedInSession: (session: SessionID, bundleID: [UInt8])?

    private func decide(_ offer: UpdateOffer) -> UpdateReceiver.OfferDecision {
        let m = offer.manifest.manifest
        let release = Release(bundleID: m.bundleID, version: m.version, sequence: m.sequence)
        guard driver.machine.canInstall else { return declined("busy: \(describe(driver.machine.standing))") }
        let side = driver.machine.spare
        do { plan = try SlotPlan(m, side: side, pairs: settings.slots) { (path) throws(StorageError) in try FileSlot(path: path) } }
        catch {
            events.append(.declined(error.reason))
            return .refuse(error.reason, .slot)
        }
        if let failure = effects.runHook(.preInstall, update: release, side: side) { return declined("the pre-install hook refused: \(failure)") }
        let target = ReportTarget(sender: offer.sender, session: offer.session, receiver: receiver.receiverID)
        reporter.clear()
        do throws(StorageError) { try driver.beginInstall(release, reportTo: target) } catch {
            fault = error
            return .refuse("state: \(error.reason)", .storage)
        }
        events.append(.installing(release, side: side))
        return .accept
    }

    private func declined(_ text: String) -> UpdateReceiver.OfferDecision {
        events.append(.declined(text))
        return .decline(text)
    }

    // MARK: The receiver's events

    private func drainReceiver() {
        while let e = receiver.pollEvent() {
            switch e {
            case .completed(let update): installed(update)
            case .failed(let session, let failure), .refused(let session, let failure):
                if case .installing = driver.machine.standing, driver.machine.record.pending?.reportTo?.session == session {
                    plan = nil
                    sink = nil
                    guarded { () throws(StorageError) in try driver.installFailed(reason: failure.text, code: failure.statusReason) }
                } else if case .refused = e, lastRefusal.map({ $0 != (session, failure.text) }) ?? true {
                    // Once per session: a sender announces every second.
                    lastRefusal = (session, failure.text)
                    events.append(.declined(failure.text))
                }
            case .offer, .joined, .received: break
            }
        }
    }

    /// Step 2 passed: with the stream path the slots were written and read back
    /// (`SlotSink.release`); with the bundle-first path they are written now.
    private func installed(_ update: ReceivedUpdate) {
        guard case .installing(let release) = driver.machine.standing, let p = driver.machine.record.pending else { return }
        defer {
            plan = nil
            sink = nil
            // The slots hold the update now: staging keeps no second copy.
            if update.bundlePath != nil { receiver.removeStagedBundle() }
        }
        var used = sink
        if settings.installPath == .bundleFirst {
            guard let path = update.bundlePath, let plan else {
                guarded { () throws(StorageError) in try driver.installFinished(verified: false, reason: "no staged bundle to install from") }
                return
            }
            do {
                let s = SlotSink(plan: plan)
                used = s
                _ = try UnverifiedBundle(path: path).verifyPayload(update.verified.manifest, keys: receiver.configuration.identity.keys,
                                                                   checkAuthChain: false, sink: s)
            } catch {
                guarded { () throws(StorageError) in try driver.installFinished(verified: false, reason: "installing from the bundle: \(error.reason)") }
                return
            }
        }
        if let failure = effects.runHook(.postInstall, update: release, side: p.side) {
            guarded { () throws(StorageError) in try driver.installFinished(verified: false, reason: "the post-install hook failed: \(failure)") }
            return
        }
        let inPlace = used?.writtenInPlace ?? false
        events.append(.installed(release, side: p.side, InstallStats(bytes: inPlace ? update.verified.manifest.manifest.payload.size : used?.bytesWritten ?? 0,
                                                                      writtenInPlace: inPlace, writeSeconds: used?.writeSeconds ?? 0,
                                                                      readBackSeconds: used?.readBackSeconds ?? 0,
                                                                      stagingPeakBytes: receiver.stagingAllocatedBytesMax)))
        if let target = p.reportTo { reporter.report(progress: .installed, to: target, at: now) }
        guarded { () throws(StorageError) in try driver.installFinished(verified: true) }
        if settings.trigger == .manual, case .installed = driver.machine.standing { events.append(.ready(release)) }
    }

    // MARK: The driver's effects

    private func healthRequested() -> SlotDriver.HealthResult {
        guard let p = driver.machine.record.pending else { return .pending }
        events.append(.healthCheck(p.release))
        if let target = p.reportTo { reporter.report(progress: .activating, to: target, at: now) }
        effects.startHealthCheck(at: now)
        healthRunning = true
        healthPollAt = now
        return .pending
    }

    private func pollHealth() {
        switch effects.pollHealthCheck(at: now) {
        case .pending: healthPollAt = now + settings.healthPollInterval
        case .healthy:
            healthRunning = false
            guarded { () throws(StorageError) in try driver.mark(healthy: true, reason: "") }
        case .unhealthy(let why):
            healthRunning = false
            guarded { () throws(StorageError) in try driver.mark(healthy: false, reason: why) }
        }
    }

    private func rebootRequested() -> String? {
        if let p = driver.machine.record.pending, p.phase == .trial, driver.machine.booted != p.side {
            if let failure = effects.runHook(.activation, update: p.release, side: p.side) { return "the activation hook failed: \(failure)" }
            events.append(.rebooting(p.release))
            if let target = p.reportTo { reporter.report(progress: .activating, to: target, at: now) }
        }
        if let failure = effects.reboot() { return "the reboot command failed: \(failure)" }
        rebootStartedAt = now
        return nil
    }

    private var lastReported: Outcome?
    private var lastRefusal: (SessionID, String)?

    private func reportRequested(_ outcome: Outcome, _ target: ReportTarget?) -> Bool {
        if !events.contains(where: { if case .outcome(let o) = $0 { o == outcome } else { false } }) { events.append(.outcome(outcome)) }
        lastReported = outcome
        if outcome.kind == .failed, outcome.code != .interrupted, let session = target?.session {
            failedInSession = (session, outcome.release.bundleID)
        }
        guard let target else { return true }  // no sender to tell: the log has it
        let state: Status.State = switch outcome.kind {
        case .confirmed: .confirmed
        case .rolledBack: .rolledBack
        case .failed: .failed
        }
        reporter.report(outcome: state, reason: outcome.kind == .confirmed ? .none : (outcome.code == .none ? .storage : outcome.code), to: target, at: now)
        return false
    }

    // MARK: Storage failures

    private func guarded(_ body: () throws(StorageError) -> Void) {
        do { try body() } catch { fault = error }
    }

    private func checked(_ body: () throws(StorageError) -> Void) throws(AgentError) {
        do { try body() } catch {
            fault = error
            throw AgentError("state: \(error.reason)")
        }
    }
}
