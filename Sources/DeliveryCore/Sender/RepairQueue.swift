import BundleFormat
import WireFormat

/// The repair the sender owes (Specs/protocol.md P-8, P-11, P-11a, P-16b): per
/// block, the symbols still to send this round, the most any receiver needed,
/// and the cursor that makes every repair symbol a fresh one.
struct RepairQueue {
    /// Blocks with repair to send, in order (auth-chain blocks go first).
    private var queue: [BlockKey] = []
    private var pending: [BlockKey: Int] = [:]
    /// needed[b] = max(needed) over the round's NACK entries, as served so far.
    private var suppliedThisRound: [BlockKey: Int] = [:]
    /// Per block, the next position in k..k+R-1, 0..k-1, ... (P-8).
    private var cursor: [BlockKey: Int] = [:]

    var isEmpty: Bool { queue.isEmpty }

    /// What one NACK entry adds to the queue: the need beyond what this round
    /// already supplies, plus `margin` when the block is first served in a round
    /// after the first pass. Returns the symbols queued (0: already served).
    mutating func enqueue(_ key: BlockKey, needed: Int, marginFraction: Double?) -> (queued: Int, margin: Int) {
        var supplied = suppliedThisRound[key] ?? 0
        // An auth-chain block asked for again after its repair went out was lost again:
        // serve it again rather than wait for the next round (Specs/protocol.md P-16b).
        if key.object == .authChain && pending[key] == nil { supplied = 0 }
        guard needed > supplied else { return (0, 0) }
        // Specs/protocol.md P-11a: after the first pass a round trip costs several GRTTs,
        // so repair first queued for a block in a round carries a margin against its own loss.
        let margin = marginFraction.map { suppliedThisRound[key] == nil ? Int((Double(needed) * $0).rounded(.up)) : 0 } ?? 0
        suppliedThisRound[key] = needed
        // The auth chain gates every payload symbol's check: its repair goes first.
        if pending[key] == nil {
            if key.object == .authChain { queue.insert(key, at: 0) } else { queue.append(key) }
        }
        pending[key, default: 0] += needed - supplied + margin
        return (needed - supplied + margin, margin)
    }

    /// Specs/protocol.md P-10: a new round serves needs afresh.
    mutating func startRound() { suppliedThisRound.removeAll() }

    /// Specs/protocol.md P-19a: a new NACK epoch forgets the needs served for blocks
    /// whose repair has all gone out, so a block asked for again is served again.
    mutating func startNackEpoch() { suppliedThisRound = suppliedThisRound.filter { pending[$0.key] != nil } }

    /// The next block to send a repair symbol of, and how many more are queued for
    /// it after this one (DATA's pending repair, P-18a).
    mutating func next() -> (key: BlockKey, pendingAfter: Int)? {
        while let key = queue.first {
            let left = pending[key] ?? 0
            if left <= 1 { queue.removeFirst(); pending[key] = nil } else { pending[key] = left - 1 }
            if left >= 1 { return (key, left - 1) }
        }
        return nil
    }

    /// Proactive repair of the first pass takes the cursor's first positions.
    mutating func advanceCursor(_ key: BlockKey) { cursor[key, default: 0] += 1 }

    /// Specs/protocol.md P-8: k_b..k_b+R-1, then 0..k_b-1, then again.
    mutating func nextFreshIndex(_ key: BlockKey, k: Int, r: Int) -> Int {
        let p = cursor[key, default: 0]
        cursor[key] = p + 1
        let q = p % (k + r)
        return q < r ? k + q : q - r
    }
}
