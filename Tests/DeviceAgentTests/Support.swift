import DeliveryCore
import DeviceAgent
import FleetCrypto
import Foundation
import UpdateBundle
import WireFormat

// Public API only (no @testable import): these tests use DeviceAgent as a device
// maker would, with DeliveryCore's Sender as the other end.

/// A scratch directory per test, removed when the value goes away.
final class Scratch {
    let path = NSTemporaryDirectory() + "fleetcast-agent-" + UUID().uuidString
    init() { try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true) }
    deinit { try? FileManager.default.removeItem(atPath: path) }
    func file(_ name: String) -> String { path + "/" + name }
}

/// A vendor, a device, and bundles packed for it, with a small transport profile
/// so that a few hundred KB span several blocks and segments.
final class AgentFixture {
    let scratch = Scratch()
    let vendor = try! PrivateKey.generate(.ed25519)
    let device = try! PrivateKey.generate(.x25519)
    let image: [UInt8]
    static let createdAt: UInt64 = 1_800_000_000
    static let profile = try! TransportProfile(symbolSize: 1024, sourceSymbolsPerBlock: 32, repairSymbolsPerBlock: 16)

    init(imageBytes: Int = 400_000) {
        var state: UInt64 = 0x5EED
        image = (0..<imageBytes).map { _ in
            state = state &* 6364136223846793005 &+ 1442695040888963407
            return UInt8(truncatingIfNeeded: state >> 33)
        }
        FileManager.default.createFile(atPath: scratch.file("rootfs.img"), contents: Data(image))
    }

    struct Packed {
        let envelope: [UInt8]
        let manifest: Manifest
        let payload: [UInt8]
        let authChain: [UInt8]
    }

    /// Packs the image (zlib, encrypted for the device unless `plain`).
    func pack(sequence: UInt64 = 7, expiresAt: UInt64 = AgentFixture.createdAt + 86_400, plain: Bool = false, name: String = "rootfs.img") throws -> Packed {
        var request = PackRequest(productID: "gateway", hardwareIDs: ["gw-a"], version: "\(sequence).0", sequence: sequence,
                                  createdAt: Self.createdAt, expiresAt: expiresAt,
                                  components: [.init(name: name, path: scratch.file("rootfs.img"), installTarget: "rootfs")], signingKeys: [vendor])
        request.transport = Self.profile
        // Several segments (4 for 2 MB), each a 32 KiB chain block (Specs/bundle.md §7.3).
        request.blocksPerSegment = 16
        if plain { request.compression = .none } else { request.recipients = [device.publicKey] }
        let path = scratch.file("bundle-\(sequence)-\(expiresAt)-\(plain)")
        let manifest = try Packer.pack(request, to: path)
        let bundle = try UnverifiedBundle(path: path)
        let bytes = [UInt8](FileManager.default.contents(atPath: path)!)
        return Packed(envelope: bundle.envelope, manifest: manifest,
                      payload: Array(bytes[Int(bundle.header.payloadOffset)..<Int(bundle.header.authOffset)]),
                      authChain: Array(bytes[Int(bundle.header.authOffset)...]))
    }

    func configuration(staging: String = "staging", output: String? = "out") -> UpdateReceiver.Configuration {
        let identity = DeviceIdentity(deviceID: "device-1", receiverID: ReceiverID(0x1234), productID: "gateway", hardwareID: "gw-a",
                                      trust: TrustPolicy(trustedKeys: [vendor.publicKey]), keys: DecryptionKeys(deviceKeys: [device]))
        return UpdateReceiver.Configuration(identity: identity, stagingDirectory: scratch.file(staging), outputDirectory: output.map(scratch.file))
    }
}

/// A device's clock and installed software that a test moves.
final class DeviceWorld: @unchecked Sendable {
    var unixTime: UInt64 = AgentFixture.createdAt + 60
    var installed = InstalledSoftware(version: "6.0", sequence: 6)
}

let senderAddress = PeerAddress.benchmark(1)
let receiverAddress = PeerAddress.benchmark(2)

/// One sender and one embedded receiver wired back to back in memory, on a
/// virtual clock: the receiver sees exactly what a socket loop would hand it.
struct Exchange {
    var sender: Sender
    let receiver: UpdateReceiver
    var now = Instant.zero
    /// Every event the receiver raised, in order.
    var events: [UpdateEvent] = []
    /// Every STATUS the receiver sent.
    var statuses: [Status] = []
    /// Called after each step (a test's hook: move the clock, break the disk).
    var onStep: ((inout Exchange) -> Void)?
    /// Whether a datagram to the receiver is lost on the way (a test's loss).
    var lost: (([UInt8]) -> Bool)?

    init(_ packed: AgentFixture.Packed, receiver: UpdateReceiver, session: UInt32 = 0xA11CE) {
        var c = SenderConfig(session: SessionID(session), rateBytesPerSecond: 20_000_000, cookieSecret: [UInt8](repeating: 0xC0, count: 32))
        c.expectedReceivers = 1
        sender = Sender(config: c, envelope: packed.envelope, manifest: packed.manifest,
                        source: InMemoryObjects(authChain: packed.authChain, payload: packed.payload))
        self.receiver = receiver
    }

    /// Runs until the sender finishes and the receiver is done, or `limit`.
    mutating func run(limit: Interval = .seconds(60), answer: (UpdateOffer) -> Bool = { _ in true }) {
        let end = Instant.zero + limit
        while now < end && !(sender.isFinished && receiver.isDone) {
            sender.handleTimeout(at: now)
            var sent = 0
            while let t = sender.pollTransmit(at: now), sent < 64 {
                if lost?(t.bytes) == true { continue }
                receiver.handleDatagram(t.bytes, from: senderAddress, at: now)
                sent += 1
                answerOffers(answer)
                deliverFeedback()
            }
            if let d = receiver.nextDeadline, d <= now { receiver.handleTimeout(at: now) }
            while receiver.hasPendingWork { receiver.performPendingWork(at: now) }
            answerOffers(answer)
            deliverFeedback()
            onStep?(&self)
            let next = [sender.nextDeadline(at: now), receiver.nextDeadline].compactMap { $0 }.min() ?? now + .milliseconds(10)
            now = max(next, now + Interval(microseconds: 50))
        }
    }

    private mutating func answerOffers(_ answer: (UpdateOffer) -> Bool) {
        while let e = receiver.pollEvent() {
            events.append(e)
            if case .offer(let offer) = e {
                if answer(offer) { receiver.accept(offer, at: now) } else { receiver.decline(offer, reason: "not today", at: now) }
            }
        }
    }

    private mutating func deliverFeedback() {
        while let t = receiver.pollTransmit() {
            guard case .peer(let to) = t.destination, to == senderAddress else { continue }
            if case .status(let s)? = try? Datagram(parsing: t.bytes) { statuses.append(s) }
            sender.handleDatagram(t.bytes, from: receiverAddress, at: now)
        }
    }

    var completed: ReceivedUpdate? {
        for case .completed(let u) in events { return u }
        return nil
    }
    var failure: ReceiveFailure? {
        for e in events { if case .failed(_, let f) = e { return f }; if case .refused(_, let f) = e { return f } }
        return nil
    }
}
