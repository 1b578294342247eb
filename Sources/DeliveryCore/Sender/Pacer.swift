/// The sender's rate control (Specs/protocol.md P-9): every datagram it
/// multicasts spends its wire size from two token buckets and goes only when
/// both hold it; while source symbols remain, repair also spends from a bucket
/// of its own, so that a NACK flood cannot starve the first pass.
struct Pacer {
    let rateBytesPerSecond: Double
    let peakRateFactor: Double
    let repairShareMax: Double
    /// A full data datagram on the wire (UDP payload plus 28 bytes of IPv4/UDP header).
    let datagramWireBytes: Double
    /// The sustained bucket's depth: `burstDuration` of the rate, within bounds.
    private let burstBytes: Double
    /// The peak bucket: `peakBurstDatagramCount` datagrams deep, filled at `peakRateFactor` x the rate.
    private let peakBytes: Double
    private var tokens: Double
    private var peakTokens: Double
    private var repairTokens: Double
    private var lastRefill: Instant?

    init(config: SenderConfig, datagramWireBytes: Double) {
        precondition(config.rateBytesPerSecond > 0 && datagramWireBytes > 0)
        rateBytesPerSecond = config.rateBytesPerSecond
        peakRateFactor = config.peakRateFactor
        repairShareMax = config.repairShareMax
        self.datagramWireBytes = datagramWireBytes
        let burst = config.rateBytesPerSecond * config.burstDuration.seconds / datagramWireBytes
        burstBytes = datagramWireBytes * min(max(burst.rounded(.up), Double(SenderConfig.burstDatagramCountMin)),
                                             Double(SenderConfig.burstDatagramCountMax))
        // The depth is for catching up after a late wake-up, not for a burst at the start.
        tokens = min(burstBytes, Double(SenderConfig.burstDatagramCountMin) * datagramWireBytes)
        peakBytes = Double(SenderConfig.peakBurstDatagramCount) * datagramWireBytes
        peakTokens = peakBytes
        repairTokens = tokens * config.repairShareMax
    }

    mutating func refill(at now: Instant) {
        if let last = lastRefill, now > last {
            let earned = Double((now - last).microseconds) / 1e6 * rateBytesPerSecond
            tokens = min(burstBytes, tokens + earned)
            peakTokens = min(peakBytes, peakTokens + earned * peakRateFactor)
            repairTokens = min(burstBytes * repairShareMax, repairTokens + earned * repairShareMax)
        }
        lastRefill = now
    }

    /// Whether a data datagram may go now.
    var canSendData: Bool { tokens >= datagramWireBytes && peakTokens >= datagramWireBytes }

    /// Whether a control datagram of `cost` wire bytes may go now: small ones go
    /// whenever a data datagram could.
    func canSendControl(cost: Double) -> Bool {
        (tokens >= cost || tokens >= datagramWireBytes) && peakTokens >= datagramWireBytes
    }

    /// Whether first-pass repair may take its share now (P-9).
    var repairShareAvailable: Bool { repairTokens >= datagramWireBytes }

    /// A multicast datagram of `bytes` on the wire spends from both buckets.
    mutating func debit(_ bytes: Double) {
        tokens -= bytes
        peakTokens -= bytes
    }

    mutating func debitRepairShare() { repairTokens -= datagramWireBytes }

    /// When the buckets will next hold a data datagram.
    func nextSendTime(after now: Instant) -> Instant {
        let wait = max((datagramWireBytes - tokens) / rateBytesPerSecond,
                       (datagramWireBytes - peakTokens) / (rateBytesPerSecond * peakRateFactor))
        return wait <= 0 ? now : now + Interval(microseconds: UInt64((wait * 1e6).rounded(.up)))
    }
}
