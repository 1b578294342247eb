import DeliveryCore
import DeviceAgent
import Foundation
import Glibc
import Testing
import UpdateBundle
import WireFormat

@Suite("The embedded receiver (DeviceAgent's public API)")
struct UpdateReceiverTests {
    func receiver(_ f: AgentFixture, _ world: DeviceWorld, _ config: UpdateReceiver.Configuration? = nil) throws -> UpdateReceiver {
        try UpdateReceiver(configuration: config ?? f.configuration(), installed: { world.installed }, unixTime: { world.unixTime })
    }

    @Test("An offer waits for the embedder: nothing is staged before accept; accepted, the update is verified, released and reported complete")
    func offerAcceptComplete() throws {
        let f = AgentFixture()
        let world = DeviceWorld()
        let packed = try f.pack()
        let r = try receiver(f, world)
        var x = Exchange(packed, receiver: r)
        var sawOfferBeforeStaging = false
        x.run { offer in
            sawOfferBeforeStaging = !FileManager.default.fileExists(atPath: f.scratch.file("staging/bundle.partial"))
            #expect(offer.manifest.manifest == packed.manifest && offer.stagingBytes > packed.manifest.payload.size && !offer.resumes)
            return true
        }
        #expect(sawOfferBeforeStaging, "staging began before the device answered")
        let update = try #require(x.completed, "\(x.events)")
        #expect(update.manifest == packed.manifest)
        #expect(FileManager.default.contents(atPath: f.scratch.file("out/rootfs.img")).map { [UInt8]($0) } == f.image)
        #expect((try FileManager.default.attributesOfItem(atPath: f.scratch.file("out/rootfs.img"))[.posixPermissions] as? Int) == 0o600)
        // Specs/protocol.md P-21: the sender heard "complete" only after step 2, and counts it verified.
        #expect(x.statuses.last?.state == .complete)
        #expect(x.sender.receivers[ReceiverID(0x1234)]?.state == .verified)
        let order = x.events.map { e -> String in
            switch e { case .offer: "offer"; case .joined: "joined"; case .received: "received"; case .completed: "completed"; case .refused: "refused"; case .failed: "failed" }
        }
        #expect(order == ["offer", "joined", "received", "completed"], "\(order)")
    }

    @Test("The policy is judged when the offer arrives, with the time and the installed software of that moment")
    func policyAtOffer() throws {
        let f = AgentFixture()
        let world = DeviceWorld()
        let packed = try f.pack(expiresAt: AgentFixture.createdAt + 3600)
        // Expired by the device's clock now, though it was valid when the receiver was made.
        let late = try receiver(f, world)
        world.unixTime = AgentFixture.createdAt + 3600
        var x = Exchange(packed, receiver: late)
        x.run(limit: .seconds(3))
        #expect(x.failure?.reason == .expired, "\(x.events)")
        #expect(x.statuses.contains { $0.state == .failed && $0.reason == .expired })
        #expect(!FileManager.default.fileExists(atPath: f.scratch.file("staging/bundle.partial")))
        // The installed sequence is asked at every offer: once 7 is installed, 7 is a rollback.
        world.unixTime = AgentFixture.createdAt + 60
        world.installed = InstalledSoftware(version: "7.0", sequence: 7)
        var y = Exchange(packed, receiver: try receiver(f, world, f.configuration(staging: "staging2")))
        y.run(limit: .seconds(3))
        #expect(y.failure?.reason == .rollback, "\(y.events)")
        // Another product's device refuses it too.
        var other = f.configuration(staging: "staging3")
        other.identity.productID = "printer"
        var z = Exchange(packed, receiver: try receiver(f, world, other))
        z.run(limit: .seconds(3))
        #expect(z.failure?.reason == .incompatibleHardware, "\(z.events)")
    }

    @Test("Expiry is judged again before release: a transfer that outlasts the manifest releases nothing and reports expired")
    func expiryBeforeRelease() throws {
        let f = AgentFixture()
        let world = DeviceWorld()
        let packed = try f.pack(expiresAt: AgentFixture.createdAt + 120)
        let r = try receiver(f, world)
        var x = Exchange(packed, receiver: r)
        // The clock passes the expiry once the transfer is under way.
        x.onStep = { x in if x.receiver.manifest != nil { world.unixTime = AgentFixture.createdAt + 121 } }
        x.run()
        #expect(x.failure?.reason == .expired, "\(x.events)")
        #expect(x.completed == nil)
        #expect(try FileManager.default.contentsOfDirectory(atPath: f.scratch.file("out")).isEmpty, "nothing released")
        #expect(x.statuses.last?.state == .failed && x.statuses.last?.reason == .expired)
        #expect(x.sender.receivers[ReceiverID(0x1234)]?.state == .failed)
    }

    @Test("A storage failure at release is reported failed with reason storage, and nothing is released")
    func storageFailureAtRelease() throws {
        let f = AgentFixture()
        let world = DeviceWorld()
        let packed = try f.pack()
        let r = try receiver(f, world)
        var x = Exchange(packed, receiver: r)
        // The output directory disappears during the transfer: the release (a rename) fails.
        x.onStep = { x in
            if x.receiver.manifest != nil, FileManager.default.fileExists(atPath: f.scratch.file("out")) {
                try? FileManager.default.removeItem(atPath: f.scratch.file("out"))
            }
        }
        x.run()
        #expect(x.failure?.reason == .storage, "\(x.events)")
        #expect(x.statuses.last?.state == .failed && x.statuses.last?.reason == .storage)
    }

    @Test("A declined offer tells the sender 'declined' and stages nothing")
    func decline() throws {
        let f = AgentFixture()
        let world = DeviceWorld()
        let packed = try f.pack()
        var x = Exchange(packed, receiver: try receiver(f, world))
        x.run(limit: .seconds(3)) { _ in false }
        #expect(x.statuses.contains { $0.state == .failed && $0.reason == .declined })
        #expect(x.sender.receivers[ReceiverID(0x1234)]?.failureReason == .declined)
        #expect(!FileManager.default.fileExists(atPath: f.scratch.file("staging/bundle.partial")))
        #expect(x.receiver.lastDecline?.reason == .declined)
    }

    @Test("A device without the keys is refused at the offer (not a recipient)")
    func notARecipient() throws {
        let f = AgentFixture()
        let world = DeviceWorld()
        let packed = try f.pack()
        var config = f.configuration()
        config.identity.keys = DecryptionKeys(deviceKeys: [try .generate(.x25519)])
        var x = Exchange(packed, receiver: try receiver(f, world, config))
        x.run(limit: .seconds(3))
        #expect(x.failure?.reason == .notARecipient, "\(x.events)")
    }

    @Test("A receiver that listens on takes the next, newer update after the first")
    func listensAfterSession() throws {
        let f = AgentFixture()
        let world = DeviceWorld()
        var config = f.configuration()
        config.listensAfterSession = true
        let r = try receiver(f, world, config)
        var first = Exchange(try f.pack(sequence: 7), receiver: r)
        // The receiver never ends its own loop: stop once the first is complete and ACKed.
        first.onStep = { x in if x.completed != nil && x.sender.isFinished { x.now = Instant.zero + .seconds(60) } }
        first.run()
        #expect(first.completed?.manifest.sequence == 7)
        world.installed = InstalledSoftware(version: "7.0", sequence: 7)  // the agent installed it
        var second = Exchange(try f.pack(sequence: 8), receiver: r, session: 0xB0B)
        second.now = first.now
        second.onStep = { x in if x.completed != nil && x.sender.isFinished { x.now = Instant.zero + .seconds(120) } }
        second.run(limit: .seconds(120))
        #expect(second.completed?.manifest.sequence == 8, "\(second.events)")
    }

    @Test("The staging directory is refused when others may write it")
    func stagingPermissions() throws {
        let f = AgentFixture()
        try FileManager.default.createDirectory(atPath: f.scratch.file("open"), withIntermediateDirectories: true)
        chmod(f.scratch.file("open"), 0o777)
        #expect(throws: ReceiveFailure.self) { _ = try UpdateReceiver(configuration: f.configuration(staging: "open"), installed: { .init(version: "1", sequence: 1) }) }
        do { _ = try StagingArea(directory: f.scratch.file("open")) } catch { #expect(error.reason.contains("may be written by other users")) }
    }

    /// Found in review: a commit that fails with the last blocks (the core already
    /// waiting for step 2) crashed after the release, or spun forever.
    @Test("A journal commit that fails with the last blocks fails the session (storage); nothing is released, nothing spins")
    func commitFailureAtTheEnd() throws {
        let f = AgentFixture()
        let world = DeviceWorld()
        let packed = try f.pack()  // 400 KB: one commit, with the last block
        let r = try receiver(f, world)
        var x = Exchange(packed, receiver: r)
        // A directory where the journal's temporary goes: the commit cannot write it.
        x.onStep = { x in
            if x.receiver.manifest != nil { try? FileManager.default.createDirectory(atPath: f.scratch.file("staging/journal.tmp"), withIntermediateDirectories: true) }
        }
        x.run(limit: .seconds(30))
        #expect(x.failure?.reason == .storage, "\(x.events)")
        #expect(x.completed == nil && !r.hasPendingWork)
        #expect(x.statuses.last?.state == .failed && x.statuses.last?.reason == .storage)
        #expect(!FileManager.default.fileExists(atPath: f.scratch.file("staging/journal")), "no journal lists what was not made durable")
        #expect(try FileManager.default.contentsOfDirectory(atPath: f.scratch.file("out")).isEmpty, "nothing released")
    }

    /// Bytes a file holds on disk (its holes take none).
    static func allocatedBytes(_ path: String) -> UInt64 {
        var st = stat()
        return stat(path, &st) == 0 ? UInt64(st.st_blocks) * 512 : 0
    }

    @Test("P-29c: a windowed session holds at most the window's footprint in staging, journals no payload block, and a restarted receiver frees what was staged and completes")
    func windowedResume() throws {
        let f = AgentFixture(imageBytes: 2_000_000)  // about 62 blocks of 32 KiB
        let world = DeviceWorld()
        var config = f.configuration()
        config.stagingWindow = .bytes(1)  // the least: 16 blocks
        config.tuning.commitBlockCount = 4  // journals during the interrupted part
        let packed = try f.pack()
        let partial = f.scratch.file("staging/bundle.partial")
        let footprint = UInt64(UpdateReceiver.Configuration.stagingWindowBlockCountMin
                               * (AgentFixture.profile.sourceSymbolsPerBlock + AgentFixture.profile.repairSymbolsPerBlock) * AgentFixture.profile.symbolSize)
        let rest = UInt64(packed.envelope.count + packed.authChain.count) + 4096
        #expect(footprint + rest < packed.manifest.payload.size / 2, "the window is well under the payload")
        var peak: UInt64 = 0
        // Interrupted part way: a power cut, as far as staging knows.
        do {
            let r = try receiver(f, world, config)
            var x = Exchange(packed, receiver: r)
            x.onStep = { _ in peak = max(peak, Self.allocatedBytes(partial)) }
            // One DATA in nine lost: blocks wait for repair while later ones are staged ahead.
            var data = 0
            x.lost = { bytes in
                guard bytes[1] == Datagram.Kind.data.rawValue else { return false }
                data += 1
                return data % 9 == 0
            }
            x.run(limit: .milliseconds(70))
            #expect(x.completed == nil && r.manifest != nil, "interrupted during the transfer: \(x.events)")
        }
        let journal = try #require(try StagingArea(directory: f.scratch.file("staging")).loadJournal().journal?.0)
        #expect(journal.payloadBlocks.isEmpty && !journal.authBlocks.isEmpty, "a windowed journal lists the auth chain only: \(journal.payloadBlocks)")
        #expect(Self.allocatedBytes(partial) > rest, "blocks were staged ahead of step 2 when the power went")
        // The restart: the accept frees what the journal does not list, and the update completes.
        let r = try receiver(f, world, config)
        var x = Exchange(packed, receiver: r, session: 0xB0B)
        // Looked at in the first step after the accept: by then at most the blocks of one
        // step's 64 datagrams (two blocks) are staged anew.
        var atAccept: UInt64?
        x.onStep = { x in
            peak = max(peak, Self.allocatedBytes(partial))
            if x.receiver.manifest != nil && atAccept == nil { atAccept = Self.allocatedBytes(partial) }
        }
        x.run()
        #expect(x.completed != nil, "\(x.events)")
        let blockBytes = UInt64(AgentFixture.profile.blockByteCount)
        #expect((atAccept ?? .max) <= rest + 4 * blockBytes, "the accept left \(String(describing: atAccept)) bytes staged")
        #expect(FileManager.default.contents(atPath: f.scratch.file("out/rootfs.img")).map { [UInt8]($0) } == f.image)
        #expect(peak <= rest + footprint, "staging held \(peak) bytes; the window's footprint is \(footprint) (+ \(rest))")
        #expect(!FileManager.default.fileExists(atPath: partial), "no bundle is kept")
    }

    @Test("decideOffer is asked once per offer; .later leaves one .offer event, which a late accept takes")
    func decideLater() throws {
        let f = AgentFixture()
        let world = DeviceWorld()
        let r = try receiver(f, world)
        var asked = 0
        r.decideOffer = { _ in asked += 1; return .later }
        var x = Exchange(try f.pack(), receiver: r)
        x.run()
        #expect(asked == 1)
        let offers = x.events.filter { if case .offer = $0 { true } else { false } }.count
        #expect(offers == 1 && x.completed != nil, "\(x.events)")
        // An answer to an offer no longer pending is refused, not a crash.
        if case .offer(let stale)? = x.events.first { #expect(!r.accept(stale, at: x.now) && !r.decline(stale, reason: "late", at: x.now)) }
    }

    @Test("A listening receiver does not take again a bundle it has completed (the sender restarted, or others still receive)")
    func completedNotTakenAgain() throws {
        let f = AgentFixture()
        let world = DeviceWorld()
        var config = f.configuration()
        config.listensAfterSession = true
        let r = try receiver(f, world, config)
        let packed = try f.pack(sequence: 7)
        var first = Exchange(packed, receiver: r)
        first.onStep = { x in if x.completed != nil && x.sender.isFinished { x.now = Instant.zero + .seconds(60) } }
        first.run()
        #expect(first.completed != nil)
        // The same bundle in a new session, with the installed sequence not yet advanced
        // (an agent advances it only at confirm): no offer, no transfer, no word.
        var again = Exchange(packed, receiver: r, session: 0xC0FFEE)
        again.now = first.now
        again.run(limit: .seconds(63))
        #expect(again.events.isEmpty, "\(again.events)")
        #expect(again.statuses.isEmpty && !FileManager.default.fileExists(atPath: f.scratch.file("staging/bundle.partial")))
    }
}
