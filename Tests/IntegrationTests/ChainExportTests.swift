import Foundation
import NBDClient
import QMPWire
import Testing
import TestSupport
import TidemarkBackup

#if canImport(Glibc)
import Glibc
#endif

/// Points of a backup chain served by `tidemark serve --export NAME=backup:DIR[@POINT][:rw]`
/// against `tidemark restore`, qemu-nbd and qemu-img, with real clients.
@Suite("Chain exports: serving backup points, read-only and through an overlay")
struct ChainExportTests {
    static let size = 16 << 20

    /// A Tidemark chain of a full backup and three incrementals of random writes, zeroes
    /// and trims, of a `size`-byte disk; returns the directory and each point's expected
    /// raw image.
    static func makeChain(in scratch: TestDirectory, seed: UInt64, size: Int = ChainExportTests.size) throws -> (String, [String]) {
        let fixture = try ControlFixture(size: size, extraArguments: ["--bitmap", "b0"])
        let directory = scratch.file("chain")
        var generator = SeededGenerator(seed: seed)
        let uri = try fixture.uri()
        let writer = try fixture.connect()
        try BackupChecks.mutate(writer, size: UInt64(size), operations: 40, generator: &generator)
        var expected: [String] = []
        _ = try BackupChecks.backup(["full", uri, directory])
        expected.append(scratch.file("expected-0.raw"))
        try BackupChecks.snapshot(writer, to: expected[0])
        for round in 1...3 {
            try BackupChecks.mutate(writer, size: UInt64(size), operations: 30, generator: &generator)
            let created = try ControlPrograms.tidemark(["checkpoint", "create", "--control", fixture.controlPath, "--bitmap", "b0"])
            try created.requireSuccess()
            let checkpoint = created.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            _ = try BackupChecks.backup(["incremental", uri, directory, "--bitmap", checkpoint])
            expected.append(scratch.file("expected-\(round).raw"))
            try BackupChecks.snapshot(writer, to: expected[round])
            try ControlPrograms.tidemark(["checkpoint", "complete", "--control", fixture.controlPath, checkpoint]).requireSuccess()
        }
        try writer.shutdown()
        return (directory, expected)
    }

    /// `nbdinfo --map` lines as one flags value per 64 KiB cluster.
    static func clusterFlags(nbdinfo text: String) throws -> [UInt32] {
        var flags: [UInt32] = []
        for line in text.split(separator: "\n") {
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            guard fields.count >= 3, let offset = Int(fields[0]), let length = Int(fields[1]), let value = UInt32(fields[2]) else {
                throw HarnessError("unexpected nbdinfo --map line: \(line)")
            }
            #expect(offset == flags.count * 65536, "nbdinfo runs are contiguous and cluster-aligned")
            flags += repeatElement(value, count: length / 65536)
        }
        return flags
    }

    /// `qemu-img map --output=json` of a qcow2 chain as NBD `base:allocation` flags per
    /// cluster: data 0, a zero cluster somewhere in the chain 2 (ZERO), nothing 3 (HOLE|ZERO).
    static func clusterFlags(qemuImgMap text: String) throws -> [UInt32] {
        guard let entries = try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [[String: Any]] else {
            throw HarnessError("qemu-img map printed no array: \(text)")
        }
        var flags: [UInt32] = []
        for entry in entries {
            guard let length = entry["length"] as? Int, let data = entry["data"] as? Bool, let present = entry["present"] as? Bool
            else { throw HarnessError("unexpected qemu-img map entry \(entry)") }
            let value: UInt32 = data ? 0 : (present ? 2 : 3)
            flags += repeatElement(value, count: length / 65536)
        }
        return flags
    }

    @Test("every point reads byte-identical to tidemark restore and to qemu-nbd -r of the same file; nbdinfo --map agrees with qemu-img map")
    func everyPointMatches() throws {
        let scratch = try TestDirectory()
        let (directory, expected) = try Self.makeChain(in: scratch, seed: 170)
        let socket = scratch.file("chain.sock")
        var arguments = ["serve", "--unix", socket]
        for point in 0..<4 { arguments += ["--export", "p\(point)=backup:\(directory)@\(point)"] }
        arguments += ["--export", "newest=backup:\(directory)"]
        let server = try TidemarkProcess(arguments: arguments, directory: scratch)
        defer { _ = try? server.stop(signal: SIGKILL) }
        for point in 0..<4 {
            let uri = try server.unixURI(export: "p\(point)")
            let served = scratch.file("served-\(point).raw")
            try ExternalTool.check("nbdcopy", [uri, served])
            let restored = scratch.file("restored-\(point).raw")
            try ControlPrograms.tidemark(["restore", directory, "--at", String(point), restored]).requireSuccess()
            #expect(try ImageFile.sha256(served) == ImageFile.sha256(restored), "point \(point): served vs restore")
            #expect(try ImageFile.sha256(served) == ImageFile.sha256(expected[point]), "point \(point): served vs source")
            let top = directory + "/" + BackupDirectory.imageName(index: point)
            try ExternalTool.check("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", uri, top])
            // qemu-nbd serving the same top file read-only: the same bytes.
            let reference = try BitmapReferenceServer(
                "qemu-nbd", ["-t", "-r", "-k", scratch.file("qemu-nbd-\(point).sock"), "-f", "qcow2", "-x", "ref", top],
                socketPath: scratch.file("qemu-nbd-\(point).sock"), directory: scratch)
            let fromQemu = scratch.file("qemu-\(point).raw")
            try ExternalTool.check("nbdcopy", [reference.uri(export: "ref"), fromQemu])
            reference.stop()
            try ExternalTool.check("cmp", [served, fromQemu])
            let map = try ExternalTool.check("nbdinfo", ["--map", uri]).stdout
            let qemuMap = try ExternalTool.check("qemu-img", ["map", "--output=json", "-f", "qcow2", top]).stdout
            let ours = try Self.clusterFlags(nbdinfo: map)
            let theirs = try Self.clusterFlags(qemuImgMap: qemuMap)
            #expect(ours.count == Self.size / 65536)
            #expect(ours == theirs, "point \(point): nbdinfo --map\n\(map)\nqemu-img map\n\(qemuMap)")
            #expect(ours.contains(3) && ours.contains(0), "the chain has holes and data: \(map)")
        }
        let newest = scratch.file("newest.raw")
        try ExternalTool.check("nbdcopy", [try server.unixURI(export: "newest"), newest])
        #expect(try ImageFile.sha256(newest) == ImageFile.sha256(expected[3]))
        // Read-only: writes are refused.
        let result = try ExternalTool.run(
            "qemu-io", ["-f", "raw", "-c", "write -P 1 0 4k", try server.unixURI(export: "p3")])
        #expect(!result.succeeded, "a read-only chain export took a write: \(result)")
    }

    @Test("overlay: writes and zeroes, FLUSH, kill -9, restart: every flushed write is there, the bitmap recorded them, the backup verifies unchanged")
    func overlaySurvivesKill() throws {
        let scratch = try TestDirectory()
        let (directory, expected) = try Self.makeChain(in: scratch, seed: 171)
        let checksums = try Self.checksums(ofChain: directory)
        let socket = scratch.file("rw.sock")
        let server = try TidemarkProcess(
            arguments: ["serve", "--unix", socket, "--export", "vm=backup:\(directory):rw", "--bitmap", "since-restore"],
            directory: scratch)
        var model = try ImageFile.read(expected[3])
        var generator = SeededGenerator(seed: 9)
        let connection = try server.connect(export: "vm")
        for round in 0..<80 {
            let length = Int.random(in: 1...256, using: &generator) * 512
            let offset = Int.random(in: 0..<(Self.size - length) / 512, using: &generator) * 512
            if round % 5 == 4 {
                try connection.zero(count: UInt64(length), offset: UInt64(offset))
                model.replaceSubrange(offset..<(offset + length), with: repeatElement(0, count: length))
            } else {
                let bytes = ImageFile.pattern(count: length, offset: offset, seed: UInt8(round))
                try connection.pwrite(bytes, offset: UInt64(offset))
                model.replaceSubrange(offset..<(offset + length), with: bytes)
            }
        }
        try connection.flush()
        #expect(try connection.pread(count: Self.size, offset: 0) == model, "reads take the overlay where written")
        try server.stop(signal: SIGKILL)

        let restarted = try TidemarkProcess(
            arguments: ["serve", "--unix", scratch.file("rw2.sock"), "--export", "vm=backup:\(directory):rw", "--bitmap", "since-restore"],
            directory: scratch)
        defer { _ = try? restarted.stop(signal: SIGKILL) }
        let again = try restarted.connect(export: "vm")
        #expect(try again.pread(count: Self.size, offset: 0) == model, "every flushed write survived kill -9")
        try again.shutdown()
        let dirty = try ExternalTool.check(
            "nbdinfo", ["--map=qemu:dirty-bitmap:since-restore", try restarted.unixURI(export: "vm")]).stdout
        #expect(dirty.contains("dirty"), "the bitmap on the overlay recorded the writes across the crash: \(dirty)")
        #expect(try Self.checksums(ofChain: directory) == checksums, "the backup files were not touched")
        let verify = try ControlPrograms.tidemark(["verify", directory])
        #expect(verify.succeeded, "tidemark verify: \(verify)")
    }

    /// The SHA-256 of each of the four files `makeChain` writes, to show a test left them alone.
    static func checksums(ofChain directory: String) throws -> [String] {
        try (0..<4).map { try ImageFile.sha256(directory + "/" + BackupDirectory.imageName(index: $0)) }
    }

    /// The disk of the fio chain: fio writes all of it.
    static let fioSize = 32 << 20

    /// One fio job over the whole disk: random writes of 4 to 64 KiB with a fixed seed (so
    /// a `--verify_only=1` run replays the same blocks), flushed at the end.
    static let fioJob = [
        "--name=overlay", "--rw=randwrite", "--bsrange=4k-64k", "--iodepth=8", "--size=\(fioSize)",
        "--randseed=4242", "--end_fsync=1",
    ]

    @Test("fio randwrite with crc32c verify on a :rw chain export passes; after kill -9 and a restart on the same overlay, fio verify_only finds every block; the chain alone fails it")
    func fioOnOverlay() throws {
        let scratch = try TestDirectory()
        let (directory, _) = try Self.makeChain(in: scratch, seed: 175, size: Self.fioSize)
        let checksums = try Self.checksums(ofChain: directory)
        let server = try TidemarkProcess(
            arguments: ["serve", "--unix", scratch.file("fio.sock"), "--export", "vm=backup:\(directory):rw"], directory: scratch)
        let written = try FioTests.fio(try server.unixURI(export: "vm"), in: scratch, Self.fioJob)
        #expect(FioTests.jobErrors(written) == [0])
        #expect(FioTests.ioBytes(written, "write") == Self.fioSize, "fio wrote the whole disk")
        #expect(FioTests.ioBytes(written, "read") == Self.fioSize, "and read all of it back to verify it")
        try server.stop(signal: SIGKILL)

        let restarted = try TidemarkProcess(
            arguments: ["serve", "--unix", scratch.file("fio2.sock"), "--export", "vm=backup:\(directory):rw",
                        "--export", "chain=backup:\(directory)"],
            directory: scratch)
        defer { _ = try? restarted.stop(signal: SIGKILL) }
        let verified = try FioTests.fio(try restarted.unixURI(export: "vm"), in: scratch, Self.fioJob + ["--verify_only=1"])
        #expect(FioTests.jobErrors(verified) == [0], "every block fio wrote and flushed is in the overlay after kill -9")
        #expect(FioTests.ioBytes(verified, "read") == Self.fioSize, "every block read back and checked")
        // The same verification of the chain point without the overlay (read-only, so fio
        // cannot have written it) fails on the first block: verify_only reads and checks.
        let chainOnly = try ExternalTool.run(
            "fio", FioTests.verifyingArguments(try restarted.unixURI(export: "chain")) + Self.fioJob + ["--verify_only=1"],
            timeout: 180, currentDirectory: scratch.path)
        #expect(!chainOnly.succeeded && chainOnly.stderr.contains("verify: bad magic header"), "\(chainOnly)")
        #expect(try Self.checksums(ofChain: directory) == checksums, "the backup files were not touched")
        let verify = try ControlPrograms.tidemark(["verify", directory])
        #expect(verify.succeeded, "tidemark verify: \(verify)")
    }

    @Test("block-export-add with filename backup:DIR@POINT serves the point; writable uses the overlay")
    func controlPlaneAdds() throws {
        let scratch = try TestDirectory()
        let (directory, expected) = try Self.makeChain(in: scratch, seed: 172)
        let fixture = try ControlFixture(empty: true)
        let qmp = try fixture.qmp()
        _ = try qmp.run("block-export-add", ["type": "nbd", "id": "b1", "filename": .string("backup:\(directory)@1")])
        let copy = scratch.file("b1.raw")
        try ExternalTool.check("nbdcopy", [try fixture.uri(export: "b1"), copy])
        #expect(try ImageFile.sha256(copy) == ImageFile.sha256(expected[1]))
        _ = try qmp.run("block-export-add", ["type": "nbd", "id": "w", "filename": .string("backup:\(directory)"), "writable": true])
        try ExternalTool.check("qemu-io", ["-f", "raw", "-c", "write -P 0x5a 1M 64k", "-c", "flush", try fixture.uri(export: "w")])
        let read = try ExternalTool.check("qemu-io", ["-f", "raw", "-c", "read -P 0x5a 1M 64k", try fixture.uri(export: "w")])
        #expect(!read.stdout.contains("Pattern verification failed"), "\(read)")
        #expect(FileManager.default.fileExists(atPath: directory + "/backup-0003.overlay"))
        let failure = try qmp.failure("block-export-add", ["type": "nbd", "id": "bad", "filename": .string("backup:\(directory)@7")])
        #expect(failure.desc.contains("no backup '7'"), "\(failure)")
    }

    @Test("bad inputs: a missing backing file, a damaged header, an unknown point refuse to start; a damaged table fails reads, never serves wrong data")
    func badInputs() throws {
        let scratch = try TestDirectory()
        let (directory, _) = try Self.makeChain(in: scratch, seed: 173)
        func serve(_ spec: String) throws -> ToolResult {
            try ControlPrograms.tidemark(["serve", "--unix", scratch.file("bad.sock"), "--export", "d=" + spec], timeout: 30)
        }
        let unknown = try serve("backup:\(directory)@nope")
        #expect(!unknown.succeeded && unknown.stderr.contains("no backup 'nope'"), "\(unknown)")

        // A damaged L2 table pointer in the newest file: the server starts, reads that
        // need it fail with EIO, and points below still serve.
        let damaged = scratch.file("damaged")
        try FileManager.default.copyItem(atPath: directory, toPath: damaged)
        let top = damaged + "/backup-0003.qcow2"
        let header = try ImageFile.read(top, offset: 0, count: 104)
        let l1Offset = header[40..<48].reduce(0) { $0 << 8 | Int($1) }
        let handle = try #require(FileHandle(forUpdatingAtPath: top))
        try handle.seek(toOffset: UInt64(l1Offset))
        handle.write(Data([0x80, 0, 0, 0x10, 0, 0, 0, 0]))  // L2 table at 64 TiB: outside the file
        try handle.close()
        let server = try TidemarkProcess(
            arguments: ["serve", "--unix", scratch.file("d.sock"), "--export", "top=backup:\(damaged)", "--export", "below=backup:\(damaged)@2"],
            directory: scratch)
        defer { _ = try? server.stop(signal: SIGKILL) }
        let copy = try ExternalTool.run("nbdcopy", [try server.unixURI(export: "top"), scratch.file("never.raw")])
        #expect(!copy.succeeded, "a damaged chain must not copy: \(copy)")
        try ExternalTool.check("nbdcopy", [try server.unixURI(export: "below"), scratch.file("below.raw")])
        #expect(try ImageFile.sha256(scratch.file("below.raw")) == ImageFile.sha256(scratch.file("expected-2.raw")))

        // A damaged header: no qcow2 magic.
        let magic = try #require(FileHandle(forUpdatingAtPath: top))
        magic.write(Data([0, 0, 0, 0]))
        try magic.close()
        let noMagic = try serve("backup:\(damaged)")
        #expect(!noMagic.succeeded && noMagic.stderr.contains("no qcow2 magic"), "\(noMagic)")

        // A missing backing file.
        try FileManager.default.removeItem(atPath: directory + "/backup-0001.qcow2")
        let missing = try serve("backup:\(directory)@2")
        #expect(!missing.succeeded && missing.stderr.contains("backup-0001.qcow2"), "\(missing)")
    }

    @Test("a machine running from a backup is backed up incrementally: bitmaps and checkpoints on a :rw chain export, full and incremental backups of it restore exactly")
    func backupOfTheOverlay() throws {
        let scratch = try TestDirectory()
        let (directory, _) = try Self.makeChain(in: scratch, seed: 174)
        let control = scratch.file("rw-qmp.sock")
        let server = try TidemarkProcess(
            arguments: ["serve", "--unix", scratch.file("rw.sock"), "--control", control, "--export", "vm=backup:\(directory)@2:rw"],
            directory: scratch)
        defer { _ = try? server.stop(signal: SIGKILL) }
        let qmp = try QMPTestClient(path: control)
        try qmp.run("block-dirty-bitmap-add", ["node": "vm", "name": "b0", "persistent": true])
        let uri = try server.unixURI(export: "vm")
        let second = scratch.file("second-chain")
        var generator = SeededGenerator(seed: 31)
        let writer = try server.connect(export: "vm")
        try BackupChecks.mutate(writer, size: UInt64(Self.size), operations: 20, generator: &generator)
        _ = try BackupChecks.backup(["full", uri, second])
        var expected = [scratch.file("second-0.raw")]
        try BackupChecks.snapshot(writer, to: expected[0])
        try BackupChecks.mutate(writer, size: UInt64(Self.size), operations: 20, generator: &generator)
        let created = try ControlPrograms.tidemark(["checkpoint", "create", "--control", control, "--bitmap", "b0", "--export", "vm"])
        try created.requireSuccess()
        let checkpoint = created.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        let summary = try BackupChecks.backup(["incremental", uri, second, "--bitmap", checkpoint])
        #expect((summary["bytesCopied"] as? Int ?? 0) < Self.size / 2, "an increment of the overlay copies only what changed: \(summary)")
        expected.append(scratch.file("second-1.raw"))
        try BackupChecks.snapshot(writer, to: expected[1])
        try writer.shutdown()
        try BackupChecks.checkChain(second, expected: expected, scratch: scratch)
        let refused = try qmp.failure("checkpoint-create", ["node": "vm", "bitmap": "b0", "name": "v1", "view": true])
        #expect(refused.desc.contains("backup chain"), "\(refused)")
    }
}
