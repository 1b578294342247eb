import DeliveryCore
import SeededRandom

/// How one direction of one link treats datagrams. Every random choice
/// draws from the simulation's seeded generator.
public struct LinkModel: Sendable, CustomStringConvertible {
    public enum Loss: Sendable {
        case none
        case bernoulli(Double)
        /// Two-state burst loss: good -> bad with `enterBad`, bad -> good with `leaveBad`;
        /// loss probability `lossGood` / `lossBad` in each state.
        case gilbertElliott(enterBad: Double, leaveBad: Double, lossGood: Double, lossBad: Double)
        case dead

        /// Long-run loss rate.
        public var rate: Double {
            switch self {
            case .none: 0
            case .bernoulli(let p): p
            case .gilbertElliott(let enter, let leave, let good, let bad):
                (leave * good + enter * bad) / (enter + leave)
            case .dead: 1
            }
        }
    }

    public var loss: Loss = .none
    public var delay = Interval(microseconds: 200)
    /// Uniform extra delay in [0, jitter): reorders datagrams.
    public var jitter = Interval(microseconds: 0)
    public var duplicateProbability = 0.0
    /// Flip one random bit of the datagram.
    public var corruptProbability = 0.0

    public init(loss: Loss = .none, delay: Interval = Interval(microseconds: 200), jitter: Interval = Interval(microseconds: 0),
                duplicateProbability: Double = 0, corruptProbability: Double = 0) {
        self.loss = loss; self.delay = delay; self.jitter = jitter
        self.duplicateProbability = duplicateProbability; self.corruptProbability = corruptProbability
    }

    public var isDead: Bool { if case .dead = loss { true } else { false } }

    public var description: String {
        let l: String = switch loss {
        case .none: "no loss"
        case .bernoulli(let p): "loss \(Int((p * 100).rounded()))%"
        case .gilbertElliott: "burst loss \(String(Int((loss.rate * 1000).rounded())))‰"
        case .dead: "dead"
        }
        return "\(l), delay \(delay.microseconds)µs+\(jitter.microseconds)µs, dup \(duplicateProbability), corrupt \(corruptProbability)"
    }
}

/// The state of one link direction (the Gilbert-Elliott chain's state).
struct LinkState {
    var model: LinkModel
    var bad = false
    /// Datagrams offered to this link and lost on it: the realized loss rate.
    var offered: UInt64 = 0
    var lost: UInt64 = 0
    var realizedLoss: Double { offered == 0 ? 0 : Double(lost) / Double(offered) }

    /// Decides the fate of one datagram: the delays of its copies (none if lost), and whether to corrupt each.
    mutating func transmit(_ rng: inout SeededRandom) -> [(Interval, Bool)] {
        let lost: Bool
        switch model.loss {
        case .none: lost = false
        case .dead: lost = true
        case .bernoulli(let p): lost = rng.unit() < p
        case .gilbertElliott(let enter, let leave, let good, let badLoss):
            bad = bad ? rng.unit() >= leave : rng.unit() < enter
            lost = rng.unit() < (bad ? badLoss : good)
        }
        offered += 1
        if lost { self.lost += 1; return [] }
        var copies = 1
        if model.duplicateProbability > 0 && rng.unit() < model.duplicateProbability { copies = 2 }
        return (0..<copies).map { _ in
            let extra = model.jitter.microseconds > 0 ? rng.next() % model.jitter.microseconds : 0
            return (model.delay + Interval(microseconds: extra), model.corruptProbability > 0 && rng.unit() < model.corruptProbability)
        }
    }
}

/// A binary min-heap of timed events, FIFO among equal times.
struct EventQueue<Event> {
    private var heap: [(time: UInt64, seq: UInt64, event: Event)] = []
    private var seq: UInt64 = 0

    var isEmpty: Bool { heap.isEmpty }
    var count: Int { heap.count }

    mutating func push(_ time: Instant, _ event: Event) {
        seq += 1
        heap.append((time.microseconds, seq, event))
        var i = heap.count - 1
        while i > 0 {
            let parent = (i - 1) / 2
            guard less(i, parent) else { break }
            heap.swapAt(i, parent)
            i = parent
        }
    }

    mutating func pop() -> (Instant, Event)? {
        guard !heap.isEmpty else { return nil }
        heap.swapAt(0, heap.count - 1)
        let top = heap.removeLast()
        var i = 0
        while true {
            let l = 2 * i + 1, r = l + 1
            var m = i
            if l < heap.count && less(l, m) { m = l }
            if r < heap.count && less(r, m) { m = r }
            if m == i { break }
            heap.swapAt(i, m)
            i = m
        }
        return (Instant(microseconds: top.time), top.event)
    }

    private func less(_ a: Int, _ b: Int) -> Bool {
        heap[a].time < heap[b].time || (heap[a].time == heap[b].time && heap[a].seq < heap[b].seq)
    }
}
