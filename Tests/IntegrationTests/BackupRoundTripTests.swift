import Foundation
import NBDClient
import Testing
import TidemarkBackup
import TestSupport

/// Backup chains pulled from real servers and restored: Tidemark with checkpoints, and
/// qemu-nbd serving a qcow2 with a persistent bitmap rotated by qemu-img.
@Suite("Backup: round trips against Tidemark and qemu-nbd")
struct BackupRoundTripTests {
    static let mib = 1 << 20

    @Test(
        "Tidemark: full, then three rounds of writes/zeroes/trims, checkpoint, incremental, complete; every point restores exactly",
        arguments: ["64K", "4K"])
    func tidemarkChain(granularity: String) throws {
        let size = 24 * Self.mib
        let fixture = try ControlFixture(size: size, extraArguments: ["--bitmap", "b0:\(granularity)"])
        let scratch = try TestDirectory()
        let directory = scratch.file("chain")
        var generator = SeededGenerator(seed: granularity == "4K" ? 4 : 64)
        let uri = try fixture.uri()
        let writer = try fixture.connect()
        // Some data, some holes before the full backup.
        try BackupChecks.mutate(writer, size: UInt64(size), operations: 40, generator: &generator)
        var expected: [String] = []

        let full = try BackupChecks.backup(["full", uri, directory])
        #expect(full["kind"] as? String == "full" && full["index"] as? Int == 0)
        expected.append(scratch.file("expected-0.raw"))
        try BackupChecks.snapshot(writer, to: expected[0])

        for round in 1...3 {
            let log = try BackupChecks.mutate(writer, size: UInt64(size), operations: 30, generator: &generator)
            // Writers are stopped (this connection is idle) while the increment is pulled
            // from the live export; with views, the pull would read the view instead.
            let created = try ControlPrograms.tidemark(["checkpoint", "create", "--control", fixture.controlPath, "--bitmap", "b0"])
            try created.requireSuccess()
            let checkpoint = created.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            #expect(checkpoint == "c\(round)", "round \(round): default names count up")
            let summary = try BackupChecks.backup(["incremental", uri, directory, "--bitmap", checkpoint])
            #expect(summary["index"] as? Int == round, "round \(round): \(log)")
            #expect((summary["bytesCopied"] as? Int ?? 0) < size / 2, "an increment copies only what changed: \(summary)")
            expected.append(scratch.file("expected-\(round).raw"))
            try BackupChecks.snapshot(writer, to: expected[round])
            try ControlPrograms.tidemark(["checkpoint", "complete", "--control", fixture.controlPath, checkpoint]).requireSuccess()
        }
        try writer.shutdown()
        let manifest = try BackupManifest.load(path: directory + "/backup-0003.json")
        #expect(manifest.kind == .incremental && manifest.bitmap == "c3" && manifest.backingFile == "backup-0002.qcow2")
        #expect(manifest.extents.contains { $0.content == .data } && manifest.virtualSize == UInt64(size))
        try BackupChecks.checkChain(directory, expected: expected, scratch: scratch)
    }

    @Test("Tidemark: several connections with a small window give the same chain")
    func severalConnections() throws {
        let size = 16 * Self.mib
        let fixture = try ServerFixture(size: size, filled: true, extraArguments: ["--bitmap", "b0"])
        let scratch = try TestDirectory()
        let directory = scratch.file("chain")
        var options = BackupJob.Options(uri: fixture.uri, directory: directory, kind: .full)
        options.connections = 3
        options.window = 2
        options.requestSize = 256 << 10
        let result = try BackupJob(options: options).run()
        #expect(result.bytesCopied == UInt64(size))
        let writer = try fixture.connect()
        var generator = SeededGenerator(seed: 3)
        try BackupChecks.mutate(writer, size: UInt64(size), operations: 50, generator: &generator)
        var incremental = BackupJob.Options(uri: fixture.uri, directory: directory, kind: .incremental, bitmap: "b0")
        incremental.connections = 4
        _ = try BackupJob(options: incremental).run()
        try BackupChecks.snapshot(writer, to: scratch.file("expected-1.raw"))
        try writer.shutdown()
        let initial = try Self.copyOfInitial(size: size, in: scratch)
        try BackupChecks.checkChain(directory, expected: [initial, scratch.file("expected-1.raw")], scratch: scratch)
    }

    /// The filled fixture's initial content, recreated (the image itself has changed since).
    static func copyOfInitial(size: Int, in scratch: TestDirectory) throws -> String {
        let path = scratch.file("initial.raw")
        try ImageFile.createFilled(path, size: size)
        return path
    }

    @Test("qemu-nbd -B: full, writes through qemu-io, bitmap rotation with qemu-img bitmap, incrementals; restores match")
    func qemuNBDChain() throws {
        let scratch = try TestDirectory()
        let source = scratch.file("source.qcow2")
        let directory = scratch.file("chain")
        try ExternalTool.check("qemu-img", ["create", "-q", "-f", "qcow2", source, "32M"])
        try ExternalTool.check("qemu-io", ["-f", "qcow2", "-c", "write -P 0x11 0 3M", "-c", "write -P 0x22 10M 1M", source])
        try ExternalTool.check("qemu-img", ["bitmap", "--add", source, "b0"])
        var expected: [String] = []

        func serve(_ bitmap: String, _ body: (String) throws -> Void) throws {
            let server = try BitmapReferenceServer.qemuNBD(
                image: source, format: "qcow2", bitmap: bitmap, export: "disk", directory: scratch)
            defer { server.stop() }
            try body(server.uri(export: "disk"))
        }
        func snapshot(_ index: Int) throws {
            let path = scratch.file("expected-\(index).raw")
            try ExternalTool.check("qemu-img", ["convert", "-f", "qcow2", "-O", "raw", source, path])
            expected.append(path)
        }

        try serve("b0") { uri in _ = try BackupChecks.backup(["full", uri, directory]) }
        try snapshot(0)
        // Round 1: changes recorded in b0; afterwards rotate to b1.
        try ExternalTool.check("qemu-io", ["-f", "qcow2", "-c", "write -P 0x33 1M 64k", "-c", "write -P 0x44 20M 4k", source])
        try serve("b0") { uri in _ = try BackupChecks.backup(["incremental", uri, directory, "--bitmap", "b0"]) }
        try snapshot(1)
        try ExternalTool.check("qemu-img", ["bitmap", "--add", source, "b1"])
        try ExternalTool.check("qemu-img", ["bitmap", "--remove", source, "b0"])
        // Round 2: data, zeroes and a discard, recorded in b1; afterwards clear b1.
        try ExternalTool.check("qemu-io", [
            "-f", "qcow2", "-c", "write -P 0x55 2M 512k", "-c", "write -z 10M 1M", "-c", "discard 0 64k",
            "-c", "write -P 0x66 31M 1M", source,
        ])
        try serve("b1") { uri in
            let summary = try BackupChecks.backup(["incremental", uri, directory, "--bitmap", "b1"])
            #expect((summary["bytesZeroed"] as? Int ?? 0) >= 1 << 20, "the zeroed megabyte is recorded as zeroes: \(summary)")
        }
        try snapshot(2)
        try ExternalTool.check("qemu-img", ["bitmap", "--clear", source, "b1"])
        // Round 3: one small write.
        try ExternalTool.check("qemu-io", ["-f", "qcow2", "-c", "write -P 0x77 5M 4k", source])
        try serve("b1") { uri in
            let summary = try BackupChecks.backup(["incremental", uri, directory, "--bitmap", "b1"])
            #expect(summary["bytesCopied"] as? Int == 65536, "one cluster: \(summary)")
        }
        try snapshot(3)
        try BackupChecks.checkChain(directory, expected: expected, scratch: scratch)
    }
}
