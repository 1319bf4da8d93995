import Foundation
import NBDClient
import Testing
import QMPWire

/// The backup chain while writers go on: a full copy from a first view, then increments
/// pulled from views of later checkpoints, by the nbdcopy recipe and by
/// `nbdinfo --map=qemu:dirty-bitmap:NAME` plus libnbd reads.
@Suite("Views: increments pulled while writers go on", .serialized)
struct ViewChainTests {
    static let size = 32 << 20
    static let rounds = 10

    @Test("4 writers; a full copy and 10 increments, each pull equal to its view; the last equal to the live image")
    func chainUnderLoad() throws {
        let fixture = try ControlFixture(size: Self.size)
        let client = try fixture.qmp()
        try client.run("block-dirty-bitmap-add", ["node": "disk", "name": "b0", "persistent": true])
        let writers = Views.Writers(try (0..<4).map { _ in try fixture.connect() }, size: UInt64(Self.size))
        defer { writers.stop() }
        let viaNbdcopy = fixture.directory.file("chain-nbdcopy.raw")
        let viaMap = fixture.directory.file("chain-map.raw")

        usleep(200_000)
        let first = try Views.create(client)
        try ExternalTool.check("nbdcopy", [try fixture.uri(export: first.view), viaNbdcopy], timeout: 120)
        try Views.expectIdentical(viaNbdcopy, try fixture.uri(export: first.view))
        try FileManager.default.copyItem(atPath: viaNbdcopy, toPath: viaMap)
        try client.run("checkpoint-complete", ["node": "disk", "name": .string(first.checkpoint)])

        var pulls = 0
        func pull(_ created: Views.Created) throws {
            try Views.pullChanges(try fixture.uri(export: created.changes), into: viaNbdcopy)
            try Views.expectIdentical(viaNbdcopy, try fixture.uri(export: created.view))
            let reader = try fixture.connect(export: created.view)
            defer { try? reader.shutdown() }
            let copied = try Views.pullWithMap(
                viewURI: try fixture.uri(export: created.view), connection: reader, increment: created.checkpoint,
                into: viaMap)
            #expect(copied == created.count, "the map pull copies exactly the increment (\(created.checkpoint))")
            pulls += 1
            try Views.expectIdentical(viaMap, try fixture.uri(export: created.view))
            try client.run("checkpoint-complete", ["node": "disk", "name": .string(created.checkpoint)])
        }
        for _ in 0..<Self.rounds {
            let before = writers.count
            while writers.count < before + 20 { usleep(5_000) }
            try pull(try Views.create(client))
        }
        writers.stop()
        #expect(writers.failures.all.isEmpty, "\(writers.failures.all)")
        // After the writers stopped and flushed: one last increment, then the chain's
        // image is the live image.
        try pull(try Views.create(client))
        try Views.expectIdentical(viaNbdcopy, try fixture.uri())
        try Views.expectIdentical(viaMap, try fixture.uri())
        #expect(pulls == Self.rounds + 1)
        #expect(try Views.sidecars(image: fixture.image).isEmpty)
    }
}
