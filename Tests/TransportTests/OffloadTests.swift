import DeliveryCore
import Glibc
import Testing
import Transport

/// Specs/protocol.md P-24a: segmentation (GSO) on send and coalescing (GRO) on
/// receive must hand the core exactly the datagrams that were sent, in order,
/// whichever of the two the kernel does. On loopback a GSO message reaches a
/// GRO socket whole, so these tests exercise the splitting for real.
struct OffloadTests {
    /// Datagrams of `size` bytes whose bytes say which one they are.
    static func datagrams(count: Int, size: Int, last: Int? = nil) -> [[UInt8]] {
        (0..<count).map { i in
            let n = i == count - 1 ? (last ?? size) : size
            return (0..<n).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ i) }
        }
    }

    /// Sends `sent` from a socket with `segmentation` to a fresh loopback
    /// socket with or without coalescing; returns what arrived and in how many reads.
    static func roundTrip(_ sent: [[UInt8]], segmentation: Bool, coalesce: Bool) throws -> (datagrams: [[UInt8]], messages: Int, coalescing: Bool) {
        let receiver = try UDPSocket(family: .ipv4)
        _ = try receiver.setBuffers(receive: 4 << 20, send: 0)
        try receiver.bind(try SocketAddress(host: "127.0.0.1", port: 0))
        let coalescing = coalesce && receiver.enableCoalescing()
        let to = try receiver.localAddress()
        let sender = try UDPSocket(family: .ipv4)
        sender.segmentation = segmentation
        let batch = SendBatch(capacity: sent.count)
        for d in sent { batch.append(d, to: to) }
        #expect(try sender.send(batch) == sent.count)
        let incoming = ReceiveBatch(coalesced: coalescing)
        var got: [[UInt8]] = [], messages = 0
        // Loopback delivers synchronously within send: everything is queued already.
        for _ in 0..<sent.count {
            guard try receiver.receive(into: incoming) > 0 else { break }
            messages += incoming.messageCount
            for i in 0..<incoming.count { got.append(incoming.datagram(i)!) }
        }
        return (got, messages, coalescing)
    }

    @Test("GSO send into a GRO socket: every datagram, in order, in fewer reads", arguments: [(40, 1416, 1416), (46, 1416, 200), (64, 300, 300)])
    func segmentedAndCoalesced(count: Int, size: Int, last: Int) throws {
        let sent = Self.datagrams(count: count, size: size, last: last)
        let r = try Self.roundTrip(sent, segmentation: true, coalesce: true)
        #expect(r.datagrams == sent)
        // Linux has had UDP_GRO since 5.0; without it this test would not exercise the splitting.
        #expect(r.coalescing, "UDP_GRO refused by this kernel")
        #expect(r.messages < count, "the kernel handed \(count) datagrams over in \(r.messages) reads")
    }

    @Test("GSO send into a plain socket: the kernel segments, the receiver sees single datagrams")
    func segmentedOnly() throws {
        let sent = Self.datagrams(count: 40, size: 1416)
        let r = try Self.roundTrip(sent, segmentation: true, coalesce: false)
        #expect(r.datagrams == sent)
        #expect(r.messages == 40)
    }

    @Test("Mixed lengths and no offload on either side: the same datagrams")
    func mixed() throws {
        var sent = Self.datagrams(count: 10, size: 1416)
        sent.insert([1, 2, 3], at: 4)
        sent.append([9])
        for (segmentation, coalesce) in [(true, true), (false, true), (true, false), (false, false)] {
            let r = try Self.roundTrip(sent, segmentation: segmentation, coalesce: coalesce)
            #expect(r.datagrams == sent, "segmentation \(segmentation), coalescing \(coalesce)")
        }
    }

    /// Specs/protocol.md P-25a: the age a batch reports is the time a datagram
    /// waited in the socket's queue. The wait here is the thing measured, made
    /// by not reading for 50 ms; nothing waits on it for synchronisation.
    /// Linux turns arrival stamping on for the host a moment after the first
    /// socket asks (a deferred static key), and stamps a datagram that came
    /// before that when it is read (age 0): the first tries may show that.
    @Test("Arrival timestamps: a datagram left 50 ms in the queue is reported at least 50 ms old")
    func arrivalAge() throws {
        let receiver = try UDPSocket(family: .ipv4)
        try receiver.bind(try SocketAddress(host: "127.0.0.1", port: 0))
        #expect(receiver.enableArrivalTimestamps(), "SO_TIMESTAMPNS refused by this kernel")
        let plain = try UDPSocket(family: .ipv4)
        try plain.bind(try SocketAddress(host: "127.0.0.1", port: 0))
        let sender = try UDPSocket(family: .ipv4)
        let queuedFor = Interval.milliseconds(50)
        let incoming = ReceiveBatch()
        var ages: [UInt64] = []
        for _ in 0..<10 {
            let batch = SendBatch(capacity: 2)
            batch.append([1, 2, 3], to: try receiver.localAddress())
            batch.append([4, 5, 6], to: try plain.localAddress())
            #expect(try sender.send(batch) == 2)
            let start = MonotonicClock.now()
            while MonotonicClock.now() < start + queuedFor { usleep(5000) }
            #expect(try plain.receive(into: incoming) == 1)
            #expect(incoming.age(0) == nil, "a socket without timestamps reports no age")
            #expect(try receiver.receive(into: incoming) == 1)
            let age = try #require(incoming.age(0))
            ages.append(age.microseconds)
            if age >= queuedFor { break }
        }
        let last = Interval(microseconds: ages.last ?? 0)
        #expect(last >= queuedFor && last < .seconds(5), "ages in µs, one per try: \(ages)")
    }
}
