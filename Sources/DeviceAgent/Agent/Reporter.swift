import DeliveryCore
import WireFormat

/// What a device agent tells the sender after step 2 (Specs/agent.md §6,
/// Specs/protocol.md P-21b): progress (installed, activating), sent a few times
/// and not acknowledged, and the outcome (confirmed, rolled back, failed),
/// repeated until the sender ACKs that state or `outcomeRepeatMax` is spent.
/// Pure: time comes in, datagrams go out.
struct AgentReporter {
    struct Entry {
        var target: ReportTarget
        var state: Status.State
        var reason: Status.Reason
        var remaining: Int
        var due: Instant
    }

    /// Between repeats: the receiver's own `statusInterval`.
    static let interval = Interval.seconds(1)
    /// Progress is sent this many times.
    static let progressRepeatCount = 3
    /// An outcome is sent at most this many times per start (five minutes): a sender
    /// gone for good does not keep the agent talking; the record keeps the outcome for
    /// the next start.
    static let outcomeRepeatMax = 300

    private(set) var progress: Entry?
    private(set) var outcome: Entry?

    mutating func report(progress state: Status.State, to target: ReportTarget, at now: Instant) {
        progress = Entry(target: target, state: state, reason: .none, remaining: Self.progressRepeatCount, due: now)
    }

    mutating func report(outcome state: Status.State, reason: Status.Reason, to target: ReportTarget, at now: Instant) {
        progress = nil
        outcome = Entry(target: target, state: state, reason: reason, remaining: Self.outcomeRepeatMax, due: now)
    }

    /// A new install begins: what was still to be said of the last one is moot.
    mutating func clear() { progress = nil; outcome = nil }

    /// Whether `ack` acknowledges the outcome being reported (which is then done).
    mutating func acknowledge(_ ack: Ack) -> Bool {
        guard let o = outcome, ack.session == o.target.session, ack.receiver == o.target.receiver, ack.state == o.state else { return false }
        outcome = nil
        return true
    }

    var nextDeadline: Instant? { [progress?.due, outcome?.due].compactMap { $0 }.min() }

    mutating func poll(at now: Instant) -> Transmit? {
        if let t = Self.take(&progress, at: now) { return t }
        return Self.take(&outcome, at: now)
    }

    private static func take(_ entry: inout Entry?, at now: Instant) -> Transmit? {
        guard var e = entry, e.due <= now else { return nil }
        e.remaining -= 1
        e.due = now + interval
        entry = e.remaining > 0 ? e : nil
        // Block counts zero: the sender keeps those of the transfer (P-21b).
        let status = Status(session: e.target.session, receiver: e.target.receiver, state: e.state, reason: e.reason,
                            blocksDone: 0, blocksTotal: 0, bytesReceived: 0, nacksSent: 0)
        return Transmit(destination: .peer(e.target.sender), bytes: Datagram.status(status).encoded())
    }
}
