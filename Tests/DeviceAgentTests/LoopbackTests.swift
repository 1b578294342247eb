import DeviceAgent
import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// A UDP socket of the test's own, on IPv4 loopback: how an embedder's loop reads
/// and writes, without any of Fleetcast's Transport.
final class LoopbackSocket {
    let fd: Int32
    let port: UInt16

    /// Bound to `address` (0: any) and `port` (0: an ephemeral one); joined to `group` on lo.
    init(address: UInt32 = 0, port requested: UInt16 = 0, group: UInt32? = nil) throws {
        let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
        self.fd = fd
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var sa = Self.socketAddress(address, requested)
        let bound = withUnsafePointer(to: &sa) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        guard fd >= 0, bound == 0 else { throw POSIXError(.EADDRINUSE) }
        if let group {
            var m = ip_mreqn(imr_multiaddr: in_addr(s_addr: group.bigEndian), imr_address: in_addr(), imr_ifindex: Int32(if_nametoindex("lo")))
            guard setsockopt(fd, Int32(IPPROTO_IP), IP_ADD_MEMBERSHIP, &m, socklen_t(MemoryLayout<ip_mreqn>.size)) == 0 else { throw POSIXError(.EINVAL) }
        } else {
            // Multicast from here goes out on lo and loops back to this host's sockets.
            var lo = ip_mreqn(imr_multiaddr: in_addr(), imr_address: in_addr(s_addr: UInt32(0x7F00_0001).bigEndian), imr_ifindex: 0)
            setsockopt(fd, Int32(IPPROTO_IP), IP_MULTICAST_IF, &lo, socklen_t(MemoryLayout<ip_mreqn>.size))
        }
        var name = sockaddr_in()
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &name) { $0.withMemoryRebound(to: Glibc.sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } }
        self.port = UInt16(bigEndian: name.sin_port)
    }

    deinit { close(fd) }

    static func socketAddress(_ address: UInt32, _ port: UInt16) -> sockaddr_in {
        sockaddr_in(sin_family: sa_family_t(AF_INET), sin_port: port.bigEndian, sin_addr: in_addr(s_addr: address.bigEndian), sin_zero: (0, 0, 0, 0, 0, 0, 0, 0))
    }

    func send(_ bytes: [UInt8], to address: UInt32, port: UInt16) {
        var sa = Self.socketAddress(address, port)
        _ = withUnsafePointer(to: &sa) { $0.withMemoryRebound(to: Glibc.sockaddr.self, capacity: 1) { sendto(fd, bytes, bytes.count, 0, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
    }

    /// One waiting datagram and its source, or nil.
    func receive() -> (bytes: [UInt8], from: PeerAddress)? {
        var buffer = [UInt8](repeating: 0, count: 9216)
        var from = sockaddr_in()
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let n = withUnsafeMutablePointer(to: &from) { $0.withMemoryRebound(to: Glibc.sockaddr.self, capacity: 1) { recvfrom(fd, &buffer, buffer.count, 0, $0, &length) } }
        guard n > 0 else { return nil }
        return (Array(buffer[0..<n]), PeerAddress(family: .ipv4, low: UInt64(UInt32(bigEndian: from.sin_addr.s_addr)), port: UInt16(bigEndian: from.sin_port)))
    }
}

@Suite("An embedder's own socket loop over loopback")
struct LoopbackTests {
    static func monotonicNow() -> Instant {
        var t = timespec()
        clock_gettime(CLOCK_MONOTONIC, &t)
        return Instant(microseconds: UInt64(t.tv_sec) * 1_000_000 + UInt64(t.tv_nsec) / 1000)
    }

    @Test("UpdateReceiver fed by real UDP multicast on lo, a Sender on the other side: verified, released, reported (step 2 in the loop, or on its own thread)",
          arguments: [false, true])
    func realSockets(stepTwoThread: Bool) throws {
        let f = AgentFixture(imageBytes: 600_000)
        let packed = try f.pack()
        let group: UInt32 = 0xEFC0_2A63  // 239.192.42.99
        let port = UInt16(30000 + Int(getpid() % 3000))
        let groupSocket = try LoopbackSocket(address: group, port: port, group: group)
        let feedbackSocket = try LoopbackSocket()
        let senderSocket = try LoopbackSocket(address: 0x7F00_0001)
        var config = SenderConfig(session: SessionID(0x10CA1), rateBytesPerSecond: 40_000_000, cookieSecret: [UInt8](repeating: 0xC0, count: 32))
        config.expectedReceivers = 1
        var sender = Sender(config: config, envelope: packed.envelope, manifest: packed.manifest,
                            source: InMemoryObjects(authChain: packed.authChain, payload: packed.payload))
        let world = DeviceWorld()
        var configuration = f.configuration()
        configuration.stepTwoThread = stepTwoThread
        let receiver = try UpdateReceiver(configuration: configuration, installed: { world.installed }, unixTime: { world.unixTime })
        receiver.decideOffer = { offer in offer.manifest.manifest.sequence == 7 ? .accept : .decline("unexpected") }
        var events: [UpdateEvent] = []
        let start = Self.monotonicNow()
        // Bounded: 20 s of wall time at most.
        while !(sender.isFinished && receiver.isDone), Self.monotonicNow() < start + .seconds(20) {
            var now = Self.monotonicNow()
            sender.handleTimeout(at: now)
            while let t = sender.pollTransmit(at: now) {
                switch t.destination {
                case .group: senderSocket.send(t.bytes, to: group, port: port)
                case .peer(let to): senderSocket.send(t.bytes, to: UInt32(to.low), port: to.port)
                }
            }
            // Sleep until a socket is readable or the earlier of the two deadlines.
            let next = [sender.nextDeadline(at: now), receiver.nextDeadline].compactMap { $0 }.min() ?? now + .milliseconds(10)
            var fds = [groupSocket, feedbackSocket, senderSocket].map { pollfd(fd: $0.fd, events: Int16(POLLIN), revents: 0) }
            _ = poll(&fds, 3, Int32(min((next - now).microseconds / 1000, 10)))
            now = Self.monotonicNow()
            while let (bytes, from) = groupSocket.receive() { receiver.handleDatagram(bytes, from: from, at: now) }
            while let (bytes, from) = feedbackSocket.receive() { receiver.handleDatagram(bytes, from: from, at: now) }
            if let d = receiver.nextDeadline, d <= now { receiver.handleTimeout(at: now) }
            while receiver.hasPendingWork { receiver.performPendingWork(at: now) }
            while let t = receiver.pollTransmit() {
                if case .peer(let to) = t.destination { feedbackSocket.send(t.bytes, to: UInt32(to.low), port: to.port) }
            }
            while let (bytes, from) = senderSocket.receive() { sender.handleDatagram(bytes, from: from, at: now) }
            while let e = receiver.pollEvent() { events.append(e) }
        }
        let completed = events.compactMap { if case .completed(let u) = $0 { u } else { nil } }.first
        #expect(completed?.manifest == packed.manifest, "\(events)")
        #expect(FileManager.default.contents(atPath: f.scratch.file("out/rootfs.img")).map { [UInt8]($0) } == f.image)
        #expect(sender.receivers.values.first?.state == .verified && sender.receivers.values.first?.address.port == feedbackSocket.port)
    }
}
