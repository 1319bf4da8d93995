import Foundation
import NBDClient
import Testing
import TidemarkBackup

/// What a backup does when things go wrong: the server dies mid-pull, the bitmap is
/// missing, the server has no bitmaps, the disk was resized. Each gives a clear error and
/// leaves no file that looks like a good backup; the next run succeeds.
@Suite("Backup: failures")
struct BackupFailureTests {
    static let mib = 1 << 20

    /// Names in the directory (empty when it does not exist).
    static func files(_ directory: String) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []).sorted()
    }

    @Test("server killed mid-pull: connection error, no backup file left, the rerun succeeds")
    func serverKilledMidPull() throws {
        let size = 96 * Self.mib
        let directory = try TestDirectory()
        let image = directory.file("image.raw")
        try ImageFile.createFilled(image, size: size)
        let server = try TidemarkProcess.serve(image: image, in: directory)
        let chain = directory.file("chain")
        var options = BackupJob.Options(uri: server.uri, directory: chain, kind: .full)
        options.window = 2
        options.requestSize = 64 << 10
        let killer = KillOnProgress(pid: server.process.processIdentifier)
        options.progress = { progress in killer.observe(progress) }
        do {
            _ = try BackupJob(options: options).run()
            Issue.record("the backup succeeded although the server was killed")
        } catch {
            guard case .connectionLost = error else {
                Issue.record("expected connectionLost, got \(error)")
                return
            }
            #expect(error.description.contains("partial file was removed"))
        }
        let copiedBeforeKill = killer.killedAfter ?? 0
        #expect(copiedBeforeKill > 0 && copiedBeforeKill < UInt64(size), "killed after \(copiedBeforeKill) bytes")
        #expect(Self.files(chain).isEmpty, "left behind: \(Self.files(chain))")
        server.process.waitUntilExit()

        // A stale partial file from an earlier crash is removed too.
        #expect(FileManager.default.createFile(atPath: chain + "/backup-0000.qcow2.partial", contents: Data([1, 2, 3])))
        let restarted = try TidemarkProcess.serve(image: image, in: directory)
        let result = try ControlPrograms.tidemark(["backup", "full", restarted.uri, chain, "--json"], timeout: 300)
        try result.requireSuccess()
        #expect(Self.files(chain) == ["backup-0000.json", "backup-0000.qcow2"])
        try ControlPrograms.tidemark(["restore", chain, directory.file("restored.raw")]).requireSuccess()
        #expect(try BitmapImages.differingGranules(directory.file("restored.raw"), image, granule: 65536).isEmpty)
        try restarted.stop()
    }

    @Test("incremental with a bitmap the server lacks: the error names the ones it has")
    func missingBitmap() throws {
        let fixture = try ServerFixture(size: 4 * Self.mib, extraArguments: ["--bitmap", "b0"])
        let scratch = try TestDirectory()
        let chain = scratch.file("chain")
        _ = try BackupChecks.backup(["full", fixture.uri, chain])
        let options = BackupJob.Options(uri: fixture.uri, directory: chain, kind: .incremental, bitmap: "nope")
        #expect(throws: BackupError.bitmapNotFound(name: "nope", available: ["b0"])) {
            try BackupJob(options: options).run()
        }
        let cli = try ControlPrograms.tidemark(["backup", "incremental", fixture.uri, chain, "--bitmap", "nope"])
        #expect(!cli.succeeded)
        #expect(cli.stderr.contains("the server has no bitmap 'nope' (available: b0)"), "\(cli)")
        #expect(Self.files(chain) == ["backup-0000.json", "backup-0000.qcow2"])
    }

    @Test("incremental from a server without any dirty bitmap: a clear error")
    func serverWithoutBitmaps() throws {
        let fixture = try ServerFixture(size: 4 * Self.mib)
        let scratch = try TestDirectory()
        let chain = scratch.file("chain")
        _ = try BackupChecks.backup(["full", fixture.uri, chain])
        let options = BackupJob.Options(uri: fixture.uri, directory: chain, kind: .incremental, bitmap: "b0")
        #expect(throws: BackupError.serverLacksDirtyBitmaps(uri: fixture.uri)) {
            try BackupJob(options: options).run()
        }
    }

    @Test("incremental after the disk was resized: size-changed error, chain untouched")
    func sizeChanged() throws {
        let scratch = try TestDirectory()
        let chain = scratch.file("chain")
        let small = try ServerFixture(size: 4 * Self.mib, extraArguments: ["--bitmap", "b0"])
        _ = try BackupChecks.backup(["full", small.uri, chain])
        let large = try ServerFixture(size: 8 * Self.mib, extraArguments: ["--bitmap", "b0"])
        let options = BackupJob.Options(uri: large.uri, directory: chain, kind: .incremental, bitmap: "b0")
        #expect(throws: BackupError.sizeChanged(previous: UInt64(4 * Self.mib), current: UInt64(8 * Self.mib))) {
            try BackupJob(options: options).run()
        }
        let cli = try ControlPrograms.tidemark(["backup", "incremental", large.uri, chain, "--bitmap", "b0"])
        #expect(!cli.succeeded && cli.stderr.contains("the disk was resized"), "\(cli)")
        #expect(Self.files(chain) == ["backup-0000.json", "backup-0000.qcow2"])
    }

    @Test("a full backup into a directory with a chain, or an incremental without one, is refused")
    func chainPreconditions() throws {
        let fixture = try ServerFixture(size: 4 * Self.mib, extraArguments: ["--bitmap", "b0"])
        let scratch = try TestDirectory()
        let chain = scratch.file("chain")
        #expect(throws: BackupError.noChain(directory: chain)) {
            try BackupJob(options: .init(uri: fixture.uri, directory: chain, kind: .incremental, bitmap: "b0")).run()
        }
        _ = try BackupChecks.backup(["full", fixture.uri, chain])
        #expect(throws: BackupError.chainExists(directory: chain)) {
            try BackupJob(options: .init(uri: fixture.uri, directory: chain, kind: .full)).run()
        }
    }

    @Test("verify catches a corrupted data cluster")
    func verifyCatchesCorruption() throws {
        let fixture = try ServerFixture(size: 4 * Self.mib, filled: true)
        let scratch = try TestDirectory()
        let chain = scratch.file("chain")
        _ = try BackupChecks.backup(["full", fixture.uri, chain])
        #expect(try ControlPrograms.tidemark(["verify", chain]).succeeded)
        // Flip one byte of the first data cluster (host cluster 1).
        let path = chain + "/backup-0000.qcow2"
        let handle = try #require(FileHandle(forUpdatingAtPath: path))
        try handle.seek(toOffset: 65536 + 100)
        let byte = try handle.read(upToCount: 1) ?? Data([0])
        try handle.seek(toOffset: 65536 + 100)
        handle.write(Data([byte[byte.startIndex] ^ 0xFF]))
        try handle.close()
        let verify = try ControlPrograms.tidemark(["verify", chain])
        #expect(!verify.succeeded && verify.stdout.contains("MISMATCH"), "\(verify)")
    }
}

/// SIGKILLs a process from the backup's progress callback once data has moved.
final class KillOnProgress: @unchecked Sendable {
    private let lock = NSLock()
    private let pid: Int32
    private var copied: UInt64?

    init(pid: Int32) { self.pid = pid }

    func observe(_ progress: BackupProgress) {
        guard progress.bytesCopied > 0 else { return }
        lock.lock()
        defer { lock.unlock() }
        if copied == nil {
            copied = progress.bytesCopied
            kill(pid, SIGKILL)
        }
    }

    /// Bytes copied when the kill was sent.
    var killedAfter: UInt64? {
        lock.lock()
        defer { lock.unlock() }
        return copied
    }
}
