import Foundation
import NBDClient
import Testing
import QMPWire

/// Faults of the bitmap store seen through the real server and real clients: a damaged
/// journal after SIGKILL, an image resized while stopped, a full disk. The promise in
/// each: the bitmap stays a superset of the true changes, or the export is not writable.
@Suite("Bitmap store faults", .serialized)
struct StoreFaultTests {
    static let size: UInt64 = 256 << 20
    static let context = BitmapMaps.context("b0")

    /// `tidemark serve IMAGE --name disk --unix SOCK --control CTL [--bitmap b0]` on fresh
    /// socket names (a restart must not reuse the dead server's).
    static func serve(_ image: String, in directory: TestDirectory, tag: String, bitmap: Bool = true) throws -> (TidemarkProcess, String) {
        let control = directory.file("qmp-\(tag).sock")
        let server = try TidemarkProcess(
            arguments: ["serve", image, "--name", "disk", "--unix", directory.file("nbd-\(tag).sock"), "--control", control]
                + (bitmap ? ["--bitmap", "b0"] : []),
            directory: directory)
        return (server, control)
    }

    static func qemuIO(_ uri: String, _ commands: [String]) throws -> ToolResult {
        try ExternalTool.run("qemu-io", ["-f", "raw"] + commands.flatMap { ["-c", $0] } + [uri], timeout: 120)
    }

    static func generation(_ control: String) throws -> Int64? {
        let client = try QMPTestClient(path: control)
        defer { client.close() }
        return try ControlFixture.bitmaps(client)["b0"]?["generation"]?.intValue
    }

    enum JournalFault: String, CaseIterable, CustomTestStringConvertible {
        case intact, deleted, garbled
        var testDescription: String { rawValue }
    }

    @Test("kill -9 after writes at 1M, 100M, 200M: a deleted or garbled journal recovers as all dirty, generation 1; an intact one as the written regions",
          arguments: JournalFault.allCases)
    func journalAfterKill(fault: JournalFault) throws {
        let directory = try TestDirectory()
        let image = directory.file("image.raw")
        try ImageFile.createSparse(image, size: Int(Self.size))
        let (server, _) = try Self.serve(image, in: directory, tag: "1")
        let written = try Self.qemuIO(
            try server.unixURI(export: "disk"), ["write -P 0x11 1M 4k", "write -P 0x22 100M 4k", "write -P 0x33 200M 4k"])
        #expect(written.succeeded, "\(written)")
        _ = try server.stop(signal: SIGKILL, timeout: 10)

        let store = BitmapStoreFiles.directory(image: image)
        let state = try BitmapStoreFiles.state(image: image)
        #expect(state["cleanShutdown"] as? Bool == false)
        let epoch = try #require(state["epoch"] as? Int)
        let journal = store + "/journal-\(epoch).log"
        #expect(FileManager.default.fileExists(atPath: journal))
        switch fault {
        case .intact: break
        case .deleted: try FileManager.default.removeItem(atPath: journal)
        case .garbled: try Data(repeating: 0xA5, count: 4096).write(to: URL(fileURLWithPath: journal))
        }

        let (restarted, control) = try Self.serve(image, in: directory, tag: "2")
        defer { _ = try? restarted.stop() }
        let map = try BitmapMaps.nbdinfoMap(uri: try restarted.unixURI(export: "disk"), context: Self.context).extents
        let dirty = BitmapMaps.dirtyRuns(map)
        #expect(try Self.generation(control) == 1, "the unclean stop bumps the generation once")
        switch fault {
        case .intact:
            // qemu-io's writes are in the saved bits or the journal; regions 0, 1 and 3.
            for offset: UInt64 in [1 << 20, 100 << 20, 200 << 20] {
                #expect(BitmapMaps.isDirty(map, offset: offset, length: 4096), "\(offset) in \(dirty)")
            }
            #expect(!BitmapMaps.isDirty(map, offset: 150 << 20, length: 4096), "region 2 was never written: \(dirty)")
        case .deleted, .garbled:
            #expect(dirty == [BitmapExtent(0, Self.size, 1)], "entirely dirty: \(dirty)")
            #expect(restarted.serverLog.contains("journal-\(epoch).log"), "the error names the journal:\n\(restarted.serverLog)")
        }
    }

    @Test("an image resized while no server ran: b0 comes back entirely dirty at the new size, generation 1")
    func resizedWhileStopped() throws {
        let directory = try TestDirectory()
        let image = directory.file("image.raw")
        try ImageFile.createSparse(image, size: Int(Self.size))
        let (server, _) = try Self.serve(image, in: directory, tag: "1")
        #expect(try Self.qemuIO(try server.unixURI(export: "disk"), ["write -P 0x11 1M 4k"]).succeeded)
        _ = try server.stop()
        let grown = Self.size + (64 << 20)
        #expect(truncate(image, off_t(grown)) == 0)

        let (restarted, control) = try Self.serve(image, in: directory, tag: "2")
        defer { _ = try? restarted.stop() }
        let connection = try restarted.connect(export: "disk")
        #expect(try !connection.isReadOnly, "a resized image is still writable: its bitmap records")
        try connection.shutdown()
        let map = try BitmapMaps.nbdinfoMap(uri: try restarted.unixURI(export: "disk"), context: Self.context).extents
        #expect(BitmapMaps.dirtyRuns(map) == [BitmapExtent(0, grown, 1)])
        #expect(try Self.generation(control) == 1)
        #expect(restarted.serverLog.contains("state.json"), "\(restarted.serverLog)")
    }

    // MARK: - Full disk

    /// A 64 MiB ext4 file system on a loop device, mounted for one test; unmounted and
    /// detached on release, whatever happened.
    final class LoopFileSystem {
        let mountPoint: String
        private var device: String?
        private var mounted = false

        init(in directory: TestDirectory) throws {
            let backing = directory.file("fs.img")
            mountPoint = directory.file("mnt")
            try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: false)
            try ExternalTool.check("truncate", ["-s", "64M", backing])
            // -m 0: no blocks reserved for root, so "full" means full for this root test.
            try ExternalTool.check("mkfs.ext4", ["-q", "-m", "0", backing])
            let attached = try ExternalTool.check("losetup", ["--find", "--show", backing])
            device = attached.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            try ExternalTool.check("mount", [device ?? "", mountPoint])
            mounted = true
        }

        deinit { tearDown() }

        /// Unmounts and detaches; called by a `defer` placed before the server's, so it
        /// runs after the server stopped (ARC may release this object earlier than scope end).
        func tearDown() {
            if mounted, (try? ExternalTool.run("umount", [mountPoint]))?.succeeded == true { mounted = false }
            if !mounted, let device {
                _ = try? ExternalTool.run("losetup", ["-d", device])
                self.device = nil
            }
        }

        var filler: String { mountPoint + "/filler" }

        /// Fills the file system to the last block.
        func fill() throws {
            FileManager.default.createFile(atPath: filler, contents: nil)
            let handle = try #require(FileHandle(forWritingAtPath: filler))
            defer { try? handle.close() }
            for size in [1 << 20, 4096] {
                let chunk = Data(repeating: 0x55, count: size)
                while (try? handle.write(contentsOf: chunk)) != nil {}
            }
            try? handle.synchronize()
        }

        func free() throws {
            try FileManager.default.removeItem(atPath: filler)
            sync()
        }
    }

    @Test("full disk: new writes fail with ENOSPC, overwrites, trims and FLUSH work, management ops fail and change nothing; freed, saves resume without stray journals")
    func fullDisk() throws {
        let directory = try TestDirectory()
        let fs = try LoopFileSystem(in: directory)
        defer { fs.tearDown() }
        let image = fs.mountPoint + "/image.raw"
        try ImageFile.createSparse(image, size: Int(Self.size))
        let (server, control) = try Self.serve(image, in: directory, tag: "1")
        defer { _ = try? server.stop() }
        let uri = try server.unixURI(export: "disk")
        #expect(try Self.qemuIO(uri, ["write -P 0x11 0 1M"]).succeeded)
        let client = try QMPTestClient(path: control)
        defer { client.close() }
        try client.run("checkpoint-create", ["node": "disk", "bitmap": "b0", "name": "c1"])
        let store = BitmapStoreFiles.directory(image: image)
        let stateBefore = try Data(contentsOf: URL(fileURLWithPath: store + "/state.json"))

        try fs.fill()
        // qemu-io: a write into unallocated space reports ENOSPC.
        let refused = try Self.qemuIO(uri, ["write -P 0x22 100M 1M"])
        #expect((refused.stdout + refused.stderr).contains("No space left on device"), "\(refused)")
        // libnbd: the same with its errno; overwrites, trims and FLUSH work.
        let connection = try server.connect(export: "disk")
        do {
            try connection.pwrite(ImageFile.constant(0x33, count: 1 << 20), offset: 150 << 20)
            Issue.record("a write into unallocated space on a full disk succeeded")
        } catch {
            #expect(error.errno == ENOSPC, "\(error)")
        }
        try connection.pwrite(ImageFile.constant(0x44, count: 65536), offset: 0)
        try connection.flush()
        // (Before the trim, which frees blocks.) Management operations whose save fails report it and change nothing.
        let completeError = try client.failure("checkpoint-complete", ["node": "disk", "name": "c1"])
        #expect(completeError.desc.contains("space"), "\(completeError)")
        #expect(try client.run("query-checkpoints").arrayValue?.count == 1, "c1 is still pending")
        _ = try client.failure("block-dirty-bitmap-add", ["node": "disk", "name": "b9", "persistent": true])
        #expect(try ControlFixture.bitmaps(client)["b9"] == nil)
        #expect(try Data(contentsOf: URL(fileURLWithPath: store + "/state.json")) == stateBefore)
        let stray = try FileManager.default.contentsOfDirectory(atPath: store).filter { $0.hasSuffix(".tmp") }
        #expect(stray.isEmpty, "\(stray)")

        try connection.trim(count: 65536, offset: 65536)
        try connection.flush()
        try connection.pwrite(ImageFile.constant(0x55, count: 4096), offset: 4096)
        try connection.flush()
        try fs.free()
        try client.run("checkpoint-complete", ["node": "disk", "name": "c1"])
        #expect(try client.run("query-checkpoints").arrayValue?.isEmpty == true)
        try connection.flush()
        let map = try BitmapMaps.nbdinfoMap(uri: uri, context: Self.context).extents
        #expect(BitmapMaps.isDirty(map, offset: 0, length: 8192), "overwrite and trim on the full disk are recorded")
        #expect(BitmapMaps.isDirty(map, offset: 150 << 20, length: 4096), "the refused write is over-reported, safely")
        try connection.shutdown()
        let files = try FileManager.default.contentsOfDirectory(atPath: store)
        #expect(files.filter { $0.hasPrefix("journal-") }.count == 1, "\(files)")
        #expect(files.filter { $0.hasSuffix(".tmp") }.isEmpty, "\(files)")
    }

    @Test("a start on a full disk where the store cannot be created: the export is served read-only, with an error")
    func fullDiskAtStart() throws {
        let directory = try TestDirectory()
        let fs = try LoopFileSystem(in: directory)
        defer { fs.tearDown() }
        let image = fs.mountPoint + "/image.raw"
        try ImageFile.createSparse(image, size: Int(Self.size))
        try fs.fill()
        let (server, _) = try Self.serve(image, in: directory, tag: "1")
        defer { _ = try? server.stop() }
        let connection = try server.connect(export: "disk")
        #expect(try connection.isReadOnly, "writes nobody records must not be accepted")
        #expect(throws: NBDClientError.self) { try connection.pwrite([1, 2, 3, 4], offset: 0) }
        #expect(try connection.pread(count: 4096, offset: 0) == [UInt8](repeating: 0, count: 4096))
        try connection.shutdown()
        #expect(server.serverLog.contains("read-only"), "\(server.serverLog)")
        #expect(server.serverLog.contains(image + ".tidemark"), "\(server.serverLog)")
    }
}
