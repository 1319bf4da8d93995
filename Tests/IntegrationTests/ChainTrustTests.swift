import Foundation
import NBDClient
import Testing
import TestSupport
import TidemarkBackup
import QMPWire

#if canImport(Glibc)
import Glibc
#endif

/// Chains you can trust: whatever dies mid-backup (the backup client, the server, a plain
/// QMP client that made a checkpoint), the next backup holds every change, and a backup
/// never claims a point it does not hold.
@Suite("Chain trust: checkpoints whose creator is gone", .serialized)
struct ChainTrustTests {
    static let mib = 1 << 20

    /// A server with a persistent `b0`, a writer, and a chain started with a full backup
    /// through `--control`.
    final class Setup {
        let fixture: ControlFixture
        let scratch: TestDirectory
        let chain: String
        var expected: [String] = []
        var generator = SeededGenerator(seed: 2026)
        let size: Int

        init(size: Int = 64 << 20, extraArguments: [String] = []) throws {
            self.size = size
            fixture = try ControlFixture(size: size, extraArguments: ["--bitmap", "b0"] + extraArguments)
            scratch = try TestDirectory()
            chain = scratch.file("chain")
            try mutateAndSnapshot(uri: fixture.uri())
            _ = try BackupChecks.backup(["full", try fixture.uri(), chain, "--control", fixture.controlPath, "--bitmap", "b0"])
        }

        /// Random changes plus `bulk` bytes of new data at the disk's start, then the
        /// image as the next backup must show it.
        func mutateAndSnapshot(uri: String, bulk: Int = 0) throws {
            let writer = try NBDConnection()
            try writer.connect(uri: uri)
            defer { try? writer.shutdown() }
            try BackupChecks.mutate(writer, size: UInt64(size), operations: 40, generator: &generator)
            var offset = 0
            let seed = UInt8(expected.count + 7)
            while offset < bulk {
                let count = min(4 * ChainTrustTests.mib, bulk - offset)
                try writer.pwrite(ImageFile.pattern(count: count, offset: offset, seed: seed), offset: UInt64(offset))
                offset += count
            }
            try writer.flush()
            let path = scratch.file("expected-\(expected.count).raw")
            try BackupChecks.snapshot(writer, to: path)
            expected.append(path)
        }

        func incremental(uri: String, control: String) throws -> [String: Any] {
            try BackupChecks.backup(["incremental", uri, chain, "--control", control, "--bitmap", "b0"])
        }

        func backgroundIncremental(uri: String, control: String) throws -> BackgroundProgram {
            try BackgroundProgram(
                TidemarkProcess.binaryPath, ["backup", "incremental", uri, chain, "--control", control, "--bitmap", "b0"])
        }

        var manifests: [BackupManifest] { (try? BackupDirectory(path: chain).chain()) ?? [] }

        /// Writes 48 MiB and more, then starts an incremental backup in the background and
        /// returns once its checkpoint exists (so a kill lands with the checkpoint pending).
        func startIncrementalAfterChanges() throws -> (client: BackgroundProgram, observer: QMPTestClient, created: QMPJSON) {
            let uri = try fixture.uri()
            try mutateAndSnapshot(uri: uri, bulk: 48 * ChainTrustTests.mib)
            let observer = try fixture.qmp()
            let client = try backgroundIncremental(uri: uri, control: fixture.controlPath)
            let created = try observer.waitForEvent("CHECKPOINT_CREATED", timeout: 60)
            return (client, observer, created)
        }
    }

    @Test("backup client killed with its checkpoint pending; the immediate rerun holds every change")
    func clientKilledThenRerun() throws {
        let setup = try Setup()
        let uri = try setup.fixture.uri()
        let (client, observer, created) = try setup.startIncrementalAfterChanges()
        client.kill()
        #expect(client.wasSignalled)
        let orphan = created["data"]?["name"]
        let pending = try observer.run("query-checkpoints")
        if setup.manifests.count == 1 {
            #expect(pending.arrayValue?.count == 1, "killed mid-pull: its checkpoint is still pending: \(pending)")
        }

        let rerun = try setup.incremental(uri: uri, control: setup.fixture.controlPath)
        #expect(rerun["index"] as? Int == setup.manifests.count - 1)
        #expect((rerun["bytesCopied"] as? Int ?? 0) >= 48 * Self.mib, "the rerun copied the orphan's changes: \(rerun)")
        if setup.manifests.count == 2 {
            let superseded = try observer.waitForEvent("CHECKPOINT_ABORTED", timeout: 10)
            #expect(superseded["data"]?["name"] == orphan && superseded["data"]?["reason"] == "superseded")
            let manifest = setup.manifests[1]
            #expect(manifest.coveredCheckpointIDs?.isEmpty == false, "the rerun's increment covers the orphan")
        }
        #expect(try observer.run("query-checkpoints") == [])
        // The chain's last point equals the image as written before the killed backup.
        let points = setup.manifests.count
        try BackupChecks.checkChain(
            setup.chain, expected: points == 3 ? [setup.expected[0], setup.expected[1], setup.expected[1]] : setup.expected,
            scratch: setup.scratch)
    }

    @Test("server killed mid-pull: the client fails with a message; after a restart the rerun holds every change, and an unclaimed checkpoint is aborted after the timeout")
    func serverKilledThenRerun() throws {
        let setup = try Setup()
        let (client, _, _) = try setup.startIncrementalAfterChanges()
        _ = try setup.fixture.server.stop(signal: SIGKILL)
        let failed = try client.wait(timeout: 120)
        #expect(!client.wasSignalled && failed.status == 1, "a clear failure, not SIGPIPE: \(failed)")
        #expect(!failed.stderr.isEmpty)
        #expect(setup.manifests.count == 1, "nothing claimed: \(setup.manifests.map(\.file))")

        // Restart, rerun at once: the pending checkpoint from before the kill is superseded.
        var (server, control) = try setup.fixture.restart(extraArguments: ["--checkpoint-timeout", "3"])
        var restartedURI = try server.unixURI(export: "disk")
        let rerun = try setup.incremental(uri: restartedURI, control: control)
        #expect(rerun["index"] as? Int == 1)
        #expect((rerun["bytesCopied"] as? Int ?? 0) >= 48 * Self.mib, "\(rerun)")
        try BackupChecks.checkChain(setup.chain, expected: setup.expected, scratch: setup.scratch)

        // Kill the server mid-pull again; restart and leave the checkpoint alone: it is
        // aborted after --checkpoint-timeout, its changes back in b0.
        try setup.mutateAndSnapshot(uri: restartedURI, bulk: 32 * Self.mib)
        var watcher = try QMPTestClient(path: control)
        let second = try setup.backgroundIncremental(uri: restartedURI, control: control)
        _ = try watcher.waitForEvent("CHECKPOINT_CREATED", timeout: 60)
        _ = try server.stop(signal: SIGKILL)
        _ = try second.wait(timeout: 120)
        watcher.close()
        (server, control) = try setup.fixture.restart(extraArguments: ["--checkpoint-timeout", "3"], suffix: "3")
        defer { _ = try? server.stop() }
        restartedURI = try server.unixURI(export: "disk")
        watcher = try QMPTestClient(path: control)
        #expect(try watcher.run("query-checkpoints").arrayValue?.count == 1, "pending again after the restart")
        let aborted = try watcher.waitForEvent("CHECKPOINT_ABORTED", timeout: 20)
        #expect(aborted["data"]?["reason"] == "client-disconnected")
        #expect(try watcher.run("query-checkpoints") == [])
        #expect(try ControlFixture.bitmaps(watcher)["b0"]?["count"]?.intValue ?? 0 >= Int64(32 * Self.mib))
        let third = try setup.incremental(uri: restartedURI, control: control)
        #expect(third["index"] as? Int == 2)
        try BackupChecks.checkChain(setup.chain, expected: setup.expected, scratch: setup.scratch)
    }

    @Test("a QMP client's checkpoint: refused while it is connected, superseded once it is gone")
    func plainQMPCreatorGone() throws {
        let fixture = try ControlFixture(extraArguments: ["--bitmap", "b0"])
        try fixture.write([(1 << 20, 4096)])
        let owner = try fixture.qmp()
        let first = try owner.run("checkpoint-create", ["node": "disk", "bitmap": "b0"])
        try fixture.write([(5 << 20, 4096)])
        let other = try fixture.qmp()
        let refused = try other.failure("checkpoint-create", ["node": "disk", "bitmap": "b0"])
        #expect(refused.desc.contains("still pending and its client is connected"), "\(refused)")
        owner.close()
        // The server learns of the close asynchronously; until it has, the checkpoint still
        // has a connected client and the refusal says so. Ask again until it has (5 s at most).
        var created: QMPJSON?
        for _ in 0..<500 where created == nil {
            do {
                created = try other.run("checkpoint-create", ["node": "disk", "bitmap": "b0"])
            } catch let error as QMPReplyError where error.desc.contains("its client is connected") {
                usleep(10_000)
            }
        }
        let second = try #require(created, "the server never noticed the owner's disconnect")
        #expect(second["count"] == .int(2 * 65536), "the orphan's granule and the later one: \(second)")
        #expect(second["covers"] == [first["id"] ?? .null])
        #expect(second["base"] == .null)
        let stale = try other.failure("checkpoint-complete", ["node": "disk", "name": first["name"] ?? .null])
        #expect(stale.desc.contains("superseded by"), "\(stale)")
        try other.run("checkpoint-complete", ["node": "disk", "name": second["name"] ?? .null])
        let third = try other.run("checkpoint-create", ["node": "disk", "bitmap": "b0"])
        #expect(third["base"] == second["name"] && third["base-id"] == second["id"] && third["covers"] == [])
    }

    @Test("checkpoint names never repeat across restarts, clean or killed")
    func namesUniqueAcrossRestarts() throws {
        let fixture = try ControlFixture(extraArguments: ["--bitmap", "b0"])
        var client = try fixture.qmp()
        #expect(try client.run("checkpoint-create", ["node": "disk", "bitmap": "b0"])["name"] == "c1")
        try client.run("checkpoint-complete", ["node": "disk", "name": "c1"])
        client.close()
        #expect(try fixture.server.stop() == .success)
        var (server, control) = try fixture.restart()
        client = try QMPTestClient(path: control)
        #expect(try client.run("checkpoint-create", ["node": "disk", "bitmap": "b0"])["name"] == "c2")
        try client.run("checkpoint-complete", ["node": "disk", "name": "c2"])
        let reused = try client.failure("checkpoint-create", ["node": "disk", "bitmap": "b0", "name": "c1"])
        #expect(reused.desc.contains("already used"), "\(reused)")
        client.close()
        _ = try server.stop(signal: SIGKILL)
        (server, control) = try fixture.restart(suffix: "3")
        defer { _ = try? server.stop() }
        client = try QMPTestClient(path: control)
        #expect(try client.run("checkpoint-create", ["node": "disk", "bitmap": "b0"])["name"] == "c3")
    }

    @Test("an increment that does not start at the chain's last point is refused, and its changes stay recorded")
    func chainMismatchRefused() throws {
        let setup = try Setup(size: 16 << 20)
        let uri = try setup.fixture.uri()
        try setup.fixture.write([(2 << 20, 65536)], byte: 0x31)
        // Someone else completes a checkpoint: its changes are in no backup of this chain.
        let control = ["--control", setup.fixture.controlPath]
        let created = try ControlPrograms.tidemark(["checkpoint", "create"] + control + ["--bitmap", "b0"])
        try created.requireSuccess()
        let name = created.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        try ControlPrograms.tidemark(["checkpoint", "complete"] + control + [name]).requireSuccess()
        try setup.fixture.write([(6 << 20, 65536)], byte: 0x32)

        let refused = try ControlPrograms.tidemark(
            ["backup", "incremental", uri, setup.chain, "--control", setup.fixture.controlPath, "--bitmap", "b0"])
        #expect(refused.status == 1 && refused.stderr.contains("would miss changes"), "\(refused)")
        #expect(setup.manifests.count == 1)
        let client = try setup.fixture.qmp()
        #expect(try client.run("query-checkpoints") == [], "the refused backup aborted its checkpoint")
        #expect(try ControlFixture.bitmaps(client)["b0"]?["count"] == .int(65536), "the later change is still recorded")
        // verify flags a chain whose links are broken.
        var manifest = setup.manifests[0]
        manifest.index = 1
        manifest.kind = .incremental
        manifest.file = BackupDirectory.imageName(index: 1)
        manifest.backingFile = BackupDirectory.imageName(index: 0)
        manifest.baseCheckpointID = "0123456789abcdef0123456789abcdef"
        #expect(!ChainVerifier.linkProblems([setup.manifests[0], manifest]).isEmpty)
    }

    @Test("a backup renamed into the chain with its checkpoint left pending: the next incremental extends it")
    func backupRecordedCheckpointPending() throws {
        let setup = try Setup(size: 32 << 20)
        let uri = try setup.fixture.uri()
        try setup.mutateAndSnapshot(uri: uri)
        // What a client killed between the rename and checkpoint-complete leaves behind.
        let client = try setup.fixture.qmp()
        let created = try client.run("checkpoint-create", ["node": "disk", "bitmap": "b0", "view": true])
        guard case .string(let name)? = created["name"], case .string(let view)? = created["view"],
            case .string(let id)? = created["id"]
        else { throw HarnessError("checkpoint-create: \(created)") }
        var options = BackupJob.Options(
            uri: try setup.fixture.uri(export: view), directory: setup.chain, kind: .incremental, bitmap: name)
        options.recordedBitmap = "b0"
        options.checkpoint = name
        options.checkpointID = id
        if case .string(let base)? = created["base-id"] { options.baseCheckpointID = base }
        _ = try BackupJob(options: options).run()
        client.close()
        #expect(setup.manifests.count == 2 && setup.manifests[1].checkpointID == id)

        try setup.mutateAndSnapshot(uri: uri)
        let next = try setup.incremental(uri: uri, control: setup.fixture.controlPath)
        #expect(next["index"] as? Int == 2)
        #expect(setup.manifests[2].coveredCheckpointIDs == [id])
        try BackupChecks.checkChain(setup.chain, expected: setup.expected, scratch: setup.scratch)
    }
}
