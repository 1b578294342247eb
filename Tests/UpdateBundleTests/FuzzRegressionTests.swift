import Foundation
import Testing
@testable import UpdateBundle

@Suite("Fuzz regressions")
struct FuzzRegressionTests {
    @Test("Every kept crasher and every seed goes through the parser harness")
    func replay() throws {
        let folder = Bundle.module.resourcePath! + "/Fixtures/fuzz-crashers"
        let names = try FileManager.default.contentsOfDirectory(atPath: folder).sorted()
        #expect(names.contains("README"), "the crasher folder is packaged with the tests")
        for name in names {
            ParserHarness.exercise(readBytes(folder + "/" + name))
        }
        for (_, seed) in try ParserHarness.seeds() {
            ParserHarness.exercise(seed)
        }
    }

    @Test("The seeds are valid: the envelope verifies under the harness's trusted key")
    func seedsAreValid() throws {
        let seeds = try ParserHarness.seeds()
        let verified = try ManifestVerifier.verify(envelope: seeds["envelope.cbor"]!, trust: TrustPolicy(trustedKeys: [ParserHarness.trustedKey.publicKey]),
                                                   device: DevicePolicy(now: 1_000, hardwareID: "hw", installedSequence: 0))
        #expect(verified.manifestBytes == seeds["manifest.cbor"])
        #expect(try BundleHeader(parsing: seeds["header.bin"]!).envelopeLength == seeds["envelope.cbor"]!.count)
        // The segment seed parses under the layout its first bytes choose, and carries segment 1's chain tags.
        let segment = seeds["segment.bin"]!
        let layout = try #require(ParserHarness.segmentLayout(segment))
        let parsed = try AuthSegment(parsing: Array(segment.dropFirst(4)), index: 0, layout: layout)
        #expect(parsed.nextTags.count == layout.authSymbolCount(inSegment: 1) * BundleLimits.symbolTagByteCount)
    }
}
