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
    /// The cookie for the reports' session (Specs/protocol.md P-30): the sender counts a
    /// STATUS only with it. A new process (after the reboot) gets one afresh: its first
    /// report asks with a REGISTER, and goes once the COOKIE comes.
    private var cookies: CookieJar?
    /// The REGISTER this device sends in a session (its ID, version, sequence).
    var registration: (SessionID, ReceiverID) -> Register = { Register(session: $0, receiver: $1, installedSequence: 0, deviceID: "", version: "") }
    /// Datagrams to send before the next report (a REGISTER, reports released by a COOKIE).
    private var queued: [Transmit] = []

    mutating func report(progress state: Status.State, to target: ReportTarget, at now: Instant) {
        progress = Entry(target: target, state: state, reason: .none, remaining: Self.progressRepeatCount, due: now)
    }

    mutating func report(outcome state: Status.State, reason: Status.Reason, to target: ReportTarget, at now: Instant) {
        progress = nil
        outcome = Entry(target: target, state: state, reason: reason, remaining: Self.outcomeRepeatMax, due: now)
    }

    /// A new install begins: what was still to be said of the last one is moot.
    mutating func clear() { progress = nil; outcome = nil }

    /// Whether `ack` acknowledges the outcome being reported (which is then done): its
    /// state, and the cookie only the sender knows (P-30c).
    mutating func acknowledge(_ ack: Ack) -> Bool {
        guard let o = outcome, ack.session == o.target.session, ack.receiver == o.target.receiver, ack.state == o.state,
              cookies?.accepts(ack) == true else { return false }
        outcome = nil
        return true
    }

    /// A COOKIE of the reports' session: what was held for it goes now. False if not ours.
    mutating func handle(_ c: Cookie, at now: Instant) -> Bool {
        guard var jar = cookies, let peer = jar.peer(for: c.session) else { return false }
        let registration = self.registration
        let receiver = jar.receiver
        let out = jar.handle(c, at: now) { registration($0, receiver) }
        cookies = jar
        guard let out else { return false }
        queued += out.map { Transmit(destination: .peer(peer), bytes: $0.encoded()) }
        return true
    }

    var nextDeadline: Instant? { queued.isEmpty ? [progress?.due, outcome?.due].compactMap { $0 }.min() : .zero }

    mutating func poll(at now: Instant) -> Transmit? {
        if !queued.isEmpty { return queued.removeFirst() }
        for status in [take(&progress, at: now), take(&outcome, at: now)].compactMap({ $0 }) {
            queued += stamped(status.status, to: status.peer, at: now)
        }
        return queued.isEmpty ? nil : queued.removeFirst()
    }

    private func take(_ entry: inout Entry?, at now: Instant) -> (status: Status, peer: PeerAddress)? {
        guard var e = entry, e.due <= now else { return nil }
        e.remaining -= 1
        e.due = now + Self.interval
        entry = e.remaining > 0 ? e : nil
        // Block counts zero: the sender keeps those of the transfer (P-21b).
        return (Status(session: e.target.session, receiver: e.target.receiver, state: e.state, reason: e.reason,
                       blocksDone: 0, blocksTotal: 0, bytesReceived: 0, nacksSent: 0), e.target.sender)
    }

    /// The STATUS with the session's cookie, or the REGISTER that asks for one (the STATUS held).
    private mutating func stamped(_ status: Status, to peer: PeerAddress, at now: Instant) -> [Transmit] {
        if cookies?.receiver != status.receiver { cookies = CookieJar(receiver: status.receiver) }
        let registration = self.registration
        let receiver = status.receiver
        return cookies!.outgoing(.status(status), to: peer, at: now) { registration($0, receiver) }
            .map { Transmit(destination: .peer(peer), bytes: $0.encoded()) }
    }
}
