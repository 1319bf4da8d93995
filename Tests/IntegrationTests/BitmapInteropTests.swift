import Foundation
import NBDClient
import Testing

/// `qemu:dirty-bitmap:NAME` through the real clients (libnbd, nbdinfo, qemu-img, qemu-io),
/// compared with what QEMU's own servers report for the same writes.
@Suite("Bitmap interop", .serialized)
struct BitmapInteropTests {
    static let kib = BitmapMaps.kib
    static let mib = BitmapMaps.mib
    static let size: UInt64 = 16 << 20
    static let b0 = BitmapMaps.context("b0")
    static let fine = BitmapMaps.context("fine")

    /// Dirty runs the pattern of `applyPattern` leaves in `b0` (64 KiB) and `fine` (4 KiB).
    static let b0Dirty: [(UInt64, UInt64)] = [
        (1 * mib, 128 * kib), (2 * mib, 64 * kib), (3 * mib, 128 * kib), (8 * mib, 64 * kib),
        (12 * mib, 128 * kib), (size - 64 * kib, 64 * kib),
    ]
    static let fineDirty: [(UInt64, UInt64)] = [
        (1 * mib, 68 * kib), (2 * mib + 4 * kib, 8 * kib), (3 * mib + 60 * kib, 8 * kib), (8 * mib, 4 * kib),
        (12 * mib, 128 * kib), (size - 4 * kib, 4 * kib),
    ]

    /// Writes, zeroes and trims, aligned and not, at granule edges and at the end.
    static func applyPattern(_ connection: NBDConnection) throws {
        try connection.pwrite(ImageFile.constant(0xA1, count: 65536), offset: 1 * mib)
        try connection.pwrite(ImageFile.constant(0xA2, count: 4096), offset: 1 * mib + 64 * kib)  // joins the run above
        try connection.pwrite(ImageFile.constant(0xA3, count: 1024), offset: 2 * mib + 7680)  // across a 4 KiB edge
        try connection.pwrite(ImageFile.constant(0xA4, count: 1024), offset: 3 * mib + 64 * kib - 512)  // across a 64 KiB edge
        try connection.zero(count: 4096, offset: 8 * mib)
        try connection.trim(count: 128 * kib, offset: 12 * mib)
        try connection.pwrite(ImageFile.constant(0xA5, count: 512), offset: size - 512)  // the last sector
    }

    /// A sparse 16 MiB image served with `--bitmap b0 --bitmap fine:4096`, the pattern applied.
    static func patternedServer() throws -> ServerFixture {
        let fixture = try ServerFixture(size: Int(size), extraArguments: ["--bitmap", "b0", "--bitmap", "fine:4096"])
        let connection = try fixture.connect()
        try applyPattern(connection)
        try connection.shutdown()
        return fixture
    }

    static func contextsConnection(_ fixture: ServerFixture) throws -> NBDConnection {
        try fixture.connect { $0.metaContexts = [NBDAllocationFlags.contextName, b0, fine] }
    }

    // MARK: - libnbd

    @Test("one BLOCK_STATUS returns exact base:allocation, b0 and fine extents; REQ_ONE one per context")
    func exactExtentsThroughLibnbd() throws {
        let fixture = try Self.patternedServer()
        let connection = try Self.contextsConnection(fixture)
        #expect(try connection.canMetaContext(NBDAllocationFlags.contextName))
        #expect(try connection.canMetaContext(Self.b0))
        #expect(try connection.canMetaContext(Self.fine))

        let expectedB0 = BitmapMaps.bitmapMap(dirty: Self.b0Dirty, size: Self.size)
        let expectedFine = BitmapMaps.bitmapMap(dirty: Self.fineDirty, size: Self.size)
        let expectedAllocation = try BitmapMaps.fileAllocation(fixture.image)

        // One call, every context, the whole image.
        let status = try connection.blockStatus(count: Self.size, offset: 0)
        #expect(Set(status.keys) == [NBDAllocationFlags.contextName, Self.b0, Self.fine])
        let b0 = BitmapMaps.absolute(status[Self.b0] ?? [], from: 0)
        let fine = BitmapMaps.absolute(status[Self.fine] ?? [], from: 0)
        let allocation = BitmapMaps.absolute(status[NBDAllocationFlags.contextName] ?? [], from: 0)
        #expect(b0 == expectedB0, "b0 exactly as sent (no neighbours of equal flags, clipped to the request)")
        #expect(fine == expectedFine)
        #expect(BitmapMaps.merged(allocation) == expectedAllocation)

        // A window starting inside a dirty run is clipped to it.
        let window = try connection.blockStatus(count: 1 * Self.mib, offset: 1 * Self.mib + 32 * Self.kib)
        #expect(BitmapMaps.absolute(window[Self.b0] ?? [], from: 1 * Self.mib + 32 * Self.kib) == [
            BitmapExtent(1 * Self.mib + 32 * Self.kib, 96 * Self.kib, 1),
            BitmapExtent(1 * Self.mib + 128 * Self.kib, 1 * Self.mib - 128 * Self.kib, 0),
            BitmapExtent(2 * Self.mib, 32 * Self.kib, 1),
        ])

        // REQ_ONE: exactly one extent per context.
        let one = try connection.blockStatus(count: Self.size, offset: 0, flags: [.reqOne])
        #expect(one[Self.b0].map { $0.map(\.length) } == [UInt32(Self.mib)])
        #expect(one[Self.b0].map { $0.map(\.flags) } == [0])
        #expect(one[Self.fine].map { $0.map(\.length) } == [UInt32(Self.mib)])
        #expect(one[NBDAllocationFlags.contextName]?.count == 1)
        #expect(one[NBDAllocationFlags.contextName]?.first.map { UInt64($0.length) } == expectedAllocation.first?.length)
        let inside = try connection.blockStatus(count: Self.size - Self.mib - 4096, offset: Self.mib + 4096, flags: [.reqOne])
        #expect(inside[Self.b0].map { $0.map(\.length) } == [124 * 1024])
        #expect(inside[Self.b0].map { $0.map(\.flags) } == [1])
        #expect(inside[Self.fine].map { $0.map(\.length) } == [64 * 1024])
        #expect(inside[Self.fine].map { $0.map(\.flags) } == [1])
        #expect(inside[NBDAllocationFlags.contextName]?.count == 1)
        // At the last sector: the clipped end of the last granule.
        let last = try connection.blockStatus(count: 512, offset: Self.size - 512, flags: [.reqOne])
        #expect(last[Self.b0].map { $0.map(\.length) } == [512])
        #expect(last[Self.b0].map { $0.map(\.flags) } == [1])

        // Only b0 selected: exactly that context comes back.
        let single = try fixture.connect { $0.metaContexts = [Self.b0] }
        let only = try single.blockStatus(count: Self.size, offset: 0)
        #expect(Array(only.keys) == [Self.b0])
        #expect(BitmapMaps.absolute(only[Self.b0] ?? [], from: 0) == expectedB0)
    }

    @Test("writes on one connection show in another connection's map at once, with every write kind")
    func liveAcrossConnections() throws {
        let fixture = try ServerFixture(size: Int(Self.size), extraArguments: ["--bitmap", "b0"])
        let reader = try fixture.connect { $0.metaContexts = [Self.b0] }
        #expect(try BitmapMaps.map(reader, context: Self.b0, size: Self.size) == [BitmapExtent(0, Self.size, 0)])
        let writer = try fixture.connect()
        try writer.pwrite(ImageFile.constant(1, count: 512), offset: 5 * Self.mib + 200 * 512)
        #expect(try BitmapMaps.map(reader, context: Self.b0, size: Self.size)
            == BitmapMaps.bitmapMap(dirty: [(5 * Self.mib + 64 * Self.kib, 64 * Self.kib)], size: Self.size))
        try writer.zero(count: 512, offset: 7 * Self.mib, flags: [.noHole])
        try writer.zero(count: 64 * Self.kib, offset: 9 * Self.mib, flags: [.fua])
        try writer.trim(count: 512, offset: 11 * Self.mib + 512)
        try writer.pwrite(ImageFile.constant(2, count: 512), offset: 13 * Self.mib, flags: [.fua])
        try writer.flush()
        #expect(try BitmapMaps.map(reader, context: Self.b0, size: Self.size) == BitmapMaps.bitmapMap(
            dirty: [(5 * Self.mib + 64 * Self.kib, 64 * Self.kib), (7 * Self.mib, 64 * Self.kib), (9 * Self.mib, 64 * Self.kib),
                    (11 * Self.mib, 64 * Self.kib), (13 * Self.mib, 64 * Self.kib)],
            size: Self.size))
        // Reads and block status do not dirty anything.
        _ = try writer.pread(count: 1 << 20, offset: 0)
        try writer.cache(count: 1 << 20, offset: 0)
        #expect(BitmapMaps.dirtyRuns(try BitmapMaps.map(reader, context: Self.b0, size: Self.size)).count == 5)
    }

    // MARK: - nbdinfo

    @Test("nbdinfo --map=qemu:dirty-bitmap:NAME and nbdinfo --map report the same extents")
    func nbdinfoMaps() throws {
        let fixture = try Self.patternedServer()
        let b0 = try BitmapMaps.nbdinfoMap(uri: fixture.uri, context: Self.b0)
        #expect(b0.extents == BitmapMaps.bitmapMap(dirty: Self.b0Dirty, size: Self.size), "\(b0.text)")
        // Eric Blake's example in miniature: the 512-byte write at the end is one whole 64 KiB granule.
        #expect(b0.text.split(separator: "\n").last.map { $0.split(separator: " ").map(String.init) }
            == ["\(Self.size - 65536)", "65536", "1", "dirty"])
        let fine = try BitmapMaps.nbdinfoMap(uri: fixture.uri, context: Self.fine)
        #expect(fine.extents == BitmapMaps.bitmapMap(dirty: Self.fineDirty, size: Self.size), "\(fine.text)")
        let allocation = try BitmapMaps.nbdinfoMap(uri: fixture.uri)
        #expect(allocation.extents == (try BitmapMaps.fileAllocation(fixture.image)), "\(allocation.text)")
        // The contexts are listed.
        let info = try ExternalTool.check("nbdinfo", ["--json", fixture.uri])
        for context in [NBDAllocationFlags.contextName, Self.b0, Self.fine] {
            #expect(info.stdout.contains("\"\(context)\""), "nbdinfo --json does not list \(context):\n\(info.stdout)")
        }
    }

    // MARK: - qemu-img map

    @Test("qemu-img map with x-dirty-bitmap shows the dirty ranges as \"data\": false")
    func qemuImgMap() throws {
        let fixture = try Self.patternedServer()
        guard let socket = fixture.server.socketPath else { throw HarnessError("no Unix listener") }
        let result = try ExternalTool.check("qemu-img", [
            "map", "--output=json", "--image-opts",
            "driver=nbd,server.type=unix,server.path=\(socket),export=disk,x-dirty-bitmap=\(Self.b0)",
        ])
        guard let entries = try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [[String: Any]] else {
            throw HarnessError("qemu-img map output is not a JSON array:\n\(result.stdout)")
        }
        var extents: [BitmapExtent] = []
        for entry in entries {
            guard let start = (entry["start"] as? NSNumber)?.uint64Value,
                let length = (entry["length"] as? NSNumber)?.uint64Value,
                let data = entry["data"] as? Bool
            else { throw HarnessError("unexpected qemu-img map entry \(entry)") }
            // x-dirty-bitmap feeds the bitmap in as if it were base:allocation: dirty = "hole".
            extents.append(BitmapExtent(start, length, data ? 0 : 1))
        }
        #expect(BitmapMaps.merged(extents) == BitmapMaps.bitmapMap(dirty: Self.b0Dirty, size: Self.size), "\(result.stdout)")
    }

    // MARK: - Against QEMU

    /// The same qemu-io commands, for both servers: aligned and unaligned writes, write
    /// zeroes, discard, a run over many granules and a write into the partial last granule.
    static let qemuIOCommands = [
        "write -P 0xaa 1M 64k",
        "write 10M 4k",
        "write -z 20M 512",
        "discard 30M 64k",
        "write -P 0xbb 65000 1000",
        "write -P 0xcc 40M 3M",
        "write -P 0xdd 64M 4k",
    ]
    /// 64 MiB + 12 KiB: the last 64 KiB granule is partial.
    static let qemuSize: UInt64 = (64 << 20) + 12 * 1024
    static let qemuDirty: [(UInt64, UInt64)] = [
        (0, 128 * kib), (1 * mib, 64 * kib), (10 * mib, 64 * kib), (20 * mib, 64 * kib), (30 * mib, 64 * kib),
        (40 * mib, 3 * mib), (64 * mib, 12 * kib),
    ]

    static func qemuIO(format: String, target: String, release: QemuRelease) throws {
        try release.qemuIO(target, qemuIOCommands, format: format)
    }

    /// Tidemark: a sparse raw image served with `--bitmap b0`, written with `release`'s
    /// qemu-io over NBD.
    static func tidemarkMap(release: QemuRelease) throws -> (text: String, extents: [BitmapExtent]) {
        let fixture = try ServerFixture(size: Int(qemuSize), extraArguments: ["--bitmap", "b0"])
        try qemuIO(format: "raw", target: fixture.uri, release: release)
        let map = try BitmapMaps.nbdinfoMap(uri: fixture.uri, context: b0)
        #expect(map.extents == BitmapMaps.bitmapMap(dirty: qemuDirty, size: qemuSize), "Tidemark:\n\(map.text)")
        return map
    }

    static func expectSameLines(_ tidemark: String, _ qemu: String, _ what: String) {
        let left = tidemark.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }
        let right = qemu.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }
        #expect(left.count == right.count, "\(what): \(left.count) lines from Tidemark, \(right.count) from QEMU")
        for index in 0..<max(left.count, right.count) {
            let mine = index < left.count ? left[index] : "<none>"
            let theirs = index < right.count ? right[index] : "<none>"
            #expect(mine == theirs, "\(what), line \(index + 1): Tidemark '\(mine)', QEMU '\(theirs)'")
        }
    }

    @Test(
        "qcow2 + qemu-img bitmap --add, written offline by qemu-io, served by qemu-nbd -B: same map as Tidemark",
        arguments: QemuRelease.allCases)
    func sameMapAsQemuNBDWithQcow2(release: QemuRelease) throws {
        let directory = try TestDirectory()
        let image = directory.file("disk.qcow2")
        try release.check("qemu-img", ["create", "-f", "qcow2", image, "\(Self.qemuSize)"])
        try release.check("qemu-img", ["bitmap", "--add", image, "b0"])
        try Self.qemuIO(format: "qcow2", target: image, release: release)
        let qemu = try BitmapReferenceServer.qemuNBD(
            image: image, format: "qcow2", bitmap: "b0", export: "disk", directory: directory, release: release)
        let reference = try BitmapMaps.nbdinfoMap(uri: qemu.uri(export: "disk"), context: Self.b0)
        qemu.stop()
        let tidemark = try Self.tidemarkMap(release: release)
        Self.expectSameLines(tidemark.text, reference.text, "nbdinfo --map=qemu:dirty-bitmap:b0 (qcow2 via \(release) qemu-nbd)")
    }

    @Test(
        "a raw image written over NBD to qemu-storage-daemon with a bitmap: same map as Tidemark",
        arguments: QemuRelease.allCases)
    func sameMapAsQemuStorageDaemonWithRaw(release: QemuRelease) throws {
        let directory = try TestDirectory()
        let image = directory.file("disk.raw")
        try ImageFile.createSparse(image, size: Int(Self.qemuSize))
        let qemu = try BitmapReferenceServer.storageDaemon(
            rawImage: image, bitmap: "b0", export: "disk", directory: directory, release: release)
        try Self.qemuIO(format: "raw", target: qemu.uri(export: "disk"), release: release)
        let reference = try BitmapMaps.nbdinfoMap(uri: qemu.uri(export: "disk"), context: Self.b0)
        qemu.stop()
        let tidemark = try Self.tidemarkMap(release: release)
        Self.expectSameLines(
            tidemark.text, reference.text, "nbdinfo --map=qemu:dirty-bitmap:b0 (raw via \(release) qemu-storage-daemon)")
    }

    // MARK: - Persistence

    @Test("after a clean SIGTERM and a restart the bitmaps are there with the same extents")
    func persistsAcrossCleanRestart() throws {
        let fixture = try Self.patternedServer()
        let before = try Self.contextsConnection(fixture)
        let b0Before = try BitmapMaps.map(before, context: Self.b0, size: Self.size)
        let fineBefore = try BitmapMaps.map(before, context: Self.fine, size: Self.size)
        #expect(b0Before == BitmapMaps.bitmapMap(dirty: Self.b0Dirty, size: Self.size))
        try before.shutdown()

        // A second server on the same image is refused while the first holds the store.
        let otherDirectory = try TestDirectory()
        do {
            _ = try TidemarkProcess.serve(image: fixture.image, in: otherDirectory)
            Issue.record("a second server on the same image started while the first holds its bitmap store")
        } catch {
            #expect("\(error)".contains("running server"), "\(error)")
        }
        #expect(fixture.server.isRunning)

        #expect(try fixture.server.stop(signal: SIGTERM) == .success)
        let state = try BitmapStoreFiles.state(image: fixture.image)
        #expect(state["cleanShutdown"] as? Bool == true, "\(state)")
        #expect((state["generation"] as? NSNumber)?.intValue == 0)

        // Restarted without --bitmap: the store alone brings the bitmaps back.
        let restarted = try TidemarkProcess.serve(image: fixture.image, in: fixture.directory)
        let after = try restarted.connect(export: "disk") { $0.metaContexts = [Self.b0, Self.fine] }
        #expect(try after.canMetaContext(Self.b0))
        #expect(try after.canMetaContext(Self.fine))
        #expect(try BitmapMaps.map(after, context: Self.b0, size: Self.size) == b0Before)
        #expect(try BitmapMaps.map(after, context: Self.fine, size: Self.size) == fineBefore)
        #expect(!restarted.serverLog.contains("unclean"), "a clean stop must not trigger recovery:\n\(restarted.serverLog)")
        // And they keep recording.
        try after.pwrite(ImageFile.constant(9, count: 512), offset: 6 * Self.mib)
        #expect(BitmapMaps.isDirty(try BitmapMaps.map(after, context: Self.b0, size: Self.size), offset: 6 * Self.mib, length: 65536))
        try after.shutdown()
        #expect(try restarted.stop(signal: SIGINT) == .success)
        #expect(try BitmapStoreFiles.state(image: fixture.image)["cleanShutdown"] as? Bool == true)
    }

    // MARK: - A corrupt store

    @Test("garbage in state.json: the error names state.json, the store starts over with b0 entirely dirty, the garbage is kept aside")
    func corruptStore() throws {
        let directory = try TestDirectory()
        let image = directory.file("image.raw")
        try ImageFile.createFilled(image, size: 4 << 20)
        do {
            let first = try TidemarkProcess.serve(image: image, in: directory, extraArguments: ["--bitmap", "b0"])
            #expect(try first.stop() == .success)
        }
        let statePath = BitmapStoreFiles.statePath(image: image)
        #expect(FileManager.default.fileExists(atPath: statePath))
        let garbage = Data("\u{1}\u{2} not a manifest {{{".utf8)
        try garbage.write(to: URL(fileURLWithPath: statePath))

        let server = try TidemarkProcess.serve(image: image, in: directory, extraArguments: ["--bitmap", "b0"])
        #expect(server.serverLog.contains("state.json"), "stderr must name the damaged file:\n\(server.serverLog)")
        let connection = try server.connect(export: "disk") {
            $0.metaContexts = [NBDAllocationFlags.contextName, Self.b0]
        }
        #expect(try connection.canMetaContext(NBDAllocationFlags.contextName))
        #expect(try connection.canMetaContext(Self.b0))
        // Nobody knows what changed since the damaged store's last save: all dirty.
        #expect(try BitmapMaps.map(connection, context: Self.b0, size: 4 << 20) == [BitmapExtent(0, 4 << 20, 1)])
        #expect(try connection.pread(count: 4096, offset: 8192) == ImageFile.pattern(count: 4096, offset: 8192))
        try connection.pwrite(ImageFile.constant(7, count: 4096), offset: 0)
        #expect(try connection.pread(count: 4096, offset: 0) == ImageFile.constant(7, count: 4096))
        try connection.shutdown()
        #expect(try server.stop() == .success)
        // The damaged manifest is left for the operator to inspect, in a damaged-* folder.
        let store = BitmapStoreFiles.directory(image: image)
        let aside = try FileManager.default.contentsOfDirectory(atPath: store).filter { $0.hasPrefix("damaged-") }
        #expect(aside.count == 1)
        #expect(FileManager.default.contents(atPath: store + "/" + (aside.first ?? "") + "/state.json") == garbage)
    }
}
