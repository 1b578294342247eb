// An example of a device agent's receiver loop: DeviceAgent's `UpdateReceiver`
// driven by sockets of our own (plain POSIX calls, IPv4), with no part of
// Fleetcast's Transport. It joins a multicast group, accepts what the device's
// policy admits, and exits once the update is verified and released (0) or the
// session failed (1). Built with the package:
//
//   swift build --product EmbeddedReceiverExample
//   .build/debug/EmbeddedReceiverExample --group 239.192.0.42 --port 4711 \
//       --interface lo --trusted-key vendor.pub --device-key device.key \
//       --hardware-id gw-rev-a --installed-sequence 41 \
//       --staging /tmp/staging --output /tmp/update
//
// The whole API in use: `UpdateReceiver(configuration:installed:)`, then per
// turn `handleDatagram`, `handleTimeout`, `pollTransmit`, `pollEvent`,
// `accept`, `performPendingWork`, `nextDeadline` and `isDone`.
import DeviceAgent
#if canImport(Glibc)
import Glibc
#endif

// MARK: Options (by hand: an embedder has its own configuration)

var options: [String: String] = [:]
var arguments = CommandLine.arguments.dropFirst()
while let key = arguments.popFirst() {
    guard key.hasPrefix("--"), let value = arguments.popFirst() else { fail("usage: see the comment at the top of main.swift") }
    options[String(key.dropFirst(2))] = value
}
@MainActor func option(_ name: String) -> String {
    guard let value = options[name] else { fail("missing --\(name)") }
    return value
}
func fail(_ message: String) -> Never {
    let line = Array("example: \(message)\n".utf8)
    _ = write(2, line, line.count)
    exit(2)
}
func readFile(_ path: String) -> String {
    guard let f = fopen(path, "r") else { fail("cannot read \(path)") }
    defer { fclose(f) }
    var text = ""
    var buffer = [CChar](repeating: 0, count: 4096)
    while fgets(&buffer, Int32(buffer.count), f) != nil { text += String(cString: buffer) }
    return text
}

// MARK: The receiver

let trusted = try PublicKey(pem: readFile(option("trusted-key")))
let deviceKey = try PrivateKey(pem: readFile(option("device-key")))
// The receiver ID is left to the staging directory, which makes one at random and keeps it.
let identity = DeviceIdentity(deviceID: options["device-id"] ?? "example-device",
                              hardwareID: options["hardware-id"], trust: TrustPolicy(trustedKeys: [trusted]),
                              keys: DecryptionKeys(deviceKeys: [deviceKey]))
let installed = InstalledSoftware(version: options["installed-version"] ?? "1.0", sequence: options["installed-sequence"].flatMap { UInt64($0) })
let configuration = UpdateReceiver.Configuration(identity: identity, stagingDirectory: option("staging"), outputDirectory: option("output"))
let receiver = try UpdateReceiver(configuration: configuration, installed: { installed })

// MARK: Sockets and the clock

func now() -> Instant {
    var t = timespec()
    clock_gettime(CLOCK_MONOTONIC, &t)
    return Instant(microseconds: UInt64(t.tv_sec) * 1_000_000 + UInt64(t.tv_nsec) / 1000)
}

func ipv4(_ text: String) -> in_addr {
    var a = in_addr()
    guard inet_pton(AF_INET, text, &a) == 1 else { fail("\(text) is not an IPv4 address") }
    return a
}

func udpSocket(bindTo address: in_addr, port: UInt16) -> Int32 {
    let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
    var one: Int32 = 1
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
    var sa = sockaddr_in(sin_family: sa_family_t(AF_INET), sin_port: port.bigEndian, sin_addr: address, sin_zero: (0, 0, 0, 0, 0, 0, 0, 0))
    let rc = withUnsafePointer(to: &sa) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
    guard fd >= 0, rc == 0 else { fail("bind: \(String(cString: strerror(errno)))") }
    return fd
}

let group = ipv4(options["group"] ?? "239.192.0.42")
let port = UInt16(options["port"] ?? "4711") ?? 4711
let groupSocket = udpSocket(bindTo: group, port: port)
var membership = ip_mreqn(imr_multiaddr: group, imr_address: in_addr(), imr_ifindex: Int32(if_nametoindex(options["interface"] ?? "lo")))
guard setsockopt(groupSocket, Int32(IPPROTO_IP), IP_ADD_MEMBERSHIP, &membership, socklen_t(MemoryLayout<ip_mreqn>.size)) == 0 else {
    fail("join \(options["group"] ?? "239.192.0.42"): \(String(cString: strerror(errno)))")
}
// Feedback leaves from a socket of its own, and ACKs come back to it.
let feedbackSocket = udpSocket(bindTo: in_addr(s_addr: 0), port: 0)

/// Reads one datagram waiting on `fd`, if any, and hands it to the receiver.
@MainActor func receiveOne(_ fd: Int32) -> Bool {
    var buffer = [UInt8](repeating: 0, count: 9216)
    var from = sockaddr_in()
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    let n = withUnsafeMutablePointer(to: &from) { p in
        p.withMemoryRebound(to: sockaddr.self, capacity: 1) { recvfrom(fd, &buffer, buffer.count, Int32(MSG_DONTWAIT), $0, &length) }
    }
    guard n > 0 else { return false }
    let peer = PeerAddress(family: .ipv4, low: UInt64(UInt32(bigEndian: from.sin_addr.s_addr)), port: UInt16(bigEndian: from.sin_port))
    receiver.handleDatagram(Array(buffer[0..<n]), from: peer, at: now())
    return true
}

/// Sends what the receiver has for its sender (feedback is unicast; a receiver sends no multicast).
@MainActor func sendFeedback() {
    while let t = receiver.pollTransmit() {
        guard case .peer(let to) = t.destination, to.family == .ipv4 else { continue }
        var sa = sockaddr_in(sin_family: sa_family_t(AF_INET), sin_port: to.port.bigEndian, sin_addr: in_addr(s_addr: UInt32(to.low).bigEndian),
                             sin_zero: (0, 0, 0, 0, 0, 0, 0, 0))
        _ = withUnsafePointer(to: &sa) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sendto(feedbackSocket, t.bytes, t.bytes.count, 0, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
    }
}

// MARK: The loop

let giveUp = now() + .seconds(Double(options["timeout"] ?? "60") ?? 60)
var status: Int32 = 1
while !receiver.isDone && now() < giveUp {
    // Sleep until a datagram, the receiver's next deadline, or at once when it has work.
    let wait = receiver.hasPendingWork ? 0 : receiver.nextDeadline.map { Int32(min(($0 - now()).microseconds / 1000, 200)) } ?? 200
    var fds = [pollfd(fd: groupSocket, events: Int16(POLLIN), revents: 0), pollfd(fd: feedbackSocket, events: Int16(POLLIN), revents: 0)]
    _ = poll(&fds, 2, wait)
    for fd in [groupSocket, feedbackSocket] { var n = 0; while n < 256, receiveOne(fd) { n += 1 } }
    if let d = receiver.nextDeadline, d <= now() { receiver.handleTimeout(at: now()) }
    if receiver.hasPendingWork { receiver.performPendingWork(at: now()) }
    sendFeedback()
    while let event = receiver.pollEvent() {
        switch event {
        case .offer(let offer):
            // The device's policy already passed; an embedder may look at the offer here
            // (size, version, time of day) before it accepts.
            print("offer: \(offer.manifest.manifest.productID) \(offer.manifest.manifest.version), \(offer.stagingBytes) bytes to stage")
            receiver.accept(offer, at: now())
        case .refused(_, let why): print("refused: \(why)")
        case .joined(let session, _): print("joined session \(session)")
        case .received: print("received every block; finishing step 2")
        case .completed(let update):
            print("verified \(update.manifest.version): \(update.componentPaths.sorted { $0.key < $1.key }.map { "\($0.key) -> \($0.value)" }.joined(separator: ", "))")
            status = 0
        case .failed(_, let why): print("failed: \(why)")
        }
    }
    sendFeedback()
}
exit(status)
