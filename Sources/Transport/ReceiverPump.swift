import DeliveryCore
import SeededRandom
import WireFormat
#if canImport(Glibc)
import Glibc
#endif

/// Where a receiver listens (Specs/protocol.md §2).
public struct ReceiverEndpoint: Sendable {
    /// Group and port the sender multicasts to.
    public var group: SocketAddress
    /// The interface to join the group on (nil: the kernel's choice).
    public var interface: NetworkInterface?
    /// Large enough to ride out a scheduling hiccup at full rate.
    public var receiveBufferBytes = TransportLimits.socketBufferByteCountDefault
    /// Wake-up coalescing: after a wake that found the socket nearly empty,
    /// the next read waits at least this long, so that each system call
    /// carries a batch and the process is not woken per datagram: with many
    /// receivers sharing few cores, wake-ups dominate their CPU time. At
    /// 1 Gbit/s 5 ms is about 450 datagrams, a thirtieth of what the 16 MiB
    /// socket buffer holds; protocol timers work in multiples of the GRTT.
    /// Measured (16 receivers, 64 MiB, 5% loss): 2 ms -> 5 ms took receiver
    /// CPU from 0.57 s to 0.52 s.
    public var readIntervalMin = Interval.milliseconds(5)
    /// Take data coalesced by the kernel (UDP GRO) where it can: one message
    /// and one copy-out per run of datagrams instead of per datagram.
    public var coalesce = true
    /// Defaults: 16 MiB receive buffer, 5 ms read coalescing, GRO on.
    public init(group: SocketAddress, interface: NetworkInterface?) { self.group = group; self.interface = interface }
}

/// Drives a receiving `DatagramEndpoint` (DeviceAgent's `UpdateReceiver`, or
/// any other) on real sockets and the real clock (Specs/protocol.md §8.1):
/// multicast in on the group socket, feedback out (and ACKs in) on a unicast
/// socket of its own. It decides nothing: datagrams and time go in, the
/// endpoint's datagrams go out, and the endpoint's pending work runs between
/// reads.
public final class ReceiverPump {
    /// What the pump feeds.
    public let endpoint: DatagramEndpoint
    /// Bound to the group and port, joined on the interface.
    public let groupSocket: UDPSocket
    /// Feedback out and ACKs in, on an ephemeral port of its own.
    public let feedbackSocket: UDPSocket
    /// What the kernel granted of `receiveBufferBytes`.
    public let grantedReceiveBuffer: Int
    private let settings: ReceiverEndpoint
    /// Test and demo aid: drop this share of incoming DATA at random, to make repair visible.
    private let simulatedLoss: Double
    private var lossRandom: SeededRandom
    /// Data arrives coalesced where the kernel can (UDP GRO); feedback singly.
    private let groupIncoming: ReceiveBatch
    private let feedbackIncoming = ReceiveBatch(capacity: 16)
    /// Whether the group socket hands over coalesced datagrams (P-24a).
    public let coalescing: Bool
    /// Datagrams read from the group socket, and the messages they came in
    /// (fewer when the kernel coalesced them).
    public private(set) var groupDatagrams: UInt64 = 0
    /// (See `groupDatagrams`.)
    public private(set) var groupMessages: UInt64 = 0
    private let outgoing = SendBatch(capacity: 16)
    private var lastReadAt: Instant?
    private var lastReadWasSparse = false

    /// Opens and joins the sockets; `simulatedLoss` drops that share of DATA (tests, demos).
    public init(endpoint: DatagramEndpoint, settings: ReceiverEndpoint, simulatedLoss: Double = 0, seed: UInt64 = 1) throws(TransportError) {
        guard settings.group.isMulticast else { throw TransportError(.invalidAddress, "\(settings.group) is not a multicast group") }
        self.endpoint = endpoint
        self.settings = settings
        self.simulatedLoss = simulatedLoss
        lossRandom = SeededRandom(seed: seed ^ 0x5EED)
        groupSocket = try UDPSocket(family: settings.group.family)
        try groupSocket.allowAddressReuse()
        grantedReceiveBuffer = try groupSocket.setBuffers(receive: settings.receiveBufferBytes, send: 0).receive
        // Bound to the group address, so only this group's datagrams arrive.
        try groupSocket.bind(settings.group)
        try groupSocket.join(group: settings.group, on: settings.interface)
        coalescing = settings.coalesce && groupSocket.enableCoalescing()
        // Specs/protocol.md P-25a: a POLL's hold time includes its wait in the queue.
        _ = groupSocket.enableArrivalTimestamps()
        groupIncoming = coalescing ? ReceiveBatch(coalesced: true) : ReceiveBatch()
        feedbackSocket = try UDPSocket(family: settings.group.family)
        try feedbackSocket.bind(.any(settings.group.family, port: 0))
    }

    /// Runs until the endpoint is done or `shouldStop` says so; calls `tick` at
    /// least every `tickInterval` (progress lines, the caller's own deadlines).
    public func run(tickInterval: Interval = .milliseconds(250), tick: (Instant) -> Void = { _ in },
                    shouldStop: () -> Bool = { false }) throws(TransportError) {
        var nextTick = MonotonicClock.now()
        while !endpoint.isDone {
            if shouldStop() { return }
            let now = MonotonicClock.now()
            var wake = [endpoint.nextDeadline, nextTick].compactMap { $0 }.min()!
            if wake < now { wake = now }
            // Pending work (step 2's read-backs): look at the sockets without waiting, then do it.
            let work = endpoint.hasPendingWork
            if work { wake = now }
            if !work, lastReadWasSparse, let last = lastReadAt, now < last + settings.readIntervalMin {
                let pause = min(last + settings.readIntervalMin, wake) - now
                if pause.microseconds > 0 { usleep(UInt32(pause.microseconds)) }
            }
            let ready = waitReadable([groupSocket, feedbackSocket], until: wake)
            lastReadAt = MonotonicClock.now()
            lastReadWasSparse = true
            for i in ready {
                if i == 0 { try drain(groupSocket, groupIncoming) } else { try drain(feedbackSocket, feedbackIncoming) }
            }
            let after = MonotonicClock.now()
            if let d = endpoint.nextDeadline, after >= d { endpoint.handleTimeout(at: after) }
            if endpoint.hasPendingWork {
                // What is due goes out before the work, which may block for a while (P-21).
                flushFeedback()
                endpoint.performPendingWork(at: MonotonicClock.now())
            }
            flushFeedback()
            if after >= nextTick {
                tick(after)
                nextTick = after + tickInterval
            }
        }
        flushFeedback()
        tick(MonotonicClock.now())
    }

    private func drain(_ socket: UDPSocket, _ incoming: ReceiveBatch) throws(TransportError) {
        // Bounded per wake: timers and feedback get their turn under a flood.
        for _ in 0..<8 {
            guard try socket.receive(into: incoming) > 0 else { return }
            if socket === groupSocket { groupDatagrams += UInt64(incoming.count); groupMessages += UInt64(incoming.messageCount) }
            let now = MonotonicClock.now()
            for i in 0..<incoming.count {
                guard let bytes = incoming.datagram(i) else { continue }
                if simulatedLoss > 0, bytes.count > 1, bytes[1] == Datagram.Kind.data.rawValue, lossRandom.unit() < simulatedLoss { continue }
                endpoint.handleDatagram(bytes, from: incoming.peer(i), at: now, arrivedAt: incoming.age(i).map { now - $0 } ?? now)
                queueFeedback()
            }
            flushFeedback()
            if incoming.messageCount < incoming.capacity / 2 { return }
            lastReadWasSparse = false
        }
    }

    /// Moves the endpoint's datagrams into the send batch, sending a full batch as it goes.
    private func queueFeedback() {
        while let t = endpoint.pollTransmit() {
            guard case .peer(let peer) = t.destination else { continue }  // a receiver multicasts nothing
            if outgoing.isFull { sendBatch() }
            outgoing.append(t.bytes, to: SocketAddress(peer))
        }
    }

    private func flushFeedback() {
        queueFeedback()
        sendBatch()
    }

    /// Feedback is best effort: what the kernel will not take now is dropped (the core
    /// repeats what matters).
    private func sendBatch() {
        guard outgoing.count > 0 else { return }
        _ = try? feedbackSocket.send(outgoing)
        outgoing.removeFirst(outgoing.count)
    }
}
