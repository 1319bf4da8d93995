import Foundation
import NBDClient
import Testing
import QMPWire

#if canImport(Glibc)
import Glibc
#endif

/// Block devices keep their bitmaps in a state directory, keyed by the disk's identity:
/// never under /dev (devtmpfs is memory), found again when the disk moves to another path,
/// and refused when another disk appears at a known path. On real loop devices, made and
/// removed by each test (root; `losetup` must exist: a missing tool fails the test).
@Suite("Block device stores in a state directory", .serialized)
struct BlockDeviceStoreTests {
    static let size: UInt64 = 256 << 20
    static let granule: UInt64 = 64 << 10
    static let context = BitmapMaps.context("b0")

    /// A loop device attached by a test. `detach()` is idempotent; tests call it in a
    /// `defer`, and `deinit` calls it too.
    final class LoopDevice {
        let path: String
        private var attached = true

        /// `losetup --find --show BACKING`.
        init(backing: String) throws {
            let result = try ExternalTool.check("losetup", ["--find", "--show", backing])
            path = result.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            guard path.hasPrefix("/dev/loop") else { throw HarnessError("losetup printed '\(result.stdout)'") }
        }

        /// `losetup DEVICE BACKING`: attaches at a given device (that must be free).
        init(backing: String, at device: String) throws {
            try ExternalTool.check("losetup", [device, backing])
            path = device
        }

        func detach() {
            guard attached else { return }
            if (try? ExternalTool.run("losetup", ["-d", path]))?.succeeded == true { attached = false }
        }

        deinit { detach() }
    }

    /// A test's folder: its backing files, the state directory and sockets.
    struct Setup {
        let directory: TestDirectory
        let stateDirectory: String

        init() throws {
            directory = try TestDirectory()
            stateDirectory = directory.file("state")
        }

        /// A sparse backing file of `size` bytes.
        func backing(_ name: String, size: UInt64 = BlockDeviceStoreTests.size) throws -> String {
            let path = directory.file(name)
            try ExternalTool.check("truncate", ["-s", String(size), path])
            return path
        }

        /// `tidemark serve DEVICE --bitmap b0 --state-dir STATE` on a socket of its own.
        func serve(_ device: String, socket: String, extra: [String] = []) throws -> TidemarkProcess {
            try TidemarkProcess(
                arguments: ["serve", device, "--unix", directory.file(socket), "--bitmap", "b0", "--state-dir", stateDirectory]
                    + extra,
                directory: directory)
        }

        /// The stores in the state directory.
        func stores() throws -> [String] {
            try FileManager.default.contentsOfDirectory(atPath: stateDirectory + "/stores").sorted()
        }

        /// `identity.json` of the only store, parsed.
        func identity(ofStore name: String) throws -> [String: Any] {
            let path = stateDirectory + "/stores/" + name + "/identity.json"
            guard let data = FileManager.default.contents(atPath: path),
                let object = try JSONSerialization.jsonObject(with: data) as? [String: Any]
            else { throw HarnessError("cannot read \(path)") }
            return object
        }
    }

    /// Writes `length` bytes at each offset through libnbd, then closes the connection.
    static func write(_ server: TidemarkProcess, at offsets: [UInt64], length: Int = 65536, flush: Bool = true) throws {
        let connection = try server.connect()
        for offset in offsets {
            try connection.pwrite([UInt8](repeating: 0xA5, count: length), offset: offset)
        }
        if flush { try connection.flush() }
        try connection.shutdown()
    }

    /// `nbdinfo --map=qemu:dirty-bitmap:b0` on the server's first listener.
    static func map(_ server: TidemarkProcess) throws -> [BitmapExtent] {
        try BitmapMaps.nbdinfoMap(uri: server.uri, context: context).extents
    }

    /// Nothing Tidemark could have made is under /dev: no `DEVICE.tidemark` and no
    /// `*.tidemark` entry at all.
    static func expectNothingUnderDev(_ device: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
        #expect(!FileManager.default.fileExists(atPath: device + ".tidemark"), sourceLocation: sourceLocation)
        let entries = try FileManager.default.contentsOfDirectory(atPath: "/dev")
        #expect(entries.filter { $0.hasSuffix(".tidemark") } == [], sourceLocation: sourceLocation)
    }

    @Test("bitmaps on a loop device survive a clean restart and a kill -9 (journal replay); the store is in the state dir, nothing under /dev")
    func survivesRestartAndKill() throws {
        let setup = try Setup()
        let loop = try LoopDevice(backing: try setup.backing("disk.img"))
        defer { loop.detach() }

        let first = try setup.serve(loop.path, socket: "a.sock")
        try Self.write(first, at: [1 << 20])
        #expect(try first.stop() == .success)
        try Self.expectNothingUnderDev(loop.path)
        let stores = try setup.stores()
        try #require(stores.count == 1, "\(stores)")
        let identity = try setup.identity(ofStore: stores[0])
        let recorded = try #require(identity["identity"] as? String)
        #expect(recorded.hasPrefix("loop:" + setup.directory.file("disk.img") + ","), "\(identity)")
        #expect(identity["path"] as? String == loop.path)
        #expect(identity["sizeAtCreation"] as? Int == Int(Self.size))
        var mode = stat()
        #expect(stat(setup.stateDirectory, &mode) == 0 && mode.st_mode & 0o777 == 0o700, "the state directory is 0700")

        // Clean restart: the write is still dirty, nothing else.
        let second = try setup.serve(loop.path, socket: "b.sock")
        #expect(try Self.map(second) == BitmapMaps.bitmapMap(dirty: [(1 << 20, Self.granule)], size: Self.size))
        // Unflushed write into the second 64 MiB region, then SIGKILL.
        try Self.write(second, at: [100 << 20], flush: false)
        _ = try second.stop(signal: SIGKILL)

        let third = try setup.serve(loop.path, socket: "c.sock")
        defer { _ = try? third.stop() }
        let recovered = try Self.map(third)
        #expect(BitmapMaps.isDirty(recovered, offset: 1 << 20, length: Self.granule), "\(recovered)")
        #expect(BitmapMaps.isDirty(recovered, offset: 64 << 20, length: 64 << 20), "journal region replayed: \(recovered)")
        #expect(!BitmapMaps.isDirty(recovered, offset: 128 << 20, length: Self.granule), "\(recovered)")
        #expect(third.serverLog.contains("recovered after an unclean stop"), "\(third.serverLog)")
        try Self.expectNothingUnderDev(loop.path)
        #expect(try setup.stores() == stores, "the same store every time")
    }

    @Test("another disk attached at the same loop device is refused with an identity mismatch; removing the path record accepts it with its own store")
    func otherDiskAtSamePathRefused() throws {
        let setup = try Setup()
        let original = try setup.backing("original.img")
        let other = try setup.backing("other.img")
        let loop = try LoopDevice(backing: original)
        defer { loop.detach() }
        let first = try setup.serve(loop.path, socket: "a.sock")
        try Self.write(first, at: [1 << 20])
        #expect(try first.stop() == .success)
        let storesBefore = try setup.stores()
        loop.detach()

        let swapped = try LoopDevice(backing: other, at: loop.path)
        defer { swapped.detach() }
        let arguments = ["serve", loop.path, "--unix", setup.directory.file("b.sock"), "--bitmap", "b0",
            "--state-dir", setup.stateDirectory]
        let refused = try ControlPrograms.tidemark(arguments, timeout: 30)
        #expect(!refused.succeeded, "\(refused)")
        #expect(refused.stderr.contains("identity mismatch"), "\(refused)")
        #expect(refused.stderr.contains("original.img") && refused.stderr.contains("other.img"), "\(refused)")
        let storesAfter = try setup.stores()
        #expect(storesAfter == storesBefore, "no store made for the other disk")

        // Read-only and offline: refused too.
        let readOnly = try ControlPrograms.tidemark(arguments + ["--read-only"], timeout: 30)
        #expect(!readOnly.succeeded && readOnly.stderr.contains("identity mismatch"), "\(readOnly)")
        let offline = try ControlPrograms.tidemark(["bitmap", "list", loop.path, "--state-dir", setup.stateDirectory])
        #expect(!offline.succeeded && offline.stderr.contains("identity mismatch"), "\(offline)")

        // The message names the record to remove; then the new disk gets a store of its own.
        let records = try FileManager.default.contentsOfDirectory(atPath: setup.stateDirectory + "/paths")
        try #require(records.count == 1, "\(records)")
        let record = setup.stateDirectory + "/paths/" + records[0]
        #expect(refused.stderr.contains(record), "\(refused)")
        try FileManager.default.removeItem(atPath: record)
        let accepted = try setup.serve(loop.path, socket: "c.sock")
        defer { _ = try? accepted.stop() }
        #expect(try Self.map(accepted) == BitmapMaps.bitmapMap(dirty: [], size: Self.size))
        #expect(try setup.stores().count == 2)
        try Self.expectNothingUnderDev(loop.path)
    }

    @Test("the same backing file attached at another loop device finds its store: identity follows the disk")
    func sameDiskAtAnotherPath() throws {
        let setup = try Setup()
        let backing = try setup.backing("disk.img")
        let first = try LoopDevice(backing: backing)
        defer { first.detach() }
        let server = try setup.serve(first.path, socket: "a.sock")
        try Self.write(server, at: [3 << 20])
        #expect(try server.stop() == .success)

        // Attached a second time while the first is still attached, so it gets another number.
        let second = try LoopDevice(backing: backing)
        defer { second.detach() }
        #expect(second.path != first.path)
        first.detach()
        let moved = try setup.serve(second.path, socket: "b.sock")
        defer { _ = try? moved.stop() }
        #expect(try Self.map(moved) == BitmapMaps.bitmapMap(dirty: [(3 << 20, Self.granule)], size: Self.size))
        #expect(try setup.stores().count == 1)
        try Self.expectNothingUnderDev(first.path)
        try Self.expectNothingUnderDev(second.path)
    }

    @Test("a loop device resized while stopped is reported in the log and its bitmap is entirely dirty")
    func resizedDevice() throws {
        let setup = try Setup()
        let backing = try setup.backing("disk.img")
        let loop = try LoopDevice(backing: backing)
        defer { loop.detach() }
        let server = try setup.serve(loop.path, socket: "a.sock")
        try Self.write(server, at: [1 << 20])
        #expect(try server.stop() == .success)

        let larger = Self.size * 2
        try ExternalTool.check("truncate", ["-s", String(larger), backing])
        try ExternalTool.check("losetup", ["-c", loop.path])
        let resized = try setup.serve(loop.path, socket: "b.sock")
        defer { _ = try? resized.stop() }
        #expect(resized.serverLog.contains("describes an image of \(Self.size) bytes but the image has \(larger)"), "\(resized.serverLog)")
        #expect(try Self.map(resized) == BitmapMaps.bitmapMap(dirty: [(0, larger)], size: larger))
        #expect(try setup.stores().count == 1, "a resize keeps the disk's store")
    }

    @Test("offline tidemark bitmap list/dump DEVICE --state-dir and block-export-add over the control socket find the server's store")
    func offlineAndControlFindTheStore() throws {
        let setup = try Setup()
        let loop = try LoopDevice(backing: try setup.backing("disk.img"))
        defer { loop.detach() }
        let server = try setup.serve(loop.path, socket: "a.sock", extra: ["--bitmap", "b1:1M"])
        try Self.write(server, at: [5 << 20])
        #expect(try server.stop() == .success)

        let list = try ControlPrograms.tidemark(["bitmap", "list", loop.path, "--state-dir", setup.stateDirectory])
        #expect(list.succeeded, "\(list)")
        let lines = list.stdout.split(separator: "\n").map(String.init)
        #expect(lines.count == 2, "\(list)")
        #expect(lines.contains { $0.hasPrefix("b0\t") && $0.contains("count=65536") }, "\(list)")
        #expect(lines.contains { $0.hasPrefix("b1\t") && $0.contains("granularity=1048576") && $0.contains("count=1048576") }, "\(list)")
        let dump = try ControlPrograms.tidemark(["bitmap", "dump", loop.path, "b0", "--state-dir", setup.stateDirectory])
        #expect(dump.succeeded && dump.stdout.contains("\(5 << 20)\t65536\t1\tdirty"), "\(dump)")
        try Self.expectNothingUnderDev(loop.path)

        // A server started empty, with the same --state-dir, adds the device over QMP.
        let control = setup.directory.file("qmp.sock")
        let empty = try TidemarkProcess(
            arguments: ["serve", "--empty", "--unix", setup.directory.file("b.sock"), "--control", control,
                "--state-dir", setup.stateDirectory],
            directory: setup.directory)
        defer { _ = try? empty.stop() }
        let client = try QMPTestClient(path: control)
        defer { client.close() }
        try client.run("block-export-add", ["id": "dev", "filename": .string(loop.path), "writable": true])
        let bitmaps = try ControlFixture.bitmaps(client, node: "dev")
        #expect(bitmaps["b0"]?["count"] == .int(65536), "\(bitmaps)")
        #expect(bitmaps["b1"]?["count"] == .int(1 << 20), "\(bitmaps)")
        #expect(try setup.stores().count == 1)
        try Self.expectNothingUnderDev(loop.path)
    }

    @Test("with --state-dir a regular file's store goes there (none beside the image) and is found again, offline too")
    func regularFileInStateDirectory() throws {
        let setup = try Setup()
        let image = try setup.backing("file.img", size: 64 << 20)
        let server = try setup.serve(image, socket: "a.sock")
        try Self.write(server, at: [2 << 20])
        #expect(try server.stop() == .success)
        #expect(!FileManager.default.fileExists(atPath: image + ".tidemark"), "no sidecar beside the image")
        let stores = try setup.stores()
        try #require(stores.count == 1, "\(stores)")
        #expect(stores[0].hasPrefix("file_"), "\(stores)")

        let again = try setup.serve(image, socket: "b.sock")
        #expect(try Self.map(again) == BitmapMaps.bitmapMap(dirty: [(2 << 20, Self.granule)], size: 64 << 20))
        #expect(try again.stop() == .success)
        let list = try ControlPrograms.tidemark(["bitmap", "list", image, "--state-dir", setup.stateDirectory])
        #expect(list.succeeded && list.stdout.contains("b0\t") && list.stdout.contains("count=65536"), "\(list)")
        #expect(!FileManager.default.fileExists(atPath: image + ".tidemark"))
    }

    @Test("--help documents --state-dir and its default; --state-dir with --control is refused")
    func helpAndOptions() throws {
        let serve = try ControlPrograms.tidemark(["serve", "--help"])
        #expect(serve.succeeded && serve.stdout.contains("--state-dir") && serve.stdout.contains("/var/lib/tidemark"), "\(serve)")
        let bitmap = try ControlPrograms.tidemark(["bitmap", "list", "--help"])
        #expect(bitmap.succeeded && bitmap.stdout.contains("--state-dir"), "\(bitmap)")
        let both = try ControlPrograms.tidemark(["bitmap", "list", "--control", "/nonexistent.sock", "--state-dir", "/tmp"])
        #expect(!both.succeeded && both.stderr.contains("--state-dir is for offline use"), "\(both)")
    }

    @Test("without --state-dir a block device's store goes to /var/lib/tidemark (0700), never under /dev; the test removes what it made there")
    func defaultStateDirectory() throws {
        let setup = try Setup()
        let backing = try setup.backing("default.img")
        let loop = try LoopDevice(backing: backing)
        defer { loop.detach() }
        let base = "/var/lib/tidemark"
        let existed = FileManager.default.fileExists(atPath: base)
        var store: String?
        defer {
            // Only what this test made: its store, the record pointing at it, the folder if new.
            if let store {
                try? FileManager.default.removeItem(atPath: store)
                let name = URL(fileURLWithPath: store).lastPathComponent
                for record in (try? FileManager.default.contentsOfDirectory(atPath: base + "/paths")) ?? [] {
                    let link = base + "/paths/" + record
                    if (try? FileManager.default.destinationOfSymbolicLink(atPath: link))?.hasSuffix("/" + name) == true {
                        try? FileManager.default.removeItem(atPath: link)
                    }
                }
            }
            if !existed { try? FileManager.default.removeItem(atPath: base) }
        }
        let server = try TidemarkProcess(
            arguments: ["serve", loop.path, "--unix", setup.directory.file("a.sock"), "--bitmap", "b0"],
            directory: setup.directory)
        try Self.write(server, at: [1 << 20])
        #expect(try server.stop() == .success)
        try Self.expectNothingUnderDev(loop.path)

        let prefix = "bitmaps of '\(loop.path)' are in '"
        let log = server.serverLog
        let start = try #require(log.range(of: prefix), "\(log)")
        let path = String(log[start.upperBound...].prefix { $0 != "'" })
        store = path
        #expect(path.hasPrefix(base + "/stores/loop_"), "\(path)")
        let identity = try String(contentsOfFile: path + "/identity.json", encoding: .utf8)
        #expect(identity.contains("default.img"), "\(identity)")
        if !existed {
            let attributes = try FileManager.default.attributesOfItem(atPath: base)
            #expect((attributes[.posixPermissions] as? Int) == 0o700)
        }
        let list = try ControlPrograms.tidemark(["bitmap", "list", loop.path])
        #expect(list.succeeded && list.stdout.contains("count=65536"), "offline finds the default store too: \(list)")
    }
}
