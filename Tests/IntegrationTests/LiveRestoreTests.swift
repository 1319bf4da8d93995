import Foundation
import Dispatch
import NBDClient
import QMPWire
import Synchronization
import Testing
import TestSupport
import TidemarkBackup

#if canImport(Glibc)
import Glibc
#endif

/// `tidemark restore --live DIR[@POINT] TARGET`: the target served at once while a copier
/// fills it from the chain, with client writes, kill -9 and resume.
@Suite("Live restore: serve the target at once, copy behind, resume after kill -9")
struct LiveRestoreTests {
    static let size = ChainExportTests.size

    static func waitForLog(_ server: TidemarkProcess, containing text: String, timeout: TimeInterval = 60) throws {
        let deadline = Date().addingTimeInterval(timeout)
        while !server.serverLog.contains(text) {
            guard server.isRunning, Date() < deadline else {
                throw HarnessError("no '\(text)' in the server log:\n\(server.serverLog)")
            }
            usleep(20_000)
        }
    }

    /// While the copy runs: the export reads as the chain point (`model`) at once, then 20
    /// random writes of 512 B to 32 KiB go in, flushed, and read back; `model` takes them.
    static func writeDuringCopy(
        _ connection: NBDConnection, model: inout [UInt8], seed: UInt64, patternSeed: UInt8
    ) throws {
        #expect(try connection.size == UInt64(size))
        #expect(try connection.pread(count: size, offset: 0) == model, "served as the chain point before the copy is done")
        var generator = SeededGenerator(seed: seed)
        for round in 0..<20 {
            let length = Int.random(in: 1...64, using: &generator) * 512
            let offset = Int.random(in: 0..<(size - length) / 512, using: &generator) * 512
            let bytes = ImageFile.pattern(count: length, offset: offset, seed: patternSeed &+ UInt8(round))
            try connection.pwrite(bytes, offset: UInt64(offset))
            model.replaceSubrange(offset..<(offset + length), with: bytes)
        }
        try connection.flush()
        #expect(try connection.pread(count: size, offset: 0) == model)
    }

    /// A restarted restore reports what it found already copied, and it is not nothing.
    static func expectResumed(_ server: TidemarkProcess) throws {
        try waitForLog(server, containing: "already there")
        let line = try #require(server.serverLog.split(separator: "\n").first { $0.contains("already there") })
        #expect(!line.contains(" 0% already"), "the restart resumed from saved progress: \(line)")
    }

    @Test("reads are the chain point at once, writes stay, kill -9 mid-copy resumes from saved progress, the finished target is the point plus the writes")
    func liveRestoreWithKill() throws {
        let scratch = try TestDirectory()
        let (directory, expected) = try ChainExportTests.makeChain(in: scratch, seed: 180)
        let target = scratch.file("target.raw")
        var model = try ImageFile.read(expected[2])
        let first = try TidemarkProcess(
            arguments: ["restore", "--live", "\(directory)@2", target, "--unix", scratch.file("lr.sock"), "--rate", "1M"],
            directory: scratch)
        let connection = try first.connect(export: "disk")
        try Self.writeDuringCopy(connection, model: &model, seed: 5, patternSeed: 100)
        usleep(2_500_000)  // a few of 16 MiB at 1 MiB/s (at least 14 s in all), progress saved every second
        try first.stop(signal: SIGKILL)
        #expect(!first.serverLog.contains("complete"), "the copy was still running at the kill:\n\(first.serverLog)")

        // Another point into the same target is refused: never a mix of two points.
        let other = try ControlPrograms.tidemark(
            ["restore", "--live", "\(directory)@1", target, "--unix", scratch.file("other.sock")], timeout: 30)
        #expect(!other.succeeded && other.stderr.contains("made for"), "\(other)")

        let second = try TidemarkProcess(
            arguments: ["restore", "--live", "\(directory)@2", target, "--unix", scratch.file("lr2.sock")], directory: scratch)
        defer { _ = try? second.stop(signal: SIGKILL) }
        try Self.expectResumed(second)
        try Self.waitForLog(second, containing: "complete")
        let again = try second.connect(export: "disk")
        #expect(try again.pread(count: Self.size, offset: 0) == model, "the export after completion")
        try again.shutdown()
        #expect(Array(try ImageFile.read(target).prefix(Self.size)) == model, "the target file holds the point and the writes")
        // The backup was not touched.
        let verify = try ControlPrograms.tidemark(["verify", directory])
        #expect(verify.succeeded, "\(verify)")
    }

    @Test("a target smaller than the chain's disk and a damaged chain refuse to start")
    func refusals() throws {
        let scratch = try TestDirectory()
        let (directory, _) = try ChainExportTests.makeChain(in: scratch, seed: 181)
        let small = scratch.file("small.raw")
        try ImageFile.createSparse(small, size: Self.size / 2)
        let tooSmall = try ControlPrograms.tidemark(
            ["restore", "--live", directory, small, "--unix", scratch.file("a.sock")], timeout: 30)
        #expect(!tooSmall.succeeded && tooSmall.stderr.contains("too small"), "\(tooSmall)")
        // A block device too small: refused before anything is made in the state directory.
        let smallDevice = try BlockDeviceStoreTests.LoopDevice(backing: small)
        defer { smallDevice.detach() }
        let state = scratch.file("state")
        let tooSmallDevice = try ControlPrograms.tidemark(
            ["restore", "--live", directory, smallDevice.path, "--unix", scratch.file("d.sock"), "--state-dir", state], timeout: 30)
        #expect(
            !tooSmallDevice.succeeded && tooSmallDevice.stderr.contains("too small")
                && tooSmallDevice.stderr.contains("\(Self.size) bytes"),
            "\(tooSmallDevice)")
        #expect(!FileManager.default.fileExists(atPath: state), "nothing was created for a device that cannot hold the disk")
        try FileManager.default.removeItem(atPath: directory + "/backup-0000.qcow2")
        let missing = try ControlPrograms.tidemark(
            ["restore", "--live", directory, scratch.file("t.raw"), "--unix", scratch.file("b.sock")], timeout: 30)
        #expect(!missing.succeeded && missing.stderr.contains("backup-0000.qcow2"), "\(missing)")
        #expect(!FileManager.default.fileExists(atPath: scratch.file("t.raw")), "nothing was created for a chain that cannot be read")
    }

    @Test("into a larger block device: chain data at once, writes stay, progress in the state directory, kill -9 and resume after the loop file is attached again, the device ends as the point plus the writes; another disk at that path is refused")
    func blockDeviceTarget() throws {
        let scratch = try TestDirectory()
        let (directory, expected) = try ChainExportTests.makeChain(in: scratch, seed: 185)
        let backing = scratch.file("device.img")
        // Not zeroes: the copy must write the chain's holes and zero clusters as zeroes. One
        // MiB larger than the disk: the export is the disk's size, the rest is left alone.
        let extra = 1 << 20
        try ImageFile.createFilled(backing, size: Self.size + extra, seed: 0xEE)
        let tail = try ImageFile.read(backing, offset: Self.size, count: extra)
        var device = try BlockDeviceStoreTests.LoopDevice(backing: backing)
        defer { device.detach() }
        let state = scratch.file("state")
        var model = try ImageFile.read(expected[2])
        let first = try TidemarkProcess(
            arguments: ["restore", "--live", "\(directory)@2", device.path, "--unix", scratch.file("b1.sock"), "--rate", "1M",
                        "--state-dir", state],
            directory: scratch)
        defer { _ = try? first.stop(signal: SIGKILL) }
        let connection = try first.connect(export: "disk")
        try Self.writeDuringCopy(connection, model: &model, seed: 15, patternSeed: 120)
        // A second writer of the same device is refused while this one runs.
        let second = try ControlPrograms.tidemark(
            ["restore", "--live", "\(directory)@2", device.path, "--unix", scratch.file("b2.sock"), "--state-dir", state], timeout: 30)
        #expect(!second.succeeded && second.stderr.contains("held by a running server"), "\(second)")
        usleep(2_500_000)  // a few of 16 MiB at 1 MiB/s, progress saved every second
        try first.stop(signal: SIGKILL)
        #expect(!first.serverLog.contains("complete"), "the copy was still running at the kill:\n\(first.serverLog)")
        let maps = try FileManager.default.contentsOfDirectory(atPath: state + "/stores")
            .filter { FileManager.default.fileExists(atPath: state + "/stores/" + $0 + "/restore-map") }
        #expect(maps.count == 1, "the progress is in the device's store in the state directory: \(maps)")
        #expect(!FileManager.default.fileExists(atPath: device.path + ".restore-map"), "nothing is made under /dev")

        // The same loop file attached again (maybe at another /dev/loopN): the same disk,
        // its progress is found and the copy resumes.
        device.detach()
        device = try BlockDeviceStoreTests.LoopDevice(backing: backing)
        let resumed = try TidemarkProcess(
            arguments: ["restore", "--live", "\(directory)@2", device.path, "--unix", scratch.file("b3.sock"), "--state-dir", state],
            directory: scratch)
        defer { _ = try? resumed.stop(signal: SIGKILL) }
        try Self.expectResumed(resumed)
        try Self.waitForLog(resumed, containing: "complete")
        let again = try resumed.connect(export: "disk")
        #expect(try again.pread(count: Self.size, offset: 0) == model, "the export after completion")
        try again.shutdown()
        try resumed.stop()
        #expect(try ImageFile.read(device.path, offset: 0, count: Self.size) == model, "the device holds the point and the writes")
        #expect(try ImageFile.read(device.path, offset: Self.size, count: extra) == tail, "past the disk's end, untouched")
        // Served directly afterwards with the same state directory: the same store, no complaint.
        let plain = try TidemarkProcess(
            arguments: ["serve", device.path, "--read-only", "--unix", scratch.file("plain.sock"), "--state-dir", state],
            directory: scratch)
        let direct = try plain.connect(export: "disk")
        #expect(try direct.pread(count: Self.size, offset: 0) == model, "tidemark serve DEVICE after the restore")
        try direct.shutdown()
        try plain.stop()
        #expect(!plain.serverLog.contains("mismatch"), "\(plain.serverLog)")
        let verify = try ControlPrograms.tidemark(["verify", directory])
        #expect(verify.succeeded, "\(verify)")

        // Another disk attached at the same path is refused as `serve` refuses it (the
        // progress and bitmaps recorded there are the first disk's), and left unwritten.
        let otherBacking = scratch.file("other.img")
        try ImageFile.createFilled(otherBacking, size: Self.size, seed: 0x33)
        let path = device.path
        device.detach()
        device = try BlockDeviceStoreTests.LoopDevice(backing: otherBacking, at: path)
        let swapped = try ControlPrograms.tidemark(
            ["restore", "--live", "\(directory)@2", path, "--unix", scratch.file("b4.sock"), "--state-dir", state], timeout: 30)
        #expect(!swapped.succeeded && swapped.stderr.contains("identity mismatch"), "\(swapped)")
        #expect(
            try ImageFile.read(path, offset: 0, count: Self.size) == ImageFile.pattern(count: Self.size, offset: 0, seed: 0x33),
            "the other disk was not written")
    }

    @Test("a fio randwrite job with crc32c verify during the copy passes; at completion the target holds fio's blocks (fio verify_only on it served plainly) and the chain point elsewhere")
    func fioDuringCopy() throws {
        let scratch = try TestDirectory()
        let (directory, expected) = try ChainExportTests.makeChain(in: scratch, seed: 186)
        let target = scratch.file("target.raw")
        let half = Self.size / 2
        let job = [
            "--name=restore", "--rw=randwrite", "--bsrange=4k-64k", "--iodepth=8", "--size=\(half)", "--randseed=99",
            "--end_fsync=1",
        ]
        let server = try TidemarkProcess(
            arguments: ["restore", "--live", "\(directory)@3", target, "--unix", scratch.file("fio.sock"), "--rate", "1M"],
            directory: scratch)
        defer { _ = try? server.stop(signal: SIGKILL) }
        let written = try FioTests.fio(try server.unixURI(export: "disk"), in: scratch, job)
        #expect(FioTests.jobErrors(written) == [0])
        #expect(FioTests.ioBytes(written, "write") == half && FioTests.ioBytes(written, "read") == half, "written and verified")
        #expect(!server.serverLog.contains("complete"), "fio ran while the copy was running:\n\(server.serverLog)")
        try Self.waitForLog(server, containing: "complete")
        try server.stop()
        #expect(
            try ImageFile.read(target, offset: half, count: half) == ImageFile.read(expected[3], offset: half, count: half),
            "where fio did not write, the target is the chain point")
        let plain = try TidemarkProcess(
            arguments: ["serve", target, "--read-only", "--unix", scratch.file("plain.sock")], directory: scratch)
        defer { _ = try? plain.stop(signal: SIGKILL) }
        let verified = try FioTests.fio(try plain.unixURI(export: "disk"), in: scratch, job + ["--verify_only=1"])
        #expect(FioTests.jobErrors(verified) == [0], "the target holds every block fio wrote")
        #expect(FioTests.ioBytes(verified, "read") == half)
    }

    @Test("QMP: live-restore-start serves the target, query-live-restore reports progress, LIVE_RESTORE_COMPLETED ends it")
    func overQMP() throws {
        let scratch = try TestDirectory()
        let (directory, expected) = try ChainExportTests.makeChain(in: scratch, seed: 182)
        let fixture = try ControlFixture(empty: true)
        let qmp = try fixture.qmp()
        let target = scratch.file("qmp-target.raw")
        try qmp.run("live-restore-start", ["id": "r1", "source": .string("\(directory)@3"), "target": .string(target), "rate": 4_194_304])
        let progress = try qmp.run("query-live-restore")
        let entry = try #require(progress.arrayValue?.first)
        #expect(entry["id"] == "r1" && entry["total-bytes"] == .int(Int64(Self.size)), "\(progress)")
        #expect(entry["complete"] == .bool(false), "a 16 MiB copy at 4 MiB/s is not done at once: \(progress)")
        let copy = scratch.file("early.raw")
        try ExternalTool.check("nbdcopy", [try fixture.uri(export: "r1"), copy])
        #expect(try ImageFile.sha256(copy) == ImageFile.sha256(expected[3]), "served as the point while copying")
        let event = try qmp.waitForEvent("LIVE_RESTORE_COMPLETED", timeout: 60)
        #expect(event["data"]?["id"] == "r1" && event["data"]?["error"] == nil, "\(event)")
        let finished = try qmp.run("query-live-restore")
        #expect(finished.arrayValue?.first?["complete"] == .bool(true) && finished.arrayValue?.first?["done-bytes"] == .int(Int64(Self.size)), "\(finished)")
        #expect(Array(try ImageFile.read(target).prefix(Self.size)) == (try ImageFile.read(expected[3])))
        let failure = try qmp.failure("live-restore-start", ["id": "r2", "source": .string("\(directory)@9"), "target": .string(scratch.file("x.raw"))])
        #expect(failure.desc.contains("no backup '9'"), "\(failure)")
    }

    /// Four connections writing at once, each to its own 4 KiB stripes (so all four share
    /// every 64 KiB granule and race the copier for it); returns each writer's flushed writes.
    static func writeConcurrently(
        _ server: TidemarkProcess, round: Int, writesPerWriter: Int
    ) throws -> [[(offset: Int, bytes: [UInt8])]] {
        let stripes = size / 4096
        let results = Mutex<[Int: [(offset: Int, bytes: [UInt8])]]>([:])
        let failures = Mutex<[String]>([])
        DispatchQueue.concurrentPerform(iterations: 4) { writer in
            do {
                var generator = SeededGenerator(seed: UInt64(round * 10 + writer))
                let connection = try server.connect(export: "disk")
                var done: [(offset: Int, bytes: [UInt8])] = []
                for index in 0..<writesPerWriter {
                    let stripe = Int.random(in: 0..<(stripes / 4), using: &generator) * 4 + writer
                    let bytes = ImageFile.pattern(count: 4096, offset: stripe * 4096, seed: UInt8((round * 37 + writer * 7 + index) % 251))
                    try connection.pwrite(bytes, offset: UInt64(stripe * 4096))
                    done.append((stripe * 4096, bytes))
                }
                try connection.flush()
                try connection.shutdown()
                results.withLock { $0[writer] = done }
            } catch {
                failures.withLock { $0.append("writer \(writer): \(error)") }
            }
        }
        let failed = failures.withLock { $0 }
        guard failed.isEmpty else { throw HarnessError(failed.joined(separator: "; ")) }
        return results.withLock { all in (0..<4).map { all[$0] ?? [] } }
    }

    @Test("four concurrent writers while copying, kill -9 at random points in two cycles, then completion: the target is the point with every flushed write on top")
    func concurrentWritersAndKills() throws {
        let scratch = try TestDirectory()
        let (directory, expected) = try ChainExportTests.makeChain(in: scratch, seed: 183)
        let target = scratch.file("target.raw")
        var model = try ImageFile.read(expected[1])
        var generator = SeededGenerator(seed: 77)
        for cycle in 0..<3 {
            let last = cycle == 2
            let server = try TidemarkProcess(
                arguments: ["restore", "--live", "\(directory)@1", target, "--unix", scratch.file("c\(cycle).sock")]
                    + (last ? [] : ["--rate", "2M"]),
                directory: scratch)
            for writer in try Self.writeConcurrently(server, round: cycle, writesPerWriter: 60) {
                for write in writer { model.replaceSubrange(write.offset..<(write.offset + 4096), with: write.bytes) }
            }
            if last {
                try Self.waitForLog(server, containing: "complete")
                let reader = try server.connect(export: "disk")
                #expect(try reader.pread(count: Self.size, offset: 0) == model, "the export after completion")
                try reader.shutdown()
                try server.stop()
            } else {
                usleep(UInt32.random(in: 0...1_500_000, using: &generator))
                try server.stop(signal: SIGKILL)
                #expect(!server.serverLog.contains("complete"), "cycle \(cycle): killed mid-copy")
            }
        }
        #expect(Array(try ImageFile.read(target).prefix(Self.size)) == model, "the point with every flushed write on top")
    }

    @Test("a full disk stops the copy with a clear error while reads stay right; with space again, a restart completes the restore")
    func fullDisk() throws {
        let scratch = try TestDirectory()
        let (directory, expected) = try ChainExportTests.makeChain(in: scratch, seed: 184)
        let fs = try StoreFaultTests.LoopFileSystem(in: scratch)
        defer { fs.tearDown() }
        let target = fs.mountPoint + "/target.raw"
        let model = try ImageFile.read(expected[3])
        do {
            let server = try TidemarkProcess(
                arguments: ["restore", "--live", directory, target, "--unix", scratch.file("full.sock"), "--rate", "1M"],
                directory: scratch)
            defer { _ = try? server.stop(signal: SIGKILL) }
            try fs.fill()
            try Self.waitForLog(server, containing: "stopped")
            #expect(server.serverLog.contains("No space left on device"), "\(server.serverLog)")
            let reader = try server.connect(export: "disk")
            #expect(try reader.pread(count: Self.size, offset: 0) == model, "reads stay right after the copy stopped")
            try reader.shutdown()
        }
        try FileManager.default.removeItem(atPath: fs.filler)
        let again = try TidemarkProcess(
            arguments: ["restore", "--live", directory, target, "--unix", scratch.file("full2.sock")], directory: scratch)
        defer { _ = try? again.stop(signal: SIGKILL) }
        try Self.waitForLog(again, containing: "complete")
        try again.stop()
        #expect(Array(try ImageFile.read(target).prefix(Self.size)) == model)
    }
}
