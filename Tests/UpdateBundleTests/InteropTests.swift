import ChildProcess
import CBOR
import FleetCrypto
import Foundation
import Testing
@testable import UpdateBundle

/// The project's root, found from this file's path (Tests/UpdateBundleTests/...).
let projectRoot: String = {
    var url = URL(fileURLWithPath: #filePath)
    for _ in 0..<3 { url.deleteLastPathComponent() }
    return url.path
}()

/// Runs the interop script with the Python venv that scripts/setup creates.
/// A missing venv is a failure, not a skip: run scripts/setup.
func runPython(_ arguments: [String]) throws -> (status: Int32, output: String) {
    let python = projectRoot + "/.build-venv/bin/python3"
    guard FileManager.default.isExecutableFile(atPath: python) else {
        Issue.record("\(python) is missing: run scripts/setup (it installs cbor2 and pycose)")
        return (-1, "")
    }
    var options = ChildProcess.Options([python, projectRoot + "/Tests/Interop/cose_interop.py"] + arguments)
    options.standardError = .output
    let r = try ChildProcess.run(options, seconds: 300, outputByteCountMax: 16 << 20)
    guard case .exited(let status) = r.termination else { return (-1, "python: \(r.termination.map { "\($0)" } ?? "no end within 300 s; killed")\n" + r.outputText) }
    return (status, r.outputText)
}

@Suite("Interoperability with pycose and cbor2")
struct InteropTests {
    @Test("pycose verifies Fleetcast's EdDSA and ES256 signatures over the manifest")
    func pythonVerifiesOurs() throws {
        let f = Fixture()
        let path = try f.pack { $0.signingKeys = [f.signer, f.p256Signer]; $0.signatureThreshold = 2 }
        let envelopePath = f.dir.file("envelope.cbor")
        writeBytes(envelopePath, try UnverifiedBundle(path: path).envelope)
        writeBytes(f.dir.file("ed.pem"), Array(try f.signer.publicKey.pem().utf8))
        writeBytes(f.dir.file("p256.pem"), Array(try f.p256Signer.publicKey.pem().utf8))
        let (status, output) = try runPython(["verify", envelopePath, f.dir.file("ed.pem"), f.dir.file("p256.pem")])
        #expect(status == 0, "pycose: \(output)")
        #expect(output.components(separatedBy: ": valid").count - 1 == 2, "pycose: \(output)")

        // And it must refuse a forged one: flip a byte of the manifest inside the envelope.
        var envelope = try UnverifiedBundle(path: path).envelope
        // Flip a bit inside the payload hash: the CBOR stays valid, only the signatures break.
        let (manifest, _) = try COSE.parseEnvelope(envelope)
        let hash = try Manifest(decoding: manifest).payload.sha256
        let at = envelope.firstRange(of: hash)!.lowerBound + 3
        envelope[at] ^= 0x01
        writeBytes(envelopePath, envelope)
        let forged = try runPython(["verify", envelopePath, f.dir.file("ed.pem"), f.dir.file("p256.pem")])
        #expect(forged.status == 1 && forged.output.components(separatedBy: ": INVALID").count - 1 == 2,
                "pycose must reject both signatures of a forged manifest: \(forged.output)")
    }

    @Test("Fleetcast verifies COSE_Sign1 messages that pycose produced", arguments: ["EdDSA", "ES256"])
    func weVerifyPython(algorithm: String) throws {
        let f = Fixture()
        let payload = try Manifest(decoding: COSE.parseEnvelope(try UnverifiedBundle(path: try f.pack()).envelope).manifest).encoded()
        writeBytes(f.dir.file("payload"), payload)
        let (status, output) = try runPython(["sign", algorithm, f.dir.file("msg.cose"), f.dir.file("key.pem"), f.dir.file("payload")])
        try #require(status == 0, "pycose: \(output)")
        let key = try PublicKey(pem: String(decoding: readBytes(f.dir.file("key.pem")), as: UTF8.self))
        let message = try COSE.Sign1(CBOR(decoding: readBytes(f.dir.file("msg.cose"))))
        #expect(message.payload == payload)
        #expect(message.verify(with: key))
        #expect(!message.verify(with: f.signer.publicKey))
        var tampered = payload
        tampered[10] ^= 1
        #expect(!message.verify(with: key, detachedPayload: tampered))
    }
}
