import Foundation
import NBDClient
import Testing
import QMPWire

#if canImport(Glibc)
import Glibc
#endif

/// Exports over QMP as QEMU keys them: `id` is the identity, names are what clients ask
/// for; removing an export closes its bitmap store cleanly; files that are not images are
/// refused without blocking; bitmaps too large for the image are refused everywhere.
@Suite("Control: export ids, removal, file types, bitmap size")
struct ControlExportTests {
    @Test("block-export-add: id is the QMP identity (query, del, duplicates); name is the node and the NBD name")
    func idIsTheIdentity() throws {
        let fixture = try ControlFixture(size: 4 << 20, empty: true)
        let client = try fixture.qmp()
        try client.run("block-export-add", ["id": "exp-a", "name": "disk-a", "filename": .string(fixture.image), "writable": true])
        #expect(try client.run("query-block-exports") == [["id": "exp-a", "type": "nbd", "node-name": "disk-a", "shutting-down": false]])
        // Bitmap commands keep taking the export name as node; clients connect by name.
        try client.run("block-dirty-bitmap-add", ["node": "disk-a", "name": "b0"])
        expectQMPError(client, "block-dirty-bitmap-add", ["node": "exp-a", "name": "b1"], "Cannot find device=exp-a nor node_name=exp-a")
        try fixture.write([(0, 4096)], export: "disk-a")
        #expect(try ControlFixture.bitmaps(client, node: "disk-a")["b0"]?["count"] == 65536)

        // A duplicate id is refused with QEMU's message, a duplicate name too.
        let other = fixture.directory.file("other.raw")
        try ImageFile.createSparse(other, size: 1 << 20)
        expectQMPError(
            client, "block-export-add", ["id": "exp-a", "name": "fresh", "filename": .string(other)],
            "Block export id 'exp-a' is already in use")
        expectQMPError(
            client, "block-export-add", ["id": "exp-b", "name": "disk-a", "filename": .string(other)],
            "NBD server already has export named 'disk-a'")
        // node-name gives the name when name is absent, as in QEMU.
        try client.run("block-export-add", ["id": "exp-b", "node-name": "disk-b", "filename": .string(other)])
        #expect(try client.run("query-block-exports") == [
            ["id": "exp-a", "type": "nbd", "node-name": "disk-a", "shutting-down": false],
            ["id": "exp-b", "type": "nbd", "node-name": "disk-b", "shutting-down": false],
        ])

        // block-export-del takes the id, not the name.
        expectQMPError(client, "block-export-del", ["id": "disk-a"], "Export 'disk-a' is not found")
        #expect(try client.run("block-export-del", ["id": "exp-a"]) == [:])
        let event = try client.waitForEvent("BLOCK_EXPORT_DELETED")
        #expect(event["data"] == ["id": "exp-a"])
        #expect(try client.run("query-block-exports") == [["id": "exp-b", "type": "nbd", "node-name": "disk-b", "shutting-down": false]])
        let gone = try ExternalTool.run("nbdinfo", [try fixture.uri(export: "disk-a")])
        #expect(!gone.succeeded, "disk-a must no longer be served: \(gone)")
        // The id and the name are free again.
        try client.run("block-export-add", ["id": "exp-a", "name": "disk-a", "filename": .string(fixture.image)])
        #expect(try client.run("query-block-exports").arrayValue?.count == 2)
    }

    @Test("exports from the command line have id = name")
    func commandLineIDs() throws {
        let fixture = try ControlFixture(size: 1 << 20, name: "vm1")
        let client = try fixture.qmp()
        #expect(try client.run("query-block-exports") == [["id": "vm1", "type": "nbd", "node-name": "vm1", "shutting-down": false]])
        expectQMPError(
            client, "block-export-add", ["id": "vm1", "name": "other", "filename": .string(fixture.image)],
            "Block export id 'vm1' is already in use")
    }

    @Test("block-export-del saves bitmaps cleanly and releases the store: re-adding keeps bits and generation")
    func deleteSavesCleanly() throws {
        let fixture = try ControlFixture(size: 8 << 20, empty: true)
        let client = try fixture.qmp()
        try client.run("block-export-add", ["id": "e1", "filename": .string(fixture.image), "writable": true])
        try client.run("block-dirty-bitmap-add", ["node": "e1", "name": "b0", "persistent": true])
        try fixture.write([(0, 4096), (3 << 20, 512)], export: "e1")
        let before = try #require(try ControlFixture.bitmaps(client, node: "e1")["b0"])
        #expect(before["count"] == 131072)
        let generation = try #require(before["generation"]?.intValue)
        for round in 1...2 {
            try client.run("block-export-del", ["id": "e1"])
            // Nothing holds the store any more: another process could open it now.
            #expect(!Self.storeIsLocked(fixture.image), "round \(round): the store is still locked")
            try client.run("block-export-add", ["id": "e1", "filename": .string(fixture.image), "writable": true])
            let after = try #require(try ControlFixture.bitmaps(client, node: "e1")["b0"], "round \(round)")
            #expect(after["count"] == 131072, "round \(round): \(after)")
            #expect(after["generation"]?.intValue == generation, "round \(round): an unclean reopen bumped it: \(after)")
            #expect(after["persistent"] == true && after["recording"] == true, "round \(round): \(after)")
        }
        // And it still records.
        try fixture.write([(6 << 20, 512)], export: "e1")
        #expect(try ControlFixture.bitmaps(client, node: "e1")["b0"]?["count"] == 196608)
    }

    /// True when some process holds the image's bitmap store lock.
    static func storeIsLocked(_ image: String) -> Bool {
        let fd = open(image + ".tidemark/lock", O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else { return true }
        flock(fd, LOCK_UN)
        return false
    }

    @Test("a FIFO, a directory and a character device are refused at once; the control socket keeps answering")
    func nonRegularFilesRefused() throws {
        let fixture = try ControlFixture(size: 1 << 20, empty: true)
        let client = try fixture.qmp()
        let fifo = fixture.directory.file("pipe")
        #expect(mkfifo(fifo, 0o600) == 0)
        let cases: [(path: String, kind: String)] = [
            (fifo, "a FIFO (named pipe)"), (fixture.directory.path, "a directory"), ("/dev/null", "a character device"),
        ]
        for (path, kind) in cases {
            for writable in [false, true] {
                let start = Date()
                let reply = try client.execute(
                    "block-export-add", ["id": "x", "filename": .string(path), "writable": .bool(writable)], timeout: 5)
                #expect(Date().timeIntervalSince(start) < 1, "\(path): took \(Date().timeIntervalSince(start)) s")
                let error = try #require(try QMPTestClient.error(of: reply), "\(path) was accepted: \(reply)")
                #expect(error.errorClass == "GenericError")
                #expect(error.desc == "'\(path)' is \(kind), not an image: export a regular file or a block device", "\(error)")
                #expect(try client.run("query-version")["package"] == "tidemark")
            }
        }
        #expect(try client.run("query-block-exports") == [])
        // A second client is served too (nothing is stuck on the control thread).
        #expect(try fixture.qmp().run("query-block-exports") == [])
        // The command line refuses a FIFO too, at once, with the same message.
        let serve = try ControlPrograms.tidemark(["serve", fifo, "--unix", fixture.directory.file("fifo.sock")], timeout: 10)
        #expect(!serve.succeeded)
        #expect(serve.stderr.contains("is a FIFO (named pipe), not an image"), "\(serve)")
    }

    @Test("bitmap size bound on a sparse 4 TiB image: granularity 512 refused (QMP, --bitmap, offline), 64 KiB works")
    func bitmapSizeBound() throws {
        let fourTiB = 4 << 40
        let fixture = try ControlFixture(size: fourTiB)
        let client = try fixture.qmp()
        let expected =
            "bitmap 'fine' would need 1024 MiB at granularity 512 B; use granularity ≥ 16 KiB (16384) for this 4 TiB image: "
            + "a bitmap may have at most 268435456 granules, 32 MiB of bits"
        expectQMPError(client, "block-dirty-bitmap-add", ["node": "disk", "name": "fine", "granularity": 512], expected)
        expectQMPError(
            client, "transaction",
            ["actions": [["type": "block-dirty-bitmap-add", "data": ["node": "disk", "name": "fine", "granularity": 512]]]],
            expected)
        try client.run("block-dirty-bitmap-add", ["node": "disk", "name": "b0", "granularity": 65536])
        try client.run("block-dirty-bitmap-add", ["node": "disk", "name": "edge", "granularity": 16384])
        #expect(Set(try ControlFixture.bitmaps(client).keys) == ["b0", "edge"])
        try fixture.write([(3 << 40, 4096)])
        #expect(try ControlFixture.bitmaps(client)["b0"]?["count"] == 65536)

        // Another 4 TiB image: --bitmap at serve and the offline CLI refuse it too.
        let other = fixture.directory.file("other.raw")
        try ImageFile.createSparse(other, size: fourTiB)
        let serve = try ControlPrograms.tidemark(
            ["serve", other, "--bitmap", "fine:512", "--unix", fixture.directory.file("other.sock")], timeout: 20)
        #expect(!serve.succeeded)
        #expect(serve.stderr.contains(expected), "\(serve)")
        let offline = try ControlPrograms.tidemark(["bitmap", "add", other, "fine", "--granularity", "512"], timeout: 20)
        #expect(!offline.succeeded)
        #expect(offline.stderr.contains(expected), "\(offline)")
        try ControlPrograms.tidemark(["bitmap", "add", other, "b0", "--granularity", "64K"], timeout: 20).requireSuccess()
    }
}
