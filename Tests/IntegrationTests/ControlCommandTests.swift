import Foundation
import NBDClient
import Testing
import QMPWire

/// Every control command over a raw QMP socket, with its errors: the bitmap commands,
/// the queries, runtime exports and `quit` (in ControlQMPTests).
@Suite("Control: commands")
struct ControlCommandTests {
    static let kib: UInt64 = 1024
    static let mib: UInt64 = 1 << 20

    static let bitmapFields: Set<String> = ["name", "count", "granularity", "recording", "busy", "persistent", "generation"]

    @Test("block-dirty-bitmap-add: granularity, persistent, disabled; query fields; errors")
    func add() throws {
        let fixture = try ControlFixture()
        let client = try fixture.qmp()
        #expect(try client.run("block-dirty-bitmap-add", ["node": "disk", "name": "b0"]) == [:])
        try client.run("block-dirty-bitmap-add", ["node": "disk", "name": "fine", "granularity": 4096, "persistent": true])
        try client.run("block-dirty-bitmap-add", ["node": "disk", "name": "off", "granularity": 512, "disabled": true])
        try client.run(
            "block-dirty-bitmap-add", ["node": "disk", "name": "huge", "granularity": 2_147_483_648, "persistent": false, "disabled": false])

        var bitmaps = try ControlFixture.bitmaps(client)
        #expect(Set(bitmaps.keys) == ["b0", "fine", "off", "huge"])
        for (name, bitmap) in bitmaps {
            #expect(bitmap.objectValue.map { Set($0.keys) } == Self.bitmapFields, "\(name): \(bitmap)")
        }
        #expect(bitmaps["b0"] == [
            "name": "b0", "count": 0, "granularity": 65536, "recording": true, "busy": false, "persistent": false, "generation": 0,
        ])
        #expect(bitmaps["fine"] == [
            "name": "fine", "count": 0, "granularity": 4096, "recording": true, "busy": false, "persistent": true, "generation": 0,
        ])
        #expect(bitmaps["off"]?["recording"] == false)
        #expect(bitmaps["off"]?["granularity"] == 512)
        #expect(bitmaps["huge"]?["granularity"] == 2_147_483_648)

        // Writes are recorded by recording bitmaps only, in whole granules.
        try fixture.write([(1 * Self.mib + 512, 1024)])
        bitmaps = try ControlFixture.bitmaps(client)
        #expect(bitmaps["b0"]?["count"] == 65536)
        #expect(bitmaps["fine"]?["count"] == 4096)
        #expect(bitmaps["off"]?["count"] == 0)
        #expect(bitmaps["huge"]?["count"] == 2_147_483_648, "count is in whole granules, as QEMU's")
        // A bitmap added at runtime is offered to new NBD connections.
        #expect(try fixture.bitmapMap("fine") == BitmapMaps.bitmapMap(dirty: [(1 * Self.mib, 4096)], size: fixture.size))
        // The persistent one is in the sidecar store; the others are not.
        let stored = try BitmapStoreFiles.state(image: fixture.image)
        let storedNames = (stored["bitmaps"] as? [[String: Any]] ?? []).compactMap { $0["name"] as? String }
        #expect(storedNames == ["fine"], "state.json: \(stored)")

        expectQMPError(client, "block-dirty-bitmap-add", ["node": "disk", "name": "b0"], "bitmap 'b0' already exists")
        expectQMPError(
            client, "block-dirty-bitmap-add", ["node": "disk", "name": "fine", "granularity": 512, "persistent": true],
            "bitmap 'fine' already exists")
        for granularity: Int64 in [0, 256, 1000, 65535, 4_294_967_296] {
            expectQMPError(
                client, "block-dirty-bitmap-add", ["node": "disk", "name": "g", "granularity": .int(granularity)],
                "granularity \(granularity) is invalid: it must be a power of two from 512 B to 2 GiB")
        }
        expectQMPError(client, "block-dirty-bitmap-add", ["node": "nope", "name": "x"], "Cannot find device=nope nor node_name=nope")
        expectQMPError(client, "block-dirty-bitmap-add", ["node": "", "name": "x"], "Cannot find device= nor node_name=")
        expectQMPError(client, "block-dirty-bitmap-add", ["node": "disk", "name": ""], "invalid bitmap name '': names are 1 to 1023 bytes")
        let long = String(repeating: "n", count: 1024)
        expectQMPError(
            client, "block-dirty-bitmap-add", ["node": "disk", "name": .string(long)],
            "invalid bitmap name '\(long)': names are 1 to 1023 bytes")
        try client.run("block-dirty-bitmap-add", ["node": "disk", "name": .string(String(long.dropFirst()))])
        #expect(try ControlFixture.bitmaps(client).count == 5, "only the 1023-byte name was added")
    }

    @Test("a persistent bitmap added over QMP survives a restart with its bits; a transient one does not")
    func persistentAcrossRestart() throws {
        let fixture = try ControlFixture()
        let client = try fixture.qmp()
        try client.run("block-dirty-bitmap-add", ["node": "disk", "name": "keep", "granularity": 4096, "persistent": true])
        try client.run("block-dirty-bitmap-add", ["node": "disk", "name": "lose", "persistent": false])
        try fixture.write([(3 * Self.mib, 8192)])
        client.close()
        #expect(try fixture.server.stop() == .success)

        let (restarted, control) = try fixture.restart()
        defer { _ = try? restarted.stop() }
        let again = try QMPTestClient(path: control)
        let bitmaps = try ControlFixture.bitmaps(again)
        #expect(Set(bitmaps.keys) == ["keep"])
        #expect(bitmaps["keep"]?["count"] == 8192)
        #expect(bitmaps["keep"]?["persistent"] == true && bitmaps["keep"]?["recording"] == true)
        #expect(bitmaps["keep"]?["generation"] == 0, "a clean stop is no recovery")
    }

    @Test("generation in query-named-block-nodes counts unclean recoveries of a persistent bitmap")
    func generationAfterKill() throws {
        let fixture = try ControlFixture()
        let client = try fixture.qmp()
        try client.run("block-dirty-bitmap-add", ["node": "disk", "name": "keep", "persistent": true])
        try client.run("block-dirty-bitmap-add", ["node": "disk", "name": "mem"])
        try fixture.write([(5 * Self.mib, 4096)])
        client.close()
        _ = try fixture.server.stop(signal: SIGKILL)

        let (restarted, control) = try fixture.restart()
        defer { _ = try? restarted.stop() }
        let bitmaps = try ControlFixture.bitmaps(try QMPTestClient(path: control))
        #expect(Set(bitmaps.keys) == ["keep"])
        #expect(bitmaps["keep"]?["generation"] == 1, "\(bitmaps)")
        #expect((bitmaps["keep"]?["count"]?.intValue ?? 0) >= 65536, "the write before the kill is still dirty: \(bitmaps)")
    }

    @Test("remove, clear, enable, disable: effects and errors")
    func removeClearEnableDisable() throws {
        let fixture = try ControlFixture()
        let client = try fixture.qmp()
        for name: QMPJSON in ["a", "b"] { try client.run("block-dirty-bitmap-add", ["node": "disk", "name": name]) }
        try fixture.write([(0, 4096), (5 * Self.mib, 4096)])
        #expect(try ControlFixture.bitmaps(client)["a"]?["count"] == 131072)

        // clear
        #expect(try client.run("block-dirty-bitmap-clear", ["node": "disk", "name": "a"]) == [:])
        #expect(try ControlFixture.bitmaps(client)["a"]?["count"] == 0)
        #expect(try ControlFixture.bitmaps(client)["b"]?["count"] == 131072, "clear touches only its bitmap")
        #expect(try fixture.bitmapMap("a") == [BitmapExtent(0, fixture.size, 0)])

        // disable: writes are no longer recorded; enable: they are again
        #expect(try client.run("block-dirty-bitmap-disable", ["node": "disk", "name": "a"]) == [:])
        #expect(try ControlFixture.bitmaps(client)["a"]?["recording"] == false)
        try fixture.write([(8 * Self.mib, 4096)])
        #expect(try ControlFixture.bitmaps(client)["a"]?["count"] == 0)
        try client.run("block-dirty-bitmap-disable", ["node": "disk", "name": "a"])  // idempotent, as in QEMU
        #expect(try client.run("block-dirty-bitmap-enable", ["node": "disk", "name": "a"]) == [:])
        #expect(try ControlFixture.bitmaps(client)["a"]?["recording"] == true)
        try fixture.write([(9 * Self.mib, 4096)])
        #expect(try fixture.bitmapMap("a") == BitmapMaps.bitmapMap(dirty: [(9 * Self.mib, 65536)], size: fixture.size))

        // remove: gone from queries and from NBD
        #expect(try client.run("block-dirty-bitmap-remove", ["node": "disk", "name": "b"]) == [:])
        #expect(Set(try ControlFixture.bitmaps(client).keys) == ["a"])
        #expect(try fixture.offersBitmap("b") == false)

        for command in ["block-dirty-bitmap-remove", "block-dirty-bitmap-clear", "block-dirty-bitmap-enable", "block-dirty-bitmap-disable"] {
            expectQMPError(client, command, ["node": "disk", "name": "b"], "bitmap 'b' not found")
            expectQMPError(client, command, ["node": "nope", "name": "a"], "Cannot find device=nope nor node_name=nope")
            expectQMPError(client, command, ["node": "disk"], "Parameter 'name' is missing")
            expectQMPError(client, command, ["node": "disk", "name": "a", "granularity": 512], "Parameter 'granularity' is unexpected")
        }
        #expect(try ControlFixture.bitmaps(client)["a"]?["count"] == 65536, "failed commands changed nothing")
    }

    @Test("block-dirty-bitmap-merge: union into the target, names or {node, name}; errors")
    func merge() throws {
        let fixture = try ControlFixture()
        let client = try fixture.qmp()
        try client.run("block-dirty-bitmap-add", ["node": "disk", "name": "x", "granularity": 65536])
        try fixture.write([(1 * Self.mib, 4096)])
        try client.run("block-dirty-bitmap-add", ["node": "disk", "name": "y", "granularity": 4096])
        try fixture.write([(2 * Self.mib, 4096)])
        try client.run("block-dirty-bitmap-add", ["node": "disk", "name": "t", "granularity": 65536, "disabled": true])
        try client.run("block-dirty-bitmap-add", ["node": "disk", "name": "empty", "disabled": true])

        #expect(try client.run("block-dirty-bitmap-merge", ["node": "disk", "target": "t", "bitmaps": ["x", ["node": "disk", "name": "y"]]]) == [:])
        #expect(
            try fixture.bitmapMap("t")
                == BitmapMaps.bitmapMap(dirty: [(1 * Self.mib, 65536), (2 * Self.mib, 65536)], size: fixture.size))
        #expect(try ControlFixture.bitmaps(client)["t"]?["recording"] == false, "merge does not enable the target")
        // A finer target gets the coarse source's whole granules (x saw both writes).
        try client.run("block-dirty-bitmap-merge", ["node": "disk", "target": "y", "bitmaps": ["x"]])
        #expect(
            try fixture.bitmapMap("y")
                == BitmapMaps.bitmapMap(dirty: [(1 * Self.mib, 65536), (2 * Self.mib, 65536)], size: fixture.size))
        // Empty source list and self-merge change nothing.
        try client.run("block-dirty-bitmap-merge", ["node": "disk", "target": "empty", "bitmaps": []])
        try client.run("block-dirty-bitmap-merge", ["node": "disk", "target": "x", "bitmaps": ["x"]])
        #expect(try ControlFixture.bitmaps(client)["empty"]?["count"] == 0)
        #expect(try ControlFixture.bitmaps(client)["x"]?["count"] == 131072)

        let before = try ControlFixture.bitmaps(client)
        expectQMPError(client, "block-dirty-bitmap-merge", ["node": "disk", "target": "zz", "bitmaps": ["x"]], "bitmap 'zz' not found")
        expectQMPError(client, "block-dirty-bitmap-merge", ["node": "disk", "target": "empty", "bitmaps": ["x", "zz"]], "bitmap 'zz' not found")
        expectQMPError(
            client, "block-dirty-bitmap-merge", ["node": "disk", "target": "empty", "bitmaps": [["node": "other", "name": "x"]]],
            "Merging bitmaps of another node ('other') is not supported")
        expectQMPError(
            client, "block-dirty-bitmap-merge", ["node": "disk", "target": "empty", "bitmaps": [["name": "x"]]],
            "Invalid parameter type for 'bitmaps', expected: string or {node, name}")
        expectQMPError(
            client, "block-dirty-bitmap-merge", ["node": "nope", "target": "empty", "bitmaps": ["x"]],
            "Cannot find device=nope nor node_name=nope")
        #expect(try ControlFixture.bitmaps(client) == before, "a failed merge leaves the target untouched")
    }

    @Test("a pending checkpoint's increment is busy: no remove, clear, enable, disable, merge into, checkpoint of it")
    func busyIncrement() throws {
        let fixture = try ControlFixture()
        let client = try fixture.qmp()
        try client.run("block-dirty-bitmap-add", ["node": "disk", "name": "b0"])
        try client.run("block-dirty-bitmap-add", ["node": "disk", "name": "other", "disabled": true])
        try fixture.write([(4 * Self.mib, 4096)])
        #expect(try client.run("checkpoint-create", ["node": "disk", "bitmap": "b0"])["name"] == "c1")
        let busy = "bitmap 'c1' is currently in use by another operation and cannot be used"
        for command in ["block-dirty-bitmap-remove", "block-dirty-bitmap-clear", "block-dirty-bitmap-enable", "block-dirty-bitmap-disable"] {
            expectQMPError(client, command, ["node": "disk", "name": "c1"], busy)
        }
        expectQMPError(client, "block-dirty-bitmap-merge", ["node": "disk", "target": "c1", "bitmaps": ["other"]], busy)
        expectQMPError(client, "checkpoint-create", ["node": "disk", "bitmap": "c1"], busy)
        expectQMPError(client, "transaction", ["actions": [["type": "block-dirty-bitmap-clear", "data": ["node": "disk", "name": "c1"]]]], busy)
        let c1 = try ControlFixture.bitmaps(client)["c1"]
        #expect(c1?["busy"] == true && c1?["recording"] == false && c1?["count"] == 65536 && c1?["checkpoint-of"] == "b0")
        // Reading from it is fine: it can be a merge source.
        try client.run("block-dirty-bitmap-merge", ["node": "disk", "target": "other", "bitmaps": ["c1"]])
        #expect(try ControlFixture.bitmaps(client)["other"]?["count"] == 65536)
    }

    @Test("query-block-exports, query-named-block-nodes, query-version, query-commands")
    func queries() throws {
        let fixture = try ControlFixture(filled: false) { directory in
            let second = directory.file("second.raw")
            try ImageFile.createSparse(second, size: 4 << 20)
            return ["--export", "second=\(second):ro"]
        }
        let client = try fixture.qmp()
        let exports = try client.run("query-block-exports")
        #expect(exports == [
            ["id": "disk", "type": "nbd", "node-name": "disk", "shutting-down": false],
            ["id": "second", "type": "nbd", "node-name": "second", "shutting-down": false],
        ])

        try client.run("block-dirty-bitmap-add", ["node": "second", "name": "s0", "disabled": true])
        let nodes = try #require(try client.run("query-named-block-nodes").arrayValue)
        #expect(nodes.map { $0["node-name"] } == ["disk", "second"])
        let disk = nodes[0]
        #expect(disk["ro"] == false)
        #expect(disk["drv"] == "raw")
        #expect(disk["image"]?["virtual-size"] == .int(Int64(fixture.size)))
        #expect(disk["image"]?["format"] == "raw")
        #expect(disk["dirty-bitmaps"] == [])
        let second = nodes[1]
        #expect(second["ro"] == true)
        #expect(second["image"]?["virtual-size"] == .int(4 << 20))
        #expect(second["dirty-bitmaps"]?[0]?["name"] == "s0")
        #expect(try client.run("query-named-block-nodes", ["flat": true]) == .array(nodes))
        // A read-only image without a bitmap store cannot hold persistent bitmaps.
        expectQMPError(
            client, "block-dirty-bitmap-add", ["node": "second", "name": "p", "persistent": true],
            "persistent bitmaps are unavailable: this image has no bitmap store; add the bitmap with persistent=false")

        let version = try client.run("query-version")
        #expect(version == client.greeting["QMP"]?["version"])
        #expect(version["package"] == "tidemark")

        let commands = try #require(try client.run("query-commands").arrayValue)
        for entry in commands { #expect(entry.objectValue.map { Array($0.keys) } == ["name"], "\(entry)") }
        let names = Set(commands.compactMap { $0["name"]?.stringValue })
        let expected: Set<String> = [
            "qmp_capabilities", "query-version", "query-commands", "quit", "block-dirty-bitmap-add",
            "block-dirty-bitmap-remove", "block-dirty-bitmap-clear", "block-dirty-bitmap-enable",
            "block-dirty-bitmap-disable", "block-dirty-bitmap-merge", "transaction", "query-block-exports",
            "query-named-block-nodes", "query-checkpoints", "block-export-add", "block-export-del",
            "checkpoint-create", "checkpoint-complete", "checkpoint-abort",
        ]
        #expect(expected.isSubset(of: names), "missing: \(expected.subtracting(names))")
        // Every listed command exists: none answers CommandNotFound.
        for name in names.subtracting(["quit", "qmp_capabilities"]) {
            let reply = try client.execute(name, ["__probe__": true])
            #expect(reply["error"]?["class"] == "GenericError", "\(name): \(reply)")
        }
    }

    @Test("block-export-add / block-export-del on a server started with --empty")
    func runtimeExports() throws {
        let fixture = try ControlFixture(size: 8 << 20, filled: true, empty: true)
        let client = try fixture.qmp()
        #expect(try client.run("query-block-exports") == [])
        let listing = try ExternalTool.check("nbdinfo", ["--list", try fixture.uri(export: "")])
        #expect(!listing.stdout.contains("export=\"e1\""), "\(listing.stdout)")

        #expect(try client.run("block-export-add", ["type": "nbd", "id": "e1", "node-name": "e1", "filename": .string(fixture.image), "writable": true]) == [:])
        #expect(try client.run("query-block-exports") == [["id": "e1", "type": "nbd", "node-name": "e1", "shutting-down": false]])
        // nbdinfo sees it and its size; libnbd reads the image's bytes.
        let info = try ExternalTool.check("nbdinfo", ["--json", try fixture.uri(export: "e1")])
        #expect(info.stdout.contains("\"export-size\": \(8 << 20)"), "\(info.stdout)")
        let list = try ExternalTool.check("nbdinfo", ["--list", try fixture.uri(export: "")])
        #expect(list.stdout.contains("e1"), "\(list.stdout)")
        let connection = try fixture.connect(export: "e1")
        #expect(try connection.pread(count: 65536, offset: 1 << 20) == ImageFile.pattern(count: 65536, offset: 1 << 20))
        #expect(try connection.isReadOnly == false)
        try connection.pwrite(ImageFile.constant(0xEE, count: 4096), offset: 0)
        try connection.flush()
        try connection.shutdown()
        #expect(try ImageFile.read(fixture.image, offset: 0, count: 4096) == ImageFile.constant(0xEE, count: 4096))
        // Bitmaps work on it.
        try client.run("block-dirty-bitmap-add", ["node": "e1", "name": "eb"])
        try fixture.write([(2 << 20, 512)], export: "e1")
        #expect(try ControlFixture.bitmaps(client, node: "e1")["eb"]?["count"] == 65536)

        // A second, read-only export of another image, named by `name`.
        let other = fixture.directory.file("other.raw")
        try ImageFile.createFilled(other, size: 1 << 20, seed: 3)
        try client.run("block-export-add", ["id": "id2", "name": "ro2", "filename": .string(other)])
        let ro = try fixture.connect(export: "ro2")
        #expect(try ro.isReadOnly)
        #expect(try ro.pread(count: 4096, offset: 0) == ImageFile.pattern(count: 4096, offset: 0, seed: 3))
        try ro.shutdown()

        expectQMPError(
            client, "block-export-add", ["id": "e1", "filename": .string(fixture.image)], "Block export id 'e1' is already in use")
        expectQMPError(client, "block-export-add", ["id": "e3"], "Parameter 'filename' is missing (the image to export)")
        expectQMPError(client, "block-export-add", ["type": "vhost-user-blk", "id": "e3", "filename": .string(other)],
            "Invalid parameter 'type': only 'nbd' exports exist")
        expectQMPError(client, "block-export-add", ["filename": .string(other)], "Parameter 'id' is missing")
        let missingFile = try client.failure("block-export-add", ["id": "e4", "filename": .string(fixture.directory.file("absent.raw"))])
        #expect(missingFile.errorClass == "GenericError" && missingFile.desc.contains("absent.raw"), "\(missingFile)")
        #expect(try client.run("query-block-exports").arrayValue?.count == 2)

        // Delete: the event, then the name is gone for new clients.
        #expect(try client.run("block-export-del", ["id": "e1"]) == [:])
        let event = try client.waitForEvent("BLOCK_EXPORT_DELETED")
        #expect(event["data"] == ["id": "e1"])
        let after = try ExternalTool.check("nbdinfo", ["--list", try fixture.uri(export: "")])
        #expect(!after.stdout.contains("e1"), "\(after.stdout)")
        #expect(after.stdout.contains("ro2"), "\(after.stdout)")
        #expect(try client.run("query-block-exports") == [["id": "id2", "type": "nbd", "node-name": "ro2", "shutting-down": false]])
        let gone = try ExternalTool.run("nbdinfo", [try fixture.uri(export: "e1")])
        #expect(!gone.succeeded, "e1 must no longer be served: \(gone)")
        expectQMPError(client, "block-export-del", ["id": "e1"], "Export 'e1' is not found")
        expectQMPError(client, "block-dirty-bitmap-add", ["node": "e1", "name": "x"], "Cannot find device=e1 nor node_name=e1")

        // The same image can be exported again (its bitmap store was released).
        try client.run("block-export-add", ["id": "e1", "filename": .string(fixture.image), "writable": true])
        let back = try fixture.connect(export: "e1")
        #expect(try back.pread(count: 4096, offset: 0) == ImageFile.constant(0xEE, count: 4096))
        try back.shutdown()
    }

    @Test("block-export-add of an image another export writes: refused writable, allowed read-only")
    func exportSameImageTwice() throws {
        let fixture = try ControlFixture(filled: true)
        let client = try fixture.qmp()
        let refused = try client.failure("block-export-add", ["id": "again", "filename": .string(fixture.image), "writable": true])
        #expect(refused.errorClass == "GenericError" && refused.desc.contains(fixture.image), "\(refused)")
        #expect(try client.run("query-block-exports").arrayValue?.count == 1)
        try client.run("block-export-add", ["id": "view", "filename": .string(fixture.image)])
        let view = try fixture.connect(export: "view")
        #expect(try view.isReadOnly)
        #expect(try view.pread(count: 4096, offset: 8192) == ImageFile.pattern(count: 4096, offset: 8192))
        try view.shutdown()
        // The writable export still works and its bitmaps are untouched.
        try client.run("block-dirty-bitmap-add", ["node": "disk", "name": "b0"])
        try fixture.write([(0, 4096)])
        #expect(try ControlFixture.bitmaps(client)["b0"]?["count"] == 65536)
    }

    @Test("query-checkpoints lists pending increments with node, name, bitmap and count")
    func queryCheckpoints() throws {
        let fixture = try ControlFixture()
        let client = try fixture.qmp()
        #expect(try client.run("query-checkpoints") == [])
        try client.run("block-dirty-bitmap-add", ["node": "disk", "name": "a"])
        try client.run("block-dirty-bitmap-add", ["node": "disk", "name": "b"])
        try fixture.write([(0, 4096), (6 * Self.mib, 4096)])
        let first = try client.run("checkpoint-create", ["node": "disk", "bitmap": "a"])
        #expect(first.removing(JSONValue.lineageKeys) == ["name": "c1", "bitmap": "a", "count": 131072])
        #expect(try client.run("checkpoint-create", ["node": "disk", "bitmap": "b", "name": "nightly"]).removing(JSONValue.lineageKeys) == [
            "name": "nightly", "bitmap": "b", "count": 131072,
        ])
        // One pending checkpoint per bitmap while its client is connected.
        let refused = try client.failure("checkpoint-create", ["node": "disk", "bitmap": "a"])
        #expect(refused.desc.contains("'c1' of bitmap 'a' is still pending"), "\(refused)")
        let pending = try client.run("query-checkpoints")
        #expect(pending.removing(JSONValue.lineageKeys) == [
            ["node": "disk", "name": "c1", "bitmap": "a", "count": 131072],
            ["node": "disk", "name": "nightly", "bitmap": "b", "count": 131072],
        ])
        #expect(pending[0]?["id"] == first["id"] && pending[0]?["base"] == .null && pending[0]?["abort-on-disconnect"] == true)
        try client.run("checkpoint-complete", ["node": "disk", "name": "c1"])
        let second = try client.run("checkpoint-create", ["node": "disk", "bitmap": "a"])
        #expect(second["name"] == "c2" && second["base"] == "c1" && second["base-id"] == first["id"])
        // A chain must not see two different c1: default names are not reused, even when
        // the name is free again.
        try client.run("checkpoint-complete", ["node": "disk", "name": "c2"])
        #expect(try client.run("checkpoint-create", ["node": "disk", "bitmap": "a"])["name"] == "c3")
        #expect(try client.run("query-checkpoints").arrayValue?.map { $0["name"] } == ["nightly", "c3"])
    }
}
