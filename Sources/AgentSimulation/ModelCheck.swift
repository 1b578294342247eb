import DeliveryCore
import DeviceAgent

/// The model check of the slot state machine (Specs/agent.md §8): a breadth-first
/// exploration of every state a device can reach, where a power cut may strike
/// at every step, any number of times.
///
/// The crash explorer (`CrashExplorer`) runs the real driver on a simulated disk
/// and cuts at every operation of one update, once or twice. This checker trades
/// the disk's detail (torn writes, lost caches: the explorer's and the statefile's
/// concern) for breadth: each write of the record or the boot state is atomic, and
/// what varies is everything around the machine:
///
/// - a power cut before any step (unbounded: the state space is finite, so loops of
///   crashes are explored to their fixpoint);
/// - offers of several releases in any order, judged by the agent's policy (a
///   sequence above the stored one, not rolled back before, not the installed one);
/// - an install whose write completes, completes corrupt (the read-back must catch
///   it) or fails (the download breaks off);
/// - health checks that pass, fail or either (a flaky service), releases that
///   never come up (the bootloader falls back after its attempts);
/// - a reboot command that succeeds or fails (A-5a; a failed one back to the
///   installed side is tried again, A-5b), a report that reaches its sender or not;
/// - the manual trigger: `agent install` at any moment an update waits.
///
/// It checks I1-I3 and I5 in every state and on every transition, and I4 from
/// every state: carried on without another cut, offer or help, the device
/// settles on a confirmed side with nothing pending, never on a bad release.
public struct SlotModelChecker {
    /// How a release behaves once booted.
    public enum Behaviour: Hashable, Sendable, CustomStringConvertible {
        case healthy, unhealthy, neverComesUp
        /// Its health check may pass or fail: both are explored.
        case flaky
        public var description: String {
            switch self {
            case .healthy: "healthy"
            case .unhealthy: "unhealthy"
            case .neverComesUp: "never comes up"
            case .flaky: "flaky"
            }
        }
    }

    public struct Report: Sendable, CustomStringConvertible {
        public var states = 0
        public var transitions = 0
        public var crashTransitions = 0
        /// The longest shortest path from the first state (breadth-first levels).
        public var depth = 0
        public var violations: [String] = []
        public var label = ""
        public var description: String {
            "model check (\(label)): \(states) states, \(transitions) transitions (\(crashTransitions) power cuts), depth \(depth), "
                + "I4 checked from every state; "
                + (violations.isEmpty ? "every invariant (I1-I5) held" : "\(violations.count) VIOLATIONS of \(kinds.count) kinds:\n  "
                    + kinds.map { "\($0.count) x \($0.kind), e.g. \($0.example)" }.joined(separator: "\n  "))
        }
        /// The violations grouped by their message (the state they were found in left out).
        public var kinds: [(kind: String, count: Int, example: String)] {
            var groups: [String: (Int, String)] = [:]
            for v in violations {
                let kind = v.firstRange(of: " (").map { String(v[..<$0.lowerBound]) } ?? v
                groups[kind, default: (0, v)].0 += 1
            }
            return groups.sorted { $0.key < $1.key }.map { ($0.key, $0.value.0, $0.value.1) }
        }
    }

    /// The releases offered after the shipped one (sequence 1), with sequences 2, 3, ...
    public var releases: [Behaviour] = [.healthy, .unhealthy, .neverComesUp, .flaky]
    public var trialAttempts: UInt8 = 2
    public var activatesAutomatically = true
    /// Named limit: the exploration stops (and says so) beyond this many states.
    public var statesMax = 2_000_000
    /// Named limit: steps allowed to settle from a state when checking I4.
    static let settleStepsMax = 400
    /// Deliberately broken models, so that the tests see the checker fail: an install
    /// taken as verified without its read-back, and an offer policy that forgets the
    /// rolled-back releases.
    public var trustsWritesWithoutReadBack = false
    public var forgetsRolledBack = false

    public init() {}

    public func check() -> Report {
        var report = Report()
        report.label = "\(releases.count) releases (\(releases.map(\.description).joined(separator: ", "))), \(trialAttempts) trial attempt(s), "
            + (activatesAutomatically ? "automatic" : "manual") + " trigger"
        let model = Model(checker: self)
        let first = model.initialWorld()
        var seen: Set<World.Key> = [first.key]
        var level = [first]
        var violations: Set<String> = []
        while !level.isEmpty && seen.count < statesMax {
            var next: [World] = []
            for world in level {
                report.states += 1
                for v in model.violations(in: world) { violations.insert(v) }
                if let v = model.settles(from: world) { violations.insert("I4: \(v) (from \(world))") }
                for (successor, step) in model.successors(of: world) {
                    report.transitions += 1
                    if step == .powerCut { report.crashTransitions += 1 }
                    for v in model.violations(from: world, to: successor, by: step) { violations.insert(v) }
                    if seen.insert(successor.key).inserted { next.append(successor) }
                }
            }
            if !next.isEmpty { report.depth += 1 }
            level = next
        }
        if seen.count >= statesMax { violations.insert("the exploration stopped at statesMax (\(statesMax)) states: not exhaustive") }
        report.violations = violations.sorted()
        return report
    }
}

/// What a slot holds, as far as the model cares: release n's image, or not quite.
enum SlotContent: Hashable, CustomStringConvertible {
    /// Release n's image, written whole and durable (0: the shipped one).
    case image(Int)
    /// A write of release n under way or cut.
    case partial(Int)
    /// Written whole, but not what was signed (a bad write the read-back must catch).
    case corrupt(Int)
    case empty
    var description: String {
        switch self {
        case .image(let n): "image \(n)"
        case .partial(let n): "partial \(n)"
        case .corrupt(let n): "corrupt \(n)"
        case .empty: "empty"
        }
    }
}

/// What the agent process is doing.
enum Control: Hashable {
    /// Powered off (or reset): the bootloader runs next.
    case off
    /// Carrying out the machine's actions, the first next.
    case running
    /// Nothing under way: an offer or `agent install` may come.
    case idle
    /// Writing release n into the spare, after `beginInstall`'s actions.
    case writing(Int)
    /// The reboot command was started; the device restarts next.
    case rebooting
}

/// One state of the device: the durable part, the volatile part, and ghost
/// variables that only the invariants read.
struct World: CustomStringConvertible {
    // Durable.
    var record: AgentRecord
    var boot: BootState
    var slots: [SlotContent]
    // Volatile.
    var control: Control
    var booted: Side?
    var machine: SlotMachine?
    var queue: [SlotMachine.Action]
    /// An offer's `beginInstall` actions run first; then release n's writes start.
    var pendingWrite: Int? = nil
    // Ghosts: the release whose outcome is owed since its acceptance became durable
    // (I5, lost), and those confirmed or rolled back (I5, installed twice).
    var owed: Int?
    var finished: Set<Int>

    struct Key: Hashable {
        var durable: [UInt8]
        var slots: [SlotContent]
        var control: Control
        var booted: Side?
        var machine: [UInt8]
        var queue: String
        var pendingWrite: Int?
        var owed: Int?
        var finished: Set<Int>
    }

    /// Generations only order the statefile's two copies; the model keeps one, so
    /// they are left out of the key (otherwise every loop would be a new state).
    static func bytes(_ boot: BootState) -> [UInt8] {
        var b = boot
        b.generation = 0
        return b.encoded()
    }

    var key: Key {
        Key(durable: record.encoded() + Self.bytes(boot), slots: slots, control: control, booted: booted,
            machine: machine.map { $0.record.encoded() + Self.bytes($0.boot) } ?? [],
            queue: queue.map { String(describing: $0) }.joined(separator: "|"), pendingWrite: pendingWrite, owed: owed, finished: finished)
    }

    var description: String {
        "booted \(booted.map(\.description) ?? "-"), \(control), record: installed \(record.installed.version) on \(record.installedSide), "
            + "seq \(record.sequence), pending \(record.pending.map { "\($0.release.version) \($0.phase)" } ?? "-"), "
            + "boot: \(boot), slots A \(slots[0]) B \(slots[1]), queue \(queue.count)"
    }
}

/// What led from one state to the next: power cuts are counted, and a transition that breaks an invariant names its step.
enum Step: Equatable {
    case powerCut, powerOn, action, offer(Int), activateByHand, writeDone, writeCorrupt, writeFailed, restart
}

/// The model's rules: the environment's choices around the real `SlotMachine`.
private struct Model {
    let checker: SlotModelChecker
    let shipped = Release(bundleID: [0], version: "v1", sequence: 1)

    init(checker: SlotModelChecker) { self.checker = checker }

    func release(_ n: Int) -> Release { n == 0 ? shipped : Release(bundleID: [UInt8(n)], version: "v\(n + 1)", sequence: UInt64(n + 1)) }
    func index(of r: Release) -> Int { Int(r.bundleID.first ?? 0) }
    func behaviour(_ n: Int) -> SlotModelChecker.Behaviour { n == 0 ? .healthy : checker.releases[n - 1] }

    func initialWorld() -> World {
        World(record: AgentRecord(deviceID: "model", installed: shipped, installedSide: .a), boot: .initial(current: .a),
              slots: [.image(0), .empty], control: .off, booted: nil, machine: nil, queue: [], owed: nil, finished: [])
    }

    // MARK: Successors

    /// Every next state, with the step that leads there. `crashes` false: the
    /// continuation without help (no power cut, no offer, no failure, reports
    /// delivered), for I4.
    func successors(of w: World, crashes: Bool = true) -> [(World, Step)] {
        var out: [(World, Step)] = []
        if crashes, w.control != .off {
            var cut = w
            cut.control = .off; cut.booted = nil; cut.machine = nil; cut.queue = []
            if case .writing(let n) = w.control { cut.slots[w.machine!.spare.rawValue] = .partial(n) }
            out.append((cut, .powerCut))
        }
        switch w.control {
        case .off: out += powerOn(w)
        case .rebooting:
            var r = w
            r.control = .off; r.booted = nil; r.machine = nil; r.queue = []
            out.append((r, .restart))
        case .running: out += perform(w, helpless: !crashes)
        case .idle:
            let m = w.machine!
            if m.record.outcome != nil {
                // The sender's ACK of an outcome not delivered at once arrives (AgentService: `outcomeDelivered`).
                var d = w
                d.queue = d.machine!.outcomeReported()
                d.control = .running
                out.append((drained(d), .action))
            }
            if m.needsReboot {
                // Specs/agent.md A-5b: the agent tries the failed reboot back again.
                var r = w
                r.queue = r.machine!.retryReboot()
                r.control = .running
                out.append((drained(r), .action))
            }
            guard crashes else { break }
            for n in 1...checker.releases.count where offerable(n, m) {
                var o = w
                o.queue = o.machine!.beginInstall(release(n), reportTo: nil)
                o.control = .running
                // The install's writes follow its actions (see `drained`).
                o.pendingWrite = n
                out.append((o, .offer(n)))
            }
            if !checker.activatesAutomatically, case .installed = m.standing {
                var a = w
                a.queue = a.machine!.activate()
                a.control = .running
                out.append((a, .activateByHand))
            }
        case .writing(let n):
            let spare = w.machine!.spare.rawValue
            var done = w
            done.slots[spare] = .image(n)
            out.append((finishInstall(done, n), .writeDone))
            guard crashes else { break }
            var corrupt = w
            corrupt.slots[spare] = .corrupt(n)
            out.append((finishInstall(corrupt, n), .writeCorrupt))
            var failed = w
            failed.queue = failed.machine!.installFailed(reason: "the download broke off", code: .storage)
            failed.control = .running
            out.append((drained(failed), .writeFailed))
        }
        return out
    }

    /// The agent's policy at an offer (AgentService and the receiver's DevicePolicy):
    /// nothing pending, a higher sequence than the stored one, not rolled back before.
    func offerable(_ n: Int, _ m: SlotMachine) -> Bool {
        let r = release(n)
        return m.canInstall && r.sequence > m.record.sequence && m.record.installed != r && (checker.forgetsRolledBack || !m.hasRolledBack(r.bundleID))
    }

    /// Step A-4's end: read back, then `installFinished`.
    func finishInstall(_ w: World, _ n: Int) -> World {
        var f = w
        let matches = f.slots[f.machine!.spare.rawValue] == .image(n)
        f.queue = f.machine!.installFinished(verified: matches || checker.trustsWritesWithoutReadBack, reason: matches ? "" : "read-back hash differs")
        f.control = .running
        return drained(f)
    }

    /// The bootloader (Specs/agent.md §3.2), then the agent's start (A-6).
    func powerOn(_ w: World) -> [(World, Step)] {
        guard let (side, spent) = BootLogic.boot(w.boot) else { return [] }  // I1 reports it
        var on = w
        if let spent { on.boot = spent }
        guard case .image(let n) = on.slots[side.rawValue] else { return [] }  // I1/I2 report it
        if behaviour(n) == .neverComesUp {
            // A kernel that panics: a watchdog reset, the attempt spent.
            return [(on, .powerOn)]
        }
        var machine = SlotMachine(record: on.record, boot: on.boot, booted: side, trialAttempts: checker.trialAttempts,
                                  activatesAutomatically: checker.activatesAutomatically)
        on.queue = machine.start()
        on.machine = machine
        on.booted = side
        on.control = .running
        return [(drained(on), .powerOn)]
    }

    /// Carries out the first action (SlotDriver.run's order: what an action leads to
    /// runs before the rest).
    func perform(_ w: World, helpless: Bool) -> [(World, Step)] {
        var next = w
        let action = next.queue.removeFirst()
        switch action {
        case .writeBootState(let b):
            next.boot = b
            return [(drained(next), .action)]
        case .writeRecord(let r):
            if let p = r.pending, p.phase == .installing, next.record.pending?.phase != .installing {
                next.owed = index(of: p.release)
            }
            next.record = r
            if let o = r.outcome, o.kind != .failed { next.finished.insert(index(of: o.release)) }
            return [(drained(next), .action)]
        case .runHealthCheck:
            guard case .image(let n) = next.slots[next.booted!.rawValue] else { return [] }
            let results: [Bool]
            switch behaviour(n) {
            case .healthy: results = [true]
            case .unhealthy, .neverComesUp: results = [false]
            case .flaky: results = [true, false]
            }
            return results.map { healthy in
                var h = next
                h.queue = h.machine!.healthChecked(healthy: healthy, reason: healthy ? "" : "the service did not answer") + h.queue
                return (drained(h), .action)
            }
        case .reboot:
            var ok = next
            ok.control = .rebooting
            ok.queue = []
            var out = [(ok, Step.action)]
            if !helpless {
                var failed = next
                failed.queue = failed.machine!.rebootFailed(reason: "the reboot command failed") + failed.queue
                out.append((drained(failed), .action))
            }
            return out
        case .report(let o, _):
            if next.owed == index(of: o.release) { next.owed = nil }
            var delivered = next
            delivered.queue = delivered.machine!.outcomeReported() + delivered.queue
            var out = [(drained(delivered), Step.action)]
            if !helpless { out.append((drained(next), .action)) }
            return out
        }
    }

    /// An empty queue: the install's writes if an offer started them, else idle.
    func drained(_ w: World) -> World {
        var d = w
        guard d.control == .running, d.queue.isEmpty else { return d }
        if let n = d.pendingWrite {
            d.pendingWrite = nil
            if case .installing = d.machine!.standing {
                d.slots[d.machine!.spare.rawValue] = .partial(n)
                d.control = .writing(n)
                return d
            }
        }
        d.control = .idle
        return d
    }

    // MARK: Invariants

    /// I1, I2 and I5 (lost) on the durable state.
    func violations(in w: World) -> [String] {
        var out: [String] = []
        guard let c = w.boot.confirmedSide else { return ["I1: no bootable confirmed side (\(w))"] }
        if !isImage(w.slots[c.rawValue]) { out.append("I1: the confirmed side \(c) holds \(w.slots[c.rawValue]) (\(w))") }
        for side in Side.allCases where w.boot[side].bootable && !isImage(w.slots[side.rawValue]) {
            out.append("I2: side \(side) bootable holding \(w.slots[side.rawValue]) (\(w))")
        }
        if let (side, _) = BootLogic.boot(w.boot) {
            if !isImage(w.slots[side.rawValue]) { out.append("I1: the bootloader picks side \(side) holding \(w.slots[side.rawValue]) (\(w))") }
        } else {
            out.append("I1: the bootloader finds nothing to boot (\(w))")
        }
        if let n = w.owed, index(of: w.record.pending?.release ?? shipped) != n, index(of: w.record.outcome?.release ?? shipped) != n {
            out.append("I5: accepted release \(n + 1) is neither pending nor reported nor owed in the record (\(w))")
        }
        return out
    }

    func isImage(_ c: SlotContent) -> Bool { if case .image = c { true } else { false } }

    /// I3 and I5 (twice) on a transition.
    func violations(from a: World, to b: World, by step: Step) -> [String] {
        var out: [String] = []
        if b.record.sequence < a.record.sequence { out.append("I3: the stored sequence fell from \(a.record.sequence) to \(b.record.sequence) (by \(step), to \(b))") }
        if b.record.sequence > a.record.sequence {
            let confirm = b.record.installed.sequence == b.record.sequence && b.boot[b.record.installedSide].confirmed
                && b.record.outcome?.kind == .confirmed
            if !confirm { out.append("I3: the stored sequence rose to \(b.record.sequence) outside a confirm (by \(step), to \(b))") }
        }
        if let p = b.record.pending, p.phase == .installing, a.record.pending?.phase != .installing, a.finished.contains(index(of: p.release)) {
            out.append("I5: release \(index(of: p.release) + 1), confirmed or rolled back before, is installed again (by \(step), to \(b))")
        }
        return out
    }

    /// I4: carried on without a power cut, an offer or help, every way the health
    /// checks can go, the device settles within `settleStepsMax` steps on a confirmed
    /// side with nothing pending (a manual update may wait, installed), every outcome
    /// reported, and the side it runs holds a release that is not a bad one.
    func settles(from w: World) -> String? {
        var stack = [(w, 0)]
        while let (s, steps) = stack.popLast() {
            if steps > SlotModelChecker.settleStepsMax { return "no settled state within \(SlotModelChecker.settleStepsMax) steps" }
            let next = successors(of: s, crashes: false)
            if next.isEmpty {
                if let why = unsettled(s) { return why }
                continue
            }
            for (n, _) in next { stack.append((n, steps + 1)) }
        }
        return nil
    }

    func unsettled(_ s: World) -> String? {
        guard s.control == .idle, let booted = s.booted else { return "stuck: \(s.control)" }
        if let p = s.record.pending, !(p.phase == .installed && !checker.activatesAutomatically) { return "stopped with \(p.release.version) \(p.phase)" }
        if s.record.outcome != nil { return "an outcome left unreported" }
        if booted != s.record.installedSide || !s.boot[booted].confirmed { return "running side \(booted), not the confirmed installed one" }
        guard case .image(let n) = s.slots[booted.rawValue] else { return "running a side without an image" }
        switch behaviour(n) {
        case .unhealthy, .neverComesUp: return "settled on release \(n + 1), which is \(behaviour(n))"
        case .healthy, .flaky: break
        }
        if s.boot.canBoot(booted.other) && !s.boot[booted.other].confirmed { return "the other side left on trial" }
        return nil
    }
}
