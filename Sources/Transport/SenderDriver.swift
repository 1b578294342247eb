import DeliveryCore
import WireFormat

/// Where and how the sender's socket sends (Specs/protocol.md §2).
public struct SenderEndpoint: Sendable {
    public var group: SocketAddress
    public var interface: NetworkInterface?
    /// The sender's own address and port: receivers send feedback here (announce address family 0).
    public var bindAddress: SocketAddress
    public var ttl = 1
    /// Deliver copies to receivers on this host too (needed on loopback and in one-host demos).
    public var multicastLoopback = true
    public var sendBufferBytes = 1 << 20
    public var receiveBufferBytes = 4 << 20
    /// Hand runs of data datagrams to the kernel as one message to segment
    /// (UDP GSO, Specs/protocol.md P-24a): one trip through the stack per run
    /// instead of per datagram. Falls back by itself where the path cannot.
    public var segmentation = true

    public init(group: SocketAddress, interface: NetworkInterface?, bindAddress: SocketAddress) {
        self.group = group; self.interface = interface; self.bindAddress = bindAddress
    }
}

/// A snapshot for the progress line and the final report.
public struct SenderProgress: Sendable {
    public var elapsed: Interval
    public var round: UInt32
    /// The sender's group round-trip estimate; rounds last a few of them.
    public var grtt: Interval
    public var dataBytesSent: UInt64
    public var controlBytesSent: UInt64
    public var feedbackBytesReceived: UInt64
    public var datagramsSent: UInt64
    public var sendStalls: UInt64
    public var registered: Int
    /// Every block in, step 2 running on the device.
    public var received: Int
    /// Step 2 passed on the device.
    public var verified: Int
    public var failed: Int
    public var cpuSeconds: Double
}

/// Drives the sans-I/O `Sender` over one UDP socket: multicast out, unicast
/// feedback in, on the real monotonic clock (../shared/DESIGN.md decision 9).
/// All protocol decisions stay in the core; this loop only moves bytes and time.
public final class SenderDriver {
    public private(set) var sender: Sender
    public let endpoint: SenderEndpoint
    public let socket: UDPSocket
    public let grantedBuffers: (receive: Int, send: Int)
    private let objects: FileObjects?
    private let batch = SendBatch()
    private let incoming = ReceiveBatch()
    private var stats = (datagrams: UInt64(0), stalls: UInt64(0))
    /// When the driver started the session (the fleet report measures from here).
    public let startedAt: Instant
    private let cpuAtStart: Double

    public init(sender: Sender, objects: FileObjects?, endpoint: SenderEndpoint) throws(TransportError) {
        self.sender = sender
        self.objects = objects
        self.endpoint = endpoint
        guard endpoint.group.isMulticast else { throw TransportError(.invalidAddress, "\(endpoint.group) is not a multicast group") }
        guard endpoint.group.family == endpoint.bindAddress.family else {
            throw TransportError(.invalidAddress, "group \(endpoint.group) and bind address \(endpoint.bindAddress) are of different families")
        }
        socket = try UDPSocket(family: endpoint.group.family)
        grantedBuffers = try socket.setBuffers(receive: endpoint.receiveBufferBytes, send: endpoint.sendBufferBytes)
        try socket.setMulticastOutput(interface: endpoint.interface, ttl: endpoint.ttl, loopback: endpoint.multicastLoopback)
        socket.segmentation = endpoint.segmentation
        try socket.bind(endpoint.bindAddress)
        // Specs/protocol.md P-31: a signed record names where feedback goes: the bound
        // address, or the interface's when bound to every address.
        if sender.isAuthenticated && sender.feedbackAddress == nil {
            let local = try socket.localAddress().peer
            var named: PeerAddress? = (local.high != 0 || local.low != 0) ? local : nil
            if named == nil, let interface = endpoint.interface { named = interface.address(endpoint.group.family, port: local.port) }
            guard let named else {
                throw TransportError(.invalidAddress, "an authenticated session names its feedback address: bind to one (--bind HOST) or name an interface that has one")
            }
            self.sender.nameFeedbackAddress(named)
        }
        // Specs/protocol.md P-25a: a NACK's round-trip sample leaves out its wait in the queue.
        _ = socket.enableArrivalTimestamps()
        startedAt = MonotonicClock.now()
        cpuAtStart = MonotonicClock.processCPUSeconds()
    }

    public var localAddress: SocketAddress? { try? socket.localAddress() }

    /// Runs until the session is finished, `shouldStop` says so, or an error.
    /// Calls `progress` at most every `progressInterval`.
    public func run(progressInterval: Interval = .milliseconds(250), progress: (SenderProgress) -> Void = { _ in },
                    shouldStop: () -> Bool = { false }) throws(TransportError) {
        var nextProgress = MonotonicClock.now()
        while !sender.isFinished {
            if shouldStop() { break }
            var now = MonotonicClock.now()
            sender.handleTimeout(at: now)
            // Fill and send one batch; what the kernel refuses waits in the batch.
            while !batch.isFull, let t = sender.pollTransmit(at: now) {
                guard let to = destination(t.destination) else { continue }
                batch.append(t.bytes, to: to)
            }
            if let failure = objects?.failure { throw failure }
            if batch.count > 0 {
                let n = try socket.send(batch)
                stats.datagrams += UInt64(n)
                if n < batch.count { stats.stalls += 1 }
                batch.removeFirst(n)
            }
            try receiveFeedback()
            now = MonotonicClock.now()
            if now >= nextProgress {
                progress(snapshot(at: now))
                nextProgress = now + progressInterval
            }
            let deadline = sender.nextDeadline(at: now)
            // Everything went out and the core has more now: no sleep.
            if batch.count == 0, let deadline, deadline <= now { continue }
            // Sleep until the core has work, feedback arrives, or (when the kernel's
            // buffer was full, even with a full batch) a short back-off passes.
            var wake = deadline ?? (now + .milliseconds(100))
            if batch.count > 0 { wake = min(wake, now + Interval(microseconds: 200)) }
            _ = waitReadable([socket], until: min(wake, nextProgress))
        }
        progress(snapshot(at: MonotonicClock.now()))
    }

    private func destination(_ d: Destination) -> SocketAddress? {
        switch d {
        case .group: endpoint.group
        case .peer(let peer): SocketAddress(peer)
        }
    }

    private func receiveFeedback() throws(TransportError) {
        // Bounded per wake so feedback floods cannot starve sending.
        for _ in 0..<4 {
            guard try socket.receive(into: incoming) > 0 else { return }
            let now = MonotonicClock.now()
            for i in 0..<incoming.count {
                guard let bytes = incoming.datagram(i) else { continue }
                // The core keeps each receiver's address (P-22): the datagram is parsed once.
                sender.handleDatagram(bytes, from: incoming.peer(i), at: now, arrivedAt: incoming.age(i).map { now - $0 })
            }
        }
    }

    public func snapshot(at now: Instant) -> SenderProgress {
        let fleet = sender.fleet(at: now)
        let sent = sender.stats
        return SenderProgress(elapsed: now - startedAt, round: sender.round, grtt: sender.currentGRTT, dataBytesSent: sent.dataBytes,
                              controlBytesSent: sent.controlBytes, feedbackBytesReceived: sent.feedbackBytes,
                              datagramsSent: stats.datagrams, sendStalls: stats.stalls, registered: fleet.count,
                              received: fleet.filter { $0.standing == .received }.count,
                              verified: fleet.filter { $0.standing == .verified }.count,
                              failed: fleet.filter { $0.standing == .failed }.count,
                              cpuSeconds: MonotonicClock.processCPUSeconds() - cpuAtStart)
    }
}
