import Foundation
import FleetCrypto
import SeededRandom
@testable import UpdateBundle

/// A scratch directory per test, removed when the value goes away.
final class TemporaryDirectory {
    let path: String
    init() {
        path = NSTemporaryDirectory() + "fleetcast-test-" + UUID().uuidString
        try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    deinit { try? FileManager.default.removeItem(atPath: path) }
    func file(_ name: String) -> String { path + "/" + name }
}


/// Half-compressible bytes: repeated text interleaved with noise, like firmware.
func makeImage(size: Int, seed: UInt64) -> [UInt8] {
    var rng = SeededGenerator(seed: seed)
    var out = [UInt8]()
    out.reserveCapacity(size)
    let text = Array("fleetcast firmware image section ".utf8)
    while out.count < size {
        if rng.next() % 2 == 0 { out += text } else { for _ in 0..<32 { out.append(UInt8(truncatingIfNeeded: rng.next())) } }
    }
    return Array(out.prefix(size))
}

typealias SeededGenerator = SeededRandom

let now: UInt64 = 1_800_000_000

/// A signer, devices, and an image; packs bundles with a small transport
/// profile so that even small tests span many blocks and segments.
struct Fixture {
    let dir = TemporaryDirectory()
    let signer = try! PrivateKey.generate(.ed25519)
    let p256Signer = try! PrivateKey.generate(.p256)
    let device = try! PrivateKey.generate(.x25519)
    let p256Device = try! PrivateKey.generate(.p256)
    let group = try! GroupKey([UInt8](repeating: 0x42, count: 32))
    let image: [UInt8]
    let imagePath: String
    static let smallProfile = try! TransportProfile(symbolSize: 256, sourceSymbolsPerBlock: 8, repairSymbolsPerBlock: 4)

    init(imageSize: Int = 40_000, seed: UInt64 = 1) {
        image = makeImage(size: imageSize, seed: seed)
        imagePath = dir.file("rootfs.img")
        FileManager.default.createFile(atPath: imagePath, contents: Data(image))
    }

    func request(_ modify: (inout PackRequest) -> Void = { _ in }) -> PackRequest {
        var r = PackRequest(productID: "demo-gateway", hardwareIDs: ["gw-rev-a", "gw-rev-b"], version: "2.0.0", sequence: 7,
                            createdAt: now - 100, expiresAt: now + 86_400,
                            components: [.init(name: "rootfs.img", path: imagePath, installTarget: "rootfs")],
                            signingKeys: [signer])
        r.transport = Self.smallProfile
        r.blocksPerSegment = 4
        r.recipients = [device.publicKey]
        r.encryptionChunkSize = 4096
        modify(&r)
        return r
    }

    @discardableResult
    func pack(_ name: String = "update.fcb", _ modify: (inout PackRequest) -> Void = { _ in }) throws -> String {
        let path = dir.file(name)
        try Packer.pack(request(modify), to: path)
        return path
    }

    var trust: TrustPolicy { TrustPolicy(trustedKeys: [signer.publicKey]) }
    var devicePolicy: DevicePolicy { DevicePolicy(now: now, hardwareID: "gw-rev-a", installedSequence: 6) }
    var keys: DecryptionKeys { DecryptionKeys(deviceKeys: [device]) }

    /// Full verification; returns the output directory's files on success.
    @discardableResult
    func verify(_ path: String, trust: TrustPolicy? = nil, device: DevicePolicy? = nil, keys: DecryptionKeys? = nil,
                output: String? = nil) throws -> VerifiedBundle {
        let bundle = try UnverifiedBundle(path: path)
        let verified = try bundle.verifyManifest(trust: trust ?? self.trust, device: device ?? devicePolicy)
        return try bundle.verifyPayload(verified, keys: keys ?? self.keys, outputDirectory: output)
    }
}

func readBytes(_ path: String) -> [UInt8] { Array(FileManager.default.contents(atPath: path)!) }
func writeBytes(_ path: String, _ bytes: [UInt8]) { FileManager.default.createFile(atPath: path, contents: Data(bytes)) }

/// The code a throwing call failed with, or nil if it succeeded.
func failure(_ body: () throws -> Void) -> BundleError.Code? {
    do { try body(); return nil } catch let e as BundleError { return e.code } catch { return .io }
}
