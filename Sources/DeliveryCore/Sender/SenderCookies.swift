import FleetCrypto
import WireFormat

/// The sender's side of the feedback cookie (Specs/protocol.md §3.9, P-30): stateless
/// COOKIE replies, and the binding of a receiver ID to the address it proved.
extension Sender {
    /// HMAC(secret, session, receiver, address, port, epoch), its first 16 bytes.
    func cookie(for id: ReceiverID, _ peer: PeerAddress, epoch: UInt64) -> FeedbackCookie {
        var m = Array("fleetcast cookie".utf8)
        m.append(peer.family == .ipv6 ? 6 : 4)
        for v in [UInt64(config.session.rawValue), id.rawValue, peer.high, peer.low, UInt64(peer.port), UInt64(peer.scopeID), epoch] {
            for shift in stride(from: 56, through: 0, by: -8) { m.append(UInt8(truncatingIfNeeded: v >> UInt64(shift))) }
        }
        var c = Array(HMAC.sha256(key: config.cookieSecret, message: m).prefix(FeedbackCookie.byteCount))
        if c.allSatisfy({ $0 == 0 }) { c[0] = 1 }  // never the "none" cookie
        return FeedbackCookie(c)
    }

    func epoch(at now: Instant) -> UInt64 { now.microseconds / max(config.cookieLifetime.microseconds, 1) }

    /// A cookie this sender made for this receiver at this address, in this epoch or the last.
    func isValid(_ c: FeedbackCookie, for id: ReceiverID, from peer: PeerAddress, at now: Instant) -> Bool {
        guard !c.isNone else { return false }
        let e = epoch(at: now)
        return c == cookie(for: id, peer, epoch: e) || (e > 0 && c == cookie(for: id, peer, epoch: e - 1))
    }

    /// COOKIE to `peer`, within `cookieRepliesPerSecondMax`; nothing is remembered of it.
    mutating func replyCookie(to id: ReceiverID, _ peer: PeerAddress, at now: Instant) {
        let second = now.microseconds / 1_000_000
        if second != cookieSecond { cookieSecond = second; cookiesThisSecond = 0 }
        guard cookiesThisSecond < config.cookieRepliesPerSecondMax else { stats.drops.add(.cookieRateLimited); return }
        cookiesThisSecond += 1
        stats.cookiesSent += 1
        control.append(Transmit(destination: .peer(peer), bytes: Datagram.cookie(Cookie(
            session: config.session, receiver: id, cookie: cookie(for: id, peer, epoch: epoch(at: now)))).encoded()))
    }

    /// The record of a receiver that registered with a valid cookie (P-30a): new, the
    /// same one again (from another port of the same host: restarted), or moved to
    /// another host after its old one went silent. A live record on another host keeps
    /// its binding (a collision, counted).
    mutating func bind(_ id: ReceiverID, cookie c: FeedbackCookie, from peer: PeerAddress, at now: Instant) -> ReceiverRecord? {
        if var r = receivers[id] {
            if r.address != peer {
                // The same host from another port is the receiver restarted (a new socket);
                // another host takes the ID over only once the old binding went silent.
                guard r.address.hostOnly == peer.hostOnly || now >= r.lastHeard + config.receiverSilenceMax else {
                    stats.drops.add(.receiverIDCollision)
                    return nil
                }
                stats.receiversRebound += 1
                addressCounts[r.address.hostOnly, default: 1] -= 1
                addressCounts[peer.hostOnly, default: 0] += 1
                r.address = peer
            }
            r.cookie = c
            r.lastHeard = now
            return r
        }
        guard receivers.count < config.receiverTableSizeMax else { stats.drops.add(.receiverTableFull); return nil }
        guard addressCounts[peer.hostOnly, default: 0] < config.receiversPerAddressMax else { stats.drops.add(.receiversPerAddress); return nil }
        addressCounts[peer.hostOnly, default: 0] += 1
        stats.receiversRegistered += 1
        lastNewReceiverAt = now
        return ReceiverRecord(id: id, address: peer, cookie: c, firstHeard: now, lastHeard: now)
    }

    /// The record NACK or STATUS feedback speaks for, if it comes from where that
    /// receiver registered and carries its cookie (P-30b); otherwise dropped, and the
    /// sender says how to register (a receiver that moved, or lost its cookie).
    mutating func boundRecord(_ id: ReceiverID, _ c: FeedbackCookie, from peer: PeerAddress, at now: Instant) -> ReceiverRecord? {
        guard var r = receivers[id], r.address == peer, r.cookie == c else {
            stats.drops.add(.unbound)
            replyCookie(to: id, peer, at: now)
            return nil
        }
        r.lastHeard = now
        return r
    }
}
