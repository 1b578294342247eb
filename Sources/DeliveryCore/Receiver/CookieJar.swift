import WireFormat

/// A receiver's feedback cookies (Specs/protocol.md §3.9, P-30): per session, the
/// cookie the sender gave it, and the NACK and STATUS datagrams waiting for one.
///
/// The sender counts feedback only with the cookie it made for this receiver ID at
/// this address, which only a host that receives at that address can learn: a LAN
/// attacker who spoofs addresses cannot speak for a receiver, fill the sender's
/// table or report a device done. Feedback for a session without a cookie yet is
/// held (bounded) and a REGISTER without a cookie asks for one; the COOKIE answer
/// releases it. Pure: time comes in, datagrams go out. Used by `Receiver` and by a
/// device agent's outcome reports after a reboot.
public struct CookieJar: Sendable {
    struct Entry: Sendable {
        var peer: PeerAddress
        var cookie: FeedbackCookie?
        var lastRequestAt: Instant?
        var held: [Datagram] = []
        var lastUsedAt: Instant
    }

    public let receiver: ReceiverID
    private var entries: [SessionID: Entry] = [:]

    /// Named limits: sessions with a cookie or a request under way (the oldest goes),
    /// feedback datagrams held per session waiting for a cookie (the oldest NACKs go
    /// first: later ones ask again), and the least time between two requests.
    public static let sessionsMax = 4
    public static let heldDatagramsMax = 16
    public static let requestIntervalMin = Interval.milliseconds(100)

    public init(receiver: ReceiverID) { self.receiver = receiver }

    /// The cookie held for `session`, if any.
    public func cookie(for session: SessionID) -> FeedbackCookie? { entries[session]?.cookie }

    /// A cookie kept from before (a device agent's record across a reboot).
    public mutating func remember(_ cookie: FeedbackCookie, session: SessionID, peer: PeerAddress, at now: Instant) {
        withEntry(session, peer, at: now) { $0.cookie = cookie.isNone ? nil : cookie }
    }

    /// What to send for feedback `d` (NACK or STATUS) to `peer` now: `d` with the
    /// session's cookie; or, without one, a REGISTER asking for it (at most one per
    /// `requestIntervalMin`), `d` held until the COOKIE comes. REGISTER and anything
    /// else go as they are, a REGISTER with the cookie if there is one.
    public mutating func outgoing(_ d: Datagram, to peer: PeerAddress, at now: Instant, registration: (SessionID) -> Register) -> [Datagram] {
        let session = d.sessionID
        switch d {
        case .register(var r):
            return withEntry(session, peer, at: now) { e in
                r.cookie = e.cookie ?? .none
                if e.cookie == nil { e.lastRequestAt = now }
                return [.register(r)]
            }
        case .nack, .status:
            return withEntry(session, peer, at: now) { e in
                if let c = e.cookie { return [Self.stamped(d, c)] }
                e.held.append(d)
                if e.held.count > Self.heldDatagramsMax {
                    // A STATUS says where the receiver stands: keep the latest ones, drop NACKs first.
                    let nack = e.held.firstIndex { if case .nack = $0 { true } else { false } }
                    e.held.remove(at: nack ?? 0)
                }
                guard e.lastRequestAt.map({ now >= $0 + Self.requestIntervalMin }) ?? true else { return [] }
                e.lastRequestAt = now
                return [.register(registration(session))]
            }
        case .announce, .data, .poll, .close, .ack, .cookie, .session:
            return [d]
        }
    }

    /// A COOKIE for this receiver in a session it asked: the cookie is kept, then a
    /// REGISTER with it (the sender binds the receiver now), then the held feedback.
    /// A COOKIE for a session it has a cookie for replaces it: the sender no longer
    /// accepts the old one (the receiver's address changed). Nil if it is not ours.
    public mutating func handle(_ c: Cookie, at now: Instant, registration: (SessionID) -> Register) -> [Datagram]? {
        guard c.receiver == receiver, var e = entries[c.session] else { return nil }
        e.cookie = c.cookie
        e.lastUsedAt = now
        let held = e.held
        e.held = []
        entries[c.session] = e
        var r = registration(c.session)
        r.cookie = c.cookie
        return [.register(r)] + held.map { Self.stamped($0, c.cookie) }
    }

    /// Whether an ACK carries this receiver's cookie for its session (P-30c).
    public func accepts(_ ack: Ack) -> Bool {
        ack.receiver == receiver && !ack.cookie.isNone && entries[ack.session]?.cookie == ack.cookie
    }

    /// Where feedback of `session` goes, if the jar knows.
    public func peer(for session: SessionID) -> PeerAddress? { entries[session]?.peer }

    /// Runs `body` on the entry of `session` (made if new, the least recently used one
    /// going when there are `sessionsMax`); a new feedback address starts it afresh,
    /// since a cookie is for one address.
    private mutating func withEntry<R>(_ session: SessionID, _ peer: PeerAddress, at now: Instant, _ body: (inout Entry) -> R) -> R {
        if entries[session] == nil, entries.count >= Self.sessionsMax,
           let oldest = entries.min(by: { $0.value.lastUsedAt < $1.value.lastUsedAt })?.key {
            entries[oldest] = nil
        }
        var e = entries[session].flatMap { $0.peer == peer ? $0 : nil } ?? Entry(peer: peer, lastUsedAt: now)
        e.lastUsedAt = now
        let result = body(&e)
        entries[session] = e
        return result
    }

    private static func stamped(_ d: Datagram, _ c: FeedbackCookie) -> Datagram {
        switch d {
        case .nack(var n): n.cookie = c; return .nack(n)
        case .status(var s): s.cookie = c; return .status(s)
        case .register(var r): r.cookie = c; return .register(r)
        case .announce, .data, .poll, .close, .ack, .cookie, .session: return d
        }
    }
}
