import ArgumentParser
import DeliveryCore
import Foundation
import SeededRandom
import Transport
import WireFormat

/// A hostile host on the LAN, for the lab and the integration tests: it listens
/// to the group, learns the session, and sprays forgeries at it.
struct Inject: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Lab tool: forge datagrams into a running session (tests the receivers' defences).",
        discussion: """
        Listens on the group until it hears a session, then for --duration seconds sends, at \
        --rate datagrams per second: DATA with the real session ID and random symbols, copies of \
        genuine DATA with one bit flipped, POLLs with absurd timing, and CLOSEs. Receivers must drop \
        every forgery (and count it) and still deliver the genuine bytes. Use only inside a lab.
        """,
        shouldDisplay: false
    )

    @OptionGroup var network: NetworkOptions

    @Option(help: "Forged datagrams per second.")
    var rate: Double = 2000

    @Option(help: "Seconds of forgery after the session is found.")
    var duration: Double = 5

    @Option(help: "Seconds to wait for a session.")
    var timeout: Double = 20

    @Option(help: "Multicast TTL.")
    var ttl: Int = 1

    @Option(help: "Seed of the forgeries.")
    var seed: UInt64 = 1

    func validate() throws {
        guard rate.isFinite, (1...1e6).contains(rate) else { throw ValidationError("--rate wants 1 to 1000000 datagrams per second") }
        guard isSaneSeconds(duration), isSaneSeconds(timeout) else { throw ValidationError("--duration and --timeout want seconds from 0 to \(durationSecondsMax)") }
        guard (0...255).contains(ttl) else { throw ValidationError("--ttl wants 0 to 255") }
    }

    func run() throws {
        try reportingTransportFailures {
            let group = try network.groupAddress()
            let interface = try network.networkInterface()
            let listen = try UDPSocket(family: group.family)
            try listen.allowAddressReuse()
            try listen.bind(group)
            try listen.join(group: group, on: interface)
            let out = try UDPSocket(family: group.family)
            try out.setMulticastOutput(interface: interface, ttl: ttl, loopback: true)
            var random = SeededRandom(seed: seed)
            let batch = ReceiveBatch()
            let start = MonotonicClock.now()
            var session: SessionID?
            var genuine: [DataSymbol] = []
            var forgedEnd: Instant?
            var sent = 0
            var next = start
            let send = SendBatch(capacity: 16)
            while true {
                let now = MonotonicClock.now()
                if session == nil && now >= start + .seconds(timeout) { printError("inject: no session heard"); throw ExitCode(NetworkExit.timedOut) }
                if let end = forgedEnd, now >= end { break }
                _ = waitReadable([listen], until: session == nil ? now + .milliseconds(100) : next)
                if try listen.receive(into: batch) > 0 {
                    for i in 0..<batch.count {
                        guard let bytes = batch.datagram(i), let d = try? Datagram(parsing: bytes) else { continue }
                        if session == nil { session = d.sessionID; forgedEnd = MonotonicClock.now() + .seconds(duration) }
                        if case .data(let symbol) = d, genuine.count < 256 { genuine.append(symbol) }
                    }
                }
                guard let id = session, MonotonicClock.now() >= next else { continue }
                next = next + Interval(microseconds: UInt64(1e6 / rate * 16))
                for _ in 0..<16 {
                    let bytes: [UInt8]
                    switch random.next() % 4 {
                    case 3:
                        // A forged CLOSE: receivers must not end a live session on it (P-13a).
                        bytes = Datagram.close(Close(session: id, reason: .aborted)).encoded()
                    case 0 where !genuine.isEmpty:
                        var copy = genuine[Int(random.next() % UInt64(genuine.count))]
                        copy.symbol[copy.symbol.startIndex + Int(random.next() % UInt64(copy.symbol.count))] ^= UInt8(1 << (random.next() % 8))
                        bytes = Datagram.data(copy).encoded()
                    case 1:
                        bytes = Datagram.poll(Poll(session: id, round: UInt32(truncatingIfNeeded: random.next()), sentAtMicroseconds: random.next(),
                                                   grttMicroseconds: UInt32.max, groupSize: UInt32.max)).encoded()
                    default:
                        let symbol = (0..<1400).map { _ in UInt8(truncatingIfNeeded: random.next()) }
                        bytes = Datagram.data(DataSymbol(session: id, object: random.next() % 4 == 0 ? .authChain : .payload,
                                                         block: UInt32(random.next() % 64), symbolIndex: UInt8(random.next() % 96), symbol: symbol)).encoded()
                    }
                    send.append(bytes, to: group)
                }
                sent += try out.send(send)
                send.removeFirst(send.count)
            }
            say("inject: sent \(sent) forged datagrams into session \(session.map { "\($0)" } ?? "?")")
        }
    }
}
