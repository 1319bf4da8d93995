import Foundation
import NBDClient
import Testing
import QMPWire

#if canImport(Glibc)
import Glibc
#endif

/// Point-in-time views of checkpoints: what they show while writers go on, their
/// allocation, the `.changes` variant and the nbdcopy pull recipe, closing and sidecars.
@Suite("Views: point-in-time exports of checkpoints")
struct ViewTests {
    static let kib = 1024
    static let mib = 1 << 20
    static let granule: UInt64 = 65536

    static func exportNames(_ fixture: ControlFixture) throws -> Set<String> {
        let connection = try NBDConnection(NBDConnectionConfiguration(optMode: true))
        try connection.connect(unixSocket: fixture.directory.socketPath)
        defer { try? connection.optAbort() }
        return Set(try connection.optList().map(\.name))
    }

    static func checkpoints(_ client: QMPTestClient) throws -> [String: QMPJSON] {
        var result: [String: QMPJSON] = [:]
        for entry in try client.run("query-checkpoints").arrayValue ?? [] {
            if let name = entry["name"]?.stringValue { result[name] = entry }
        }
        return result
    }

    @Test("a view reads the checkpoint's instant while the export changes; read-only; gone after complete")
    func viewShowsTheInstant() throws {
        let fixture = try ControlFixture(size: 16 << 20)
        let client = try fixture.qmp()
        try client.run("block-dirty-bitmap-add", ["node": "disk", "name": "b0", "persistent": true])
        // Data in [0, 4 MiB) and [8 MiB, 9 MiB); holes elsewhere.
        try fixture.write([(0, 4 * Self.mib)], byte: 0x11)
        try fixture.write([(8 * UInt64(Self.mib), Self.mib)], byte: 0x22)
        let instant = try ImageFile.read(fixture.image)

        let created = try Views.create(client)
        #expect(created.checkpoint == "c1" && created.view == "disk@c1" && created.changes == "disk@c1.changes")
        let event = try client.waitForEvent("CHECKPOINT_CREATED")
        #expect(event["data"]?["view"] == "disk@c1")
        #expect(try Self.exportNames(fixture) == ["disk", "disk@c1", "disk@c1.changes"])
        #expect(try Views.sidecars(image: fixture.image).count == 1)

        // Writes over data, into a hole, zeroes and a trim, on the live export.
        let live = try fixture.connect()
        try live.pwrite(ImageFile.constant(0x33, count: 128 * Self.kib), offset: 64 * 1024)
        try live.pwrite(ImageFile.constant(0x44, count: Self.mib), offset: 12 * UInt64(Self.mib))
        try live.zero(count: 64 * 1024, offset: 2 * UInt64(Self.mib))
        try live.trim(count: UInt64(Self.mib), offset: 8 * UInt64(Self.mib))
        try live.flush()

        let view = try fixture.connect(export: created.view, contexts: ["base:allocation", BitmapMaps.context("c1")])
        #expect(try view.size == fixture.size)
        #expect(try view.isReadOnly)
        #expect(try Views.readAll(view) == instant, "the view must read as the image did at the checkpoint")
        try Views.expectIdentical(fixture.directory.file("instant.raw").withContents(instant), try fixture.uri(export: created.view))
        // Its allocation is the instant's: [12 MiB, 13 MiB) is still a hole, [8, 9) still data.
        let allocation = try BitmapMaps.nbdinfoMap(uri: try fixture.uri(export: created.view)).extents
        #expect(allocation == [
            BitmapExtent(0, 4 << 20, 0), BitmapExtent(4 << 20, 4 << 20, 3), BitmapExtent(8 << 20, 1 << 20, 0),
            BitmapExtent(9 << 20, 7 << 20, 3),
        ])
        // It carries the increment.
        #expect(try fixture.bitmapMap("c1", export: created.view) == BitmapMaps.bitmapMap(
            dirty: [(0, 4 << 20), (8 << 20, 1 << 20)], size: fixture.size))

        // Read-only on the wire too, not only in libnbd.
        let writer = try fixture.server.connect(export: created.view) { $0.strictMode = [] }
        expectErrno(EPERM, "write to a view") { try writer.pwrite([1, 2, 3], offset: 0) }
        expectErrno(EPERM, "trim of a view") { try writer.trim(count: 4096, offset: 0) }

        // The sidecar holds what writers overwrote: 128 KiB + 64 KiB + 1 MiB of data (the
        // write into the hole needed no copy).
        let entry = try #require(try Self.checkpoints(client)["c1"])
        #expect(entry["view"] == "disk@c1" && entry["changes-view"] == "disk@c1.changes")
        #expect(entry["view-sidecar-bytes"] == .int(Int64(128 * Self.kib + 64 * Self.kib + Self.mib)))

        try client.run("checkpoint-complete", ["node": "disk", "name": "c1"])
        #expect(try Self.exportNames(fixture) == ["disk"])
        #expect(try Views.sidecars(image: fixture.image).isEmpty, "the sidecar is deleted with the view")
        expectErrno(EIO, "read from a closed view on a connection still attached") {
            _ = try view.pread(count: 4096, offset: 0)
        }
        #expect(throws: NBDClientError.self, "a closed view cannot be attached") {
            try fixture.connect(export: created.view)
        }
    }

    @Test(".changes reports the increment as allocation; nbdcopy pulls it into the previous copy")
    func changesVariantAndNbdcopyRecipe() throws {
        let fixture = try ControlFixture(size: 16 << 20)
        let client = try fixture.qmp()
        try client.run("block-dirty-bitmap-add", ["node": "disk", "name": "b0", "persistent": true])
        try fixture.write([(0, 6 * Self.mib)], byte: 0x11)
        let full = fixture.directory.file("full.raw")
        let first = try Views.create(client)
        try ExternalTool.check("nbdcopy", [try fixture.uri(export: first.view), full], timeout: 120)
        try client.run("checkpoint-complete", ["node": "disk", "name": .string(first.checkpoint)])

        // Changes: new data, data overwritten with zeroes and trimmed (dirty granules that
        // now read as zeroes), and data written into a hole.
        let live = try fixture.connect()
        try live.pwrite(ImageFile.constant(0x22, count: 100 * Self.kib), offset: 1 << 20)
        try live.zero(count: 192 * 1024, offset: 3 << 20)
        try live.trim(count: 64 * 1024, offset: 5 << 20)
        try live.pwrite(ImageFile.constant(0x33, count: 4096), offset: 10 << 20)
        let second = try Views.create(client)
        #expect(second.checkpoint == "c2", "checkpoint names are not reused while the server runs")
        // Writes after the checkpoint are in neither the view nor the pull.
        try live.pwrite(ImageFile.constant(0x44, count: 2 * Self.mib), offset: 0)

        let increment = BitmapMaps.bitmapMap(
            dirty: [(1 << 20, 128 << 10), (3 << 20, 192 << 10), (5 << 20, 64 << 10), (10 << 20, 64 << 10)],
            size: fixture.size)
        let changesURI = try fixture.uri(export: second.changes)
        #expect(try BitmapMaps.nbdinfoMap(uri: changesURI, context: BitmapMaps.context("c2")).extents == increment)
        // base:allocation of .changes: dirty granules are data, clean ones zero holes.
        let asAllocation = increment.map { BitmapExtent($0.offset, $0.length, $0.flags == 1 ? 0 : 3) }
        #expect(try BitmapMaps.nbdinfoMap(uri: changesURI).extents == asAllocation)

        try Views.pullChanges(changesURI, into: full)
        try Views.expectIdentical(full, try fixture.uri(export: second.view))
        // The other pull: only the changes into a fresh sparse file.
        let changesOnly = fixture.directory.file("changes.raw")
        try ExternalTool.check(
            "nbdcopy", ["--destination-is-zero", "--request-size=65536", changesURI, changesOnly], timeout: 120)
        let allocated = try ImageFile.allocatedBytes(changesOnly)
        #expect(allocated <= 448 * 1024, "only the 448 KiB increment is written, not \(allocated) bytes")
        let view = try fixture.connect(export: second.view)
        let pulled = try ImageFile.read(changesOnly)
        for extent in increment where extent.flags == 1 {
            let range = Int(extent.offset)..<Int(extent.end)
            #expect(Array(pulled[range]) == (try view.pread(count: range.count, offset: extent.offset)))
        }
        try client.run("checkpoint-complete", ["node": "disk", "name": .string(second.checkpoint)])
    }

    @Test("a view whose export name would pass NBD's 4096 bytes is refused as too long, not as a duplicate; nothing changes")
    func viewNameTooLong() throws {
        let exportName = String(repeating: "e", count: 3200)
        let fixture = try ControlFixture(size: 4 << 20, name: exportName, extraArguments: ["--bitmap", "b0"])
        let client = try fixture.qmp()
        let checkpoint = String(repeating: "c", count: 1000)
        let refused = try client.failure(
            "checkpoint-create", ["node": .string(exportName), "bitmap": "b0", "name": .string(checkpoint), "view": true])
        #expect(refused.desc.contains("NBD allows at most 4096"), "\(refused)")
        #expect(!refused.desc.contains("already exists"), "\(refused)")
        #expect(try client.run("query-checkpoints") == [], "no checkpoint was created")
    }

    @Test("two views at once; block-export-del closes one, abort the other; stop removes sidecars")
    func closingViews() throws {
        let fixture = try ControlFixture(size: 8 << 20)
        let client = try fixture.qmp()
        let observer = try fixture.qmp()
        for name in ["b0", "b1"] {
            try client.run("block-dirty-bitmap-add", ["node": "disk", "name": .string(name), "persistent": true])
        }
        try fixture.write([(0, 2 * Self.mib)], byte: 0x11)
        let firstInstant = try ImageFile.read(fixture.image)
        let first = try Views.create(client, bitmap: "b0", name: "nightly")
        try fixture.write([(0, Self.mib)], byte: 0x22)
        let secondInstant = try ImageFile.read(fixture.image)
        let second = try Views.create(client, bitmap: "b1", name: "hourly")
        try fixture.write([(512 * UInt64(Self.kib), Self.mib)], byte: 0x33)
        #expect(try Views.readAll(fixture.connect(export: first.view)) == firstInstant)
        #expect(try Views.readAll(fixture.connect(export: second.view)) == secondInstant)
        #expect(try Views.sidecars(image: fixture.image).count == 2)
        // A view of a view, a second view of one checkpoint, and bitmap commands on a view are refused.
        expectQMPError(client, "checkpoint-create", ["node": "disk@nightly", "bitmap": "b0", "view": .bool(true)], "'disk@nightly' is a view; checkpoints are taken of live exports")
        expectQMPError(client, "block-dirty-bitmap-add", ["node": "disk@nightly", "name": "x"], "'disk@nightly' is a point-in-time view; its bitmaps belong to its export")

        // Deleting the view's export closes the view (both names); the checkpoint stays.
        _ = try observer.drain(timeout: 0.2)
        try client.run("block-export-del", ["id": .string(first.changes)])
        var deleted: Set<String> = []
        for _ in 0..<2 {
            let event = try observer.waitForEvent("BLOCK_EXPORT_DELETED")
            deleted.insert(event["data"]?["id"]?.stringValue ?? "")
        }
        #expect(deleted == [first.view, first.changes])
        #expect(try Self.exportNames(fixture) == ["disk", second.view, second.changes])
        let pending = try Self.checkpoints(client)
        #expect(pending["nightly"] != nil && pending["nightly"]?["view"] == nil, "\(pending)")
        #expect(try Views.sidecars(image: fixture.image).count == 1)

        try client.run("checkpoint-abort", ["node": "disk", "name": "hourly"])
        #expect(try Self.exportNames(fixture) == ["disk"])
        #expect(try Views.sidecars(image: fixture.image).isEmpty)
        try client.run("checkpoint-complete", ["node": "disk", "name": "nightly"])

        // A view still open when the server stops: its sidecar goes with it.
        _ = try Views.create(client, bitmap: "b0")
        try fixture.write([(0, Self.mib)], byte: 0x44)
        #expect(try Views.sidecars(image: fixture.image).count == 1)
        #expect(try fixture.server.stop() == .success)
        #expect(try Views.sidecars(image: fixture.image).isEmpty)
    }

    @Test("a view closes with its checkpoint when the owning client disconnects")
    func viewClosesOnAbortOnDisconnect() throws {
        let fixture = try ControlFixture(size: 4 << 20)
        let owner = try fixture.qmp()
        let observer = try fixture.qmp()
        try owner.run("block-dirty-bitmap-add", ["node": "disk", "name": "b0"])
        let created = try Views.create(owner, extra: ["timeout": 0])
        #expect(try Self.exportNames(fixture).contains(created.view))
        owner.close()
        let aborted = try observer.waitForEvent("CHECKPOINT_ABORTED")
        #expect(aborted["data"]?["reason"] == "client-disconnected")
        #expect(try Self.exportNames(fixture) == ["disk"])
        #expect(try Views.sidecars(image: fixture.image).isEmpty)
    }

    @Test("view reads racing writes to the same granules on several connections see the instant")
    func racingReadsAndWrites() throws {
        let size = 16 << 20
        let fixture = try ControlFixture(size: size, filled: true)
        let client = try fixture.qmp()
        try client.run("block-dirty-bitmap-add", ["node": "disk", "name": "b0"])
        let instant = try ImageFile.read(fixture.image)
        let created = try Views.create(client)
        let writers = Views.Writers(try (0..<3).map { _ in try fixture.connect() }, size: UInt64(size), maximumLength: 64 << 10)
        let failures = Failures()
        DispatchQueue.concurrentPerform(iterations: 3) { index in
            do {
                let reader = try fixture.connect(export: created.view)
                var generator = SystemRandomNumberGenerator()
                for _ in 0..<300 {
                    let count = Int.random(in: 1...256, using: &generator) * 512
                    let offset = Int.random(in: 0...((size - count) / 512), using: &generator) * 512
                    let bytes = try reader.pread(count: count, offset: UInt64(offset))
                    if bytes[...] != instant[offset..<(offset + count)] {
                        failures.add("reader \(index): view differs at \(offset)+\(count)")
                    }
                }
            } catch {
                failures.add("reader \(index): \(error)")
            }
        }
        writers.stop()
        #expect(failures.all.isEmpty, "\(failures.all.prefix(5))")
        #expect(writers.failures.all.isEmpty, "\(writers.failures.all)")
        #expect(writers.count > 0)
        #expect(try Views.readAll(fixture.connect(export: created.view)) == instant)
    }
}

extension String {
    /// Writes `bytes` to the file at this path and returns the path.
    func withContents(_ bytes: [UInt8]) throws -> String {
        try ImageFile.write(self, bytes: bytes)
        return self
    }
}
