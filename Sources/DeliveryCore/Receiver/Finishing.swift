import BundleFormat
import WireFormat

/// A session whose transfer is over (Specs/protocol.md P-21): every block in and
/// step 2 running (`verdict` nil), or verified, or failed. It reports to the
/// sender, STATUS after STATUS, until an ACK (or a bounded number of times, or a
/// CLOSE followed by quiet). The joined session's data is gone; what the report
/// needs was copied here.
struct Finishing {
    enum Timer: Int, CaseIterable { case status, closeConfirm }

    let id: SessionID
    /// P-31: only verified POLL and CLOSE (and signed records) speak for the sender.
    let authenticated: Bool
    let carousel: Bool
    let sender: PeerAddress
    var grtt: Interval
    /// Nil while step 2 runs.
    private(set) var verdict: Verdict?
    let report: StatusReport
    /// Segments still held when the transfer ended (P-5b: none for a complete one).
    let segmentsHeldAtEnd: Int
    var timers = TimerTable<Timer>()
    private var finalStatusCount = 0
    /// The final STATUS was ACKed, repeated `statusRepeatMax` times, or made moot by a CLOSE.
    private(set) var acknowledged = false
    /// A CLOSE was confirmed by quiet while step 2 ran: the sender has gone.
    private var senderGone = false

    /// Every block verified: step 2's verdict is awaited. STATUS keeps its period
    /// (reporting `received`), so that the sender does not take the device for gone.
    init(completed s: Session) {
        id = s.id; authenticated = s.authenticated; carousel = s.carousel; sender = s.sender; grtt = s.grtt
        report = s.report
        segmentsHeldAtEnd = s.chain.segmentsHeld
        timers[.status] = s.carousel ? nil : s.timers[.status]
        timers[.closeConfirm] = s.timers[.closeConfirm]
    }

    /// Specs/protocol.md P-21: the first STATUS `received` goes out at once, before
    /// the device finishes step 2: that end (a large fsync, a slot read back) may
    /// take seconds in which nothing is sent, and the sender must know by then that
    /// every block is in (it allows `stepTwoSilenceMax` for it, not `receiverSilenceMax`).
    mutating func reportReceived(at now: Instant, receiver r: inout Receiver) {
        guard !carousel else { return }
        r.sendStatus(.received, .none, session: id, report: report, to: sender, at: now)
        timers[.status] = now + r.config.statusInterval
    }

    /// The session failed before its transfer completed.
    init(failed s: Session, reason: Status.Reason, text: String, at now: Instant, config: ReceiverConfig) {
        id = s.id; authenticated = s.authenticated; carousel = s.carousel; sender = s.sender; grtt = s.grtt
        report = s.report
        segmentsHeldAtEnd = s.chain.segmentsHeld
        // A CLOSE heard and not yet cancelled still counts: once confirmed (as it is
        // when it ended the session) the sender is gone and the STATUS stops.
        timers[.closeConfirm] = s.timers[.closeConfirm]
        decide(.failed(reason, text), at: now, config: config)
    }

    var isFinished: Bool { verdict != nil && acknowledged }

    /// The outcome is known: the final STATUS goes out now, then until ACKed.
    mutating func decide(_ v: Verdict, at now: Instant, config: ReceiverConfig) {
        verdict = v
        acknowledged = carousel || senderGone
        timers[.status] = acknowledged ? nil : now
    }

    private var statusState: (Status.State, Status.Reason) {
        switch verdict {
        case nil: (.received, .none)
        case .verified?: (.complete, .none)
        case .failed(let reason, _)?: (.failed, reason)
        }
    }

    mutating func handleTimeout(at now: Instant, receiver r: inout Receiver) {
        if timers.isDue(.status, at: now) {
            let (state, reason) = statusState
            r.sendStatus(state, reason, session: id, report: report, to: sender, at: now)
            if verdict == nil {
                timers[.status] = now + r.config.statusInterval
            } else {
                finalStatusCount += 1
                timers[.status] = finalStatusCount < r.config.statusRepeatMax ? now + r.config.statusInterval : nil
                if timers[.status] == nil { acknowledged = true }  // bounded: give up waiting for the ACK
            }
        }
        // Specs/protocol.md P-21: a CLOSE followed by quiet: the sender has gone and
        // will ACK nothing, so the STATUS stops repeating.
        if timers.isDue(.closeConfirm, at: now) {
            timers[.closeConfirm] = nil
            timers[.status] = nil
            if verdict == nil { senderGone = true } else { acknowledged = true }
            r.stats.finalStatusEndedByClose += 1
        }
    }
}

extension Receiver {
    /// A datagram once the transfer is over: only the sender's liveness, CLOSE and
    /// ACK matter (Specs/protocol.md P-21, P-13a).
    mutating func handleFinishing(_ datagram: Datagram, at now: Instant) {
        var f = takeFinishing()
        defer { put(f) }
        guard datagram.sessionID == f.id else { stats.drops.add(.otherSession); return }
        if f.authenticated {
            // P-31: an unsigned ANNOUNCE proves nothing; POLL and CLOSE count only verified.
            if datagram.kind == .announce { return }
            guard verifiesChain(datagram, f.id, at: now) else { stats.drops.add(.unauthenticatedControl); return }
        }
        // An ANNOUNCE or POLL says the sender is alive, so a CLOSE heard after the final
        // STATUS was forged: keep repeating the STATUS until ACKed. (DATA does not count
        // here: a finished receiver no longer checks its tags.)
        if datagram.kind == .announce || datagram.kind == .poll { f.timers[.closeConfirm] = nil }
        switch datagram {
        case .announce(let a): f.grtt = Self.clampGRTT(a.grttMicroseconds)
        case .data: stats.drops.add(.notReceiving)
        case .poll: return
        case .close:
            // A closed sender will not ACK, but the CLOSE counts only once the session stays
            // quiet after it (P-13a): a forged CLOSE must not silence a receiver whose
            // STATUS the sender has not heard.
            if !f.acknowledged, f.timers[.closeConfirm] == nil { f.timers[.closeConfirm] = now + max(config.closeConfirmQuiet, f.grtt * 8) }
        case .ack(let a):
            // Specs/protocol.md P-30c: only the sender knows this receiver's cookie.
            guard cookies.accepts(a) else { stats.drops.add(.forgedAck); return }
            if (f.verdict == .verified && a.state == .complete) || (f.isFailedVerdict && a.state == .failed) { f.acknowledge() }
        case .register, .nack, .status: stats.drops.add(.feedbackFromPeer)
        case .cookie, .session: return
        }
    }
}

extension Finishing {
    var isFailedVerdict: Bool { if case .failed? = verdict { true } else { false } }

    mutating func acknowledge() {
        acknowledged = true
        timers[.status] = nil
    }
}
