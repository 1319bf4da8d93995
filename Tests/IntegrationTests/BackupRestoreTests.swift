import Foundation
import NBDClient
import Testing
import TidemarkBackup

/// Restoring through NBD and choosing chain points by name.
@Suite("Backup: restore targets and chain points")
struct BackupRestoreTests {
    static let mib = 1 << 20

    @Test("restore to an NBD export overwrites old data everywhere, zero ranges included")
    func restoreToNBD() throws {
        let size = 8 * Self.mib
        let source = try ServerFixture(size: size, filled: true, extraArguments: ["--bitmap", "b0"])
        let scratch = try TestDirectory()
        let chain = scratch.file("chain")
        let writer = try source.connect()
        try writer.zero(count: 1 << 20, offset: 2 << 20)
        try writer.trim(count: 512 << 10, offset: 6 << 20)
        _ = try BackupChecks.backup(["full", source.uri, chain])
        try writer.pwrite(ImageFile.constant(0x42, count: 65536), offset: 4 << 20)
        try writer.zero(count: 1 << 20, offset: 0)
        _ = try BackupChecks.backup(["incremental", source.uri, chain, "--bitmap", "b0"])
        try BackupChecks.snapshot(writer, to: scratch.file("expected.raw"))
        try writer.shutdown()

        // The target holds different bytes everywhere before the restore.
        let targetDirectory = try TestDirectory()
        let targetImage = targetDirectory.file("target.raw")
        try ImageFile.write(targetImage, bytes: ImageFile.constant(0xEE, count: size))
        let target = try TidemarkProcess.serve(image: targetImage, in: targetDirectory)
        let restored = try ControlPrograms.tidemark(["restore", chain, target.uri, "--json"])
        try restored.requireSuccess()
        try target.stop()
        #expect(try BitmapImages.differingGranules(targetImage, scratch.file("expected.raw"), granule: 65536).isEmpty)

        // --at by index and by file name give the full backup's point.
        try ControlPrograms.tidemark(["restore", chain, "--at", "backup-0000.qcow2", scratch.file("zero.raw")]).requireSuccess()
        try ExternalTool.check("qemu-img", [
            "compare", "-f", "raw", "-F", "qcow2", scratch.file("zero.raw"), chain + "/backup-0000.qcow2",
        ])
        let unknown = try ControlPrograms.tidemark(["restore", chain, "--at", "nope", scratch.file("x.raw")])
        #expect(!unknown.succeeded && unknown.stderr.contains("no backup 'nope' in the chain"), "\(unknown)")
    }
}
