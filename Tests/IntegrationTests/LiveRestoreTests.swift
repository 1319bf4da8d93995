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
        #expect(try connection.size == UInt64(Self.size))
        #expect(try connection.pread(count: Self.size, offset: 0) == model, "served as the chain point before the copy is done")
        var generator = SeededGenerator(seed: 5)
        for round in 0..<20 {
            let length = Int.random(in: 1...64, using: &generator) * 512
            let offset = Int.random(in: 0..<(Self.size - length) / 512, using: &generator) * 512
            let bytes = ImageFile.pattern(count: length, offset: offset, seed: UInt8(100 + round))
            try connection.pwrite(bytes, offset: UInt64(offset))
            model.replaceSubrange(offset..<(offset + length), with: bytes)
        }
        try connection.flush()
        #expect(try connection.pread(count: Self.size, offset: 0) == model)
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
        let resumed = try #require(second.serverLog.split(separator: "\n").first { $0.contains("already there") })
        #expect(!resumed.contains(" 0% already"), "the restart resumed from saved progress: \(resumed)")
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
        try FileManager.default.removeItem(atPath: directory + "/backup-0000.qcow2")
        let missing = try ControlPrograms.tidemark(
            ["restore", "--live", directory, scratch.file("t.raw"), "--unix", scratch.file("b.sock")], timeout: 30)
        #expect(!missing.succeeded && missing.stderr.contains("backup-0000.qcow2"), "\(missing)")
        #expect(!FileManager.default.fileExists(atPath: scratch.file("t.raw")), "nothing was created for a chain that cannot be read")
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
