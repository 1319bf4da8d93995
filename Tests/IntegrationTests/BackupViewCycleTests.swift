import Foundation
import NBDClient
import Testing
import QMPWire
import TidemarkBackup
import TestSupport

/// `tidemark backup … --control`: checkpoint with a view, pull from the view, complete on
/// success, abort on failure.
@Suite("Backup: the --control checkpoint cycle with point-in-time views")
struct BackupViewCycleTests {
    static let mib = 1 << 20

    @Test("full then two incrementals through --control: checkpoints completed, restores match, writes during the pull are not in the backup")
    func controlCycle() throws {
        let size = 16 * Self.mib
        let fixture = try ControlFixture(size: size, extraArguments: ["--bitmap", "b0"])
        let scratch = try TestDirectory()
        let directory = scratch.file("chain")
        let uri = try fixture.uri()
        let client = try fixture.qmp()
        let writer = try fixture.connect()
        var generator = SeededGenerator(seed: 11)
        try BackupChecks.mutate(writer, size: UInt64(size), operations: 30, generator: &generator)
        var expected = [scratch.file("expected-0.raw")]
        try BackupChecks.snapshot(writer, to: expected[0])

        let full = try BackupChecks.backup(["full", uri, directory, "--control", fixture.controlPath, "--bitmap", "b0"])
        #expect(full["index"] as? Int == 0)
        #expect(try client.run("query-checkpoints") == [], "the checkpoint was completed")
        let fullManifest = try BackupManifest.load(path: directory + "/backup-0000.json")
        #expect(fullManifest.bitmap == "b0" && fullManifest.checkpoint != nil)
        #expect(fullManifest.source.contains("@"), "pulled from the view: \(fullManifest.source)")

        for round in 1...2 {
            try BackupChecks.mutate(writer, size: UInt64(size), operations: 20, generator: &generator)
            expected.append(scratch.file("expected-\(round).raw"))
            try BackupChecks.snapshot(writer, to: expected[round])
            // Writes racing the backup, from the moment its checkpoint exists: they land
            // after the checkpoint, and the view hides them.
            let observer = try fixture.qmp()
            let racing = Thread {
                guard (try? observer.waitForEvent("CHECKPOINT_CREATED", timeout: 60)) != nil else { return }
                for index in 0..<50 {
                    try? writer.pwrite(ImageFile.constant(0xEE, count: 65536), offset: UInt64(index) * 131_072)
                    usleep(2_000)
                }
            }
            racing.start()
            let summary = try BackupChecks.backup(["incremental", uri, directory, "--control", fixture.controlPath, "--bitmap", "b0"])
            #expect(summary["index"] as? Int == round)
            while racing.isExecuting || !racing.isFinished { usleep(10_000) }
            #expect(try client.run("query-checkpoints") == [])
            let manifest = try BackupManifest.load(path: directory + "/backup-000\(round).json")
            #expect(manifest.bitmap == "b0" && manifest.checkpoint != nil)
            // The racing writes are recorded in b0 for the next round; re-snapshot nothing:
            // the restore of this point must equal the state at the checkpoint.
        }
        try writer.shutdown()
        try BackupChecks.checkChain(directory, expected: expected, scratch: scratch)
    }

    @Test("4 writers go on; a full backup and 10 incrementals pulled from views; every point restores to what its view showed")
    func chainFromViewsUnderWriters() throws {
        let size = 16 * Self.mib
        let fixture = try ControlFixture(size: size, extraArguments: ["--bitmap", "b0"])
        let scratch = try TestDirectory()
        let directory = scratch.file("chain")
        let client = try fixture.qmp()
        let writers = Views.Writers(try (0..<4).map { _ in try fixture.connect() }, size: UInt64(size))
        defer { writers.stop() }
        var expected: [String] = []
        for round in 0...10 {
            let before = writers.count
            while writers.count < before + 20 { usleep(2_000) }
            let created = try Views.create(client)
            let viewURI = try fixture.uri(export: created.view)
            let snapshot = scratch.file("view-\(round).raw")
            try BackupChecks.snapshot(try fixture.connect(export: created.view), to: snapshot)
            expected.append(snapshot)
            let summary =
                round == 0
                ? try BackupChecks.backup(["full", viewURI, directory])
                : try BackupChecks.backup(["incremental", viewURI, directory, "--bitmap", created.checkpoint])
            #expect(summary["index"] as? Int == round)
            try client.run("checkpoint-complete", ["node": "disk", "name": .string(created.checkpoint)])
        }
        writers.stop()
        #expect(writers.failures.all.isEmpty, "\(writers.failures.all)")
        try BackupChecks.checkChain(directory, expected: expected, scratch: scratch)
    }

    @Test("a failed pull aborts the checkpoint: the bitmap keeps every change")
    func failedPullAborts() throws {
        let fixture = try ControlFixture(size: 4 * Self.mib, extraArguments: ["--bitmap", "b0"])
        let scratch = try TestDirectory()
        let uri = try fixture.uri()
        let client = try fixture.qmp()
        try fixture.write([(offset: 0, length: 65536), (offset: 1 << 20, length: 4096)])
        let before = try ControlFixture.bitmaps(client)["b0"]?["count"]
        // A directory that cannot be created makes the backup fail after checkpoint-create.
        let blocker = scratch.file("file")
        #expect(FileManager.default.createFile(atPath: blocker, contents: Data()))
        let result = try ControlPrograms.tidemark(["backup", "full", uri, blocker + "/chain", "--control", fixture.controlPath, "--bitmap", "b0"])
        #expect(!result.succeeded)
        #expect(try client.run("query-checkpoints") == [])
        #expect(try ControlFixture.bitmaps(client)["b0"]?["count"] == before, "aborted: the changes were merged back")
    }
}
