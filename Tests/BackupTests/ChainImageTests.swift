import BlockStorage
import Foundation
import Testing
import TestSupport
@testable import BackupChain
@testable import TidemarkBackup

/// The chain image the server serves and its writable overlay, against the model of
/// random chains written with ``Qcow2Writer``.
@Suite("Backup chain: served image and overlay")
struct ChainImageTests {
    typealias Layer = Qcow2RoundTripTests.Layer
    static let cluster = Qcow2RoundTripTests.cluster

    /// A random chain of four in a fresh directory: the directory, its layers and the
    /// expected bytes at each point.
    static func makeChain(seed: UInt64, size: Int) throws -> (TemporaryDirectory, [[Layer]], [[UInt8]]) {
        var generator = SeededGenerator(seed: seed)
        let clusters = (size + cluster - 1) / cluster
        let temporary = try TemporaryDirectory()
        let layers = (0..<4).map { Qcow2RoundTripTests.randomLayer(clusters: clusters, size: size, full: $0 == 0, generator: &generator) }
        let expected = try Qcow2RoundTripTests.writeChain(
            layers, size: size, in: BackupDirectory(path: temporary.path), generator: &generator)
        return (temporary, layers, expected)
    }

    /// The allocation of each cluster at `point`: the top-most layer that says anything wins.
    static func expectedKinds(_ layers: [[Layer]], point: Int) -> [ChainImage.Run] {
        (0..<layers[0].count).map { clusterIndex in
            for layer in layers[0...point].reversed() {
                switch layer[clusterIndex] {
                case .unallocated: continue
                case .zero: return .zero
                case .data(let data): return data.allSatisfy { $0 == 0 } ? .zero : .data(layer: 0, hostOffset: 0)
                }
            }
            return .hole
        }
    }

    static func read(_ image: some ImageReader, count: Int, at offset: UInt64) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0xEE, count: count)
        try bytes.withUnsafeMutableBytes { try image.read(into: $0, at: offset) }
        return bytes
    }

    static func open(_ directory: String, point: String?) throws -> ChainImage {
        try ChainImage(layers: ChainLocation.open(path: directory, point: point).layers)
    }

    @Test("every point reads as the model, in whole and unaligned reads; cached reads agree", arguments: [11, 12, 13])
    func readsEveryPoint(seed: UInt64) throws {
        let size = 40 * Self.cluster + 4608
        let (temporary, _, expected) = try Self.makeChain(seed: seed, size: size)
        var generator = SeededGenerator(seed: seed &+ 100)
        for point in 0..<4 {
            let image = try Self.open(temporary.path, point: String(point))
            #expect(image.size == UInt64(size))
            #expect(try Self.read(image, count: size, at: 0) == expected[point], "point \(point)")
            for _ in 0..<50 {
                let offset = Int.random(in: 0..<size, using: &generator)
                let count = Int.random(in: 1...min(300_000, size - offset), using: &generator)
                #expect(try Self.read(image, count: count, at: UInt64(offset)) == Array(expected[point][offset..<(offset + count)]))
                var cached = [UInt8](repeating: 0xEE, count: count)
                let hit = cached.withUnsafeMutableBytes { image.readIfCached(into: $0, at: UInt64(offset)) }
                if hit { #expect(cached == Array(expected[point][offset..<(offset + count)]), "cached read at \(offset)") }
            }
            #expect(throws: StorageError.self) { try Self.read(image, count: 2, at: UInt64(size - 1)) }
        }
    }

    @Test("a chain point by checkpoint-less name, by file and by the top file's backing links", arguments: [21])
    func pointsByName(seed: UInt64) throws {
        let size = 20 * Self.cluster
        let (temporary, _, expected) = try Self.makeChain(seed: seed, size: size)
        let newest = try ChainLocation.open(path: temporary.path, point: nil)
        #expect(newest.index == 3)
        #expect(newest.overlayPath == temporary.path + "/backup-0003.overlay")
        let byFile = try ChainLocation.open(path: temporary.path, point: "backup-0001.qcow2")
        #expect(byFile.index == 1)
        #expect(try Self.read(ChainImage(layers: byFile.layers), count: size, at: 0) == expected[1])
        let followed = try ChainLocation.open(path: temporary.path + "/backup-0002.qcow2", point: nil)
        #expect(followed.layers.count == 3)
        #expect(try Self.read(ChainImage(layers: followed.layers), count: size, at: 0) == expected[2])
        #expect(throws: BackupError.self) { try ChainLocation.open(path: temporary.path, point: "9") }
    }

    @Test("allocation: unallocated everywhere is a hole, zero clusters are zero, the rest data", arguments: [31, 32])
    func allocationMatchesModel(seed: UInt64) throws {
        let size = 40 * Self.cluster
        let (temporary, layers, _) = try Self.makeChain(seed: seed, size: size)
        for point in 0..<4 {
            let image = try Self.open(temporary.path, point: String(point))
            let kinds = Self.expectedKinds(layers, point: point)
            let extents = image.allocationExtents(at: 0, length: UInt64(size), maxExtents: 10_000)
            #expect(extents.reduce(0) { $0 + $1.length } == UInt64(size))
            var position: UInt64 = 0
            var previous: AllocationExtent?
            for extent in extents {
                if let previous { #expect(previous.isHole != extent.isHole || previous.isZero != extent.isZero, "unmerged runs") }
                previous = extent
                for clusterIndex in Int(position) / Self.cluster..<Int(position + extent.length) / Self.cluster {
                    switch kinds[clusterIndex] {
                    case .hole: #expect(extent.isHole && extent.isZero, "point \(point) cluster \(clusterIndex)")
                    case .zero: #expect(!extent.isHole && extent.isZero, "point \(point) cluster \(clusterIndex)")
                    case .data: #expect(!extent.isHole && !extent.isZero, "point \(point) cluster \(clusterIndex)")
                    }
                }
                position += extent.length
            }
            // A capped lookup stops early and never overruns.
            let capped = image.allocationExtents(at: 100, length: UInt64(size - 100), maxExtents: 2)
            #expect(capped.count <= 2)
            #expect(capped.reduce(0) { $0 + $1.length } <= UInt64(size - 100))
            #expect(image.cachedTableCount <= 1)
        }
    }

    @Test("a disk of 1.5 GiB: three resolved tables, an unmapped range answered without a table")
    func severalTables() throws {
        let temporary = try TemporaryDirectory()
        let size: UInt64 = 1536 << 20
        let path = temporary.path + "/big.qcow2"
        let writer = try Qcow2Writer(path: path, virtualSize: size, backingFile: nil)
        try [UInt8](repeating: 5, count: Self.cluster).withUnsafeBytes { try writer.writeData(at: 0, bytes: $0) }
        try [UInt8](repeating: 6, count: Self.cluster).withUnsafeBytes { try writer.writeData(at: size - 65536, bytes: $0) }
        try writer.finish()
        let image = try ChainImage(layers: ChainLocation.open(path: path, point: nil).layers)
        #expect(try Self.read(image, count: 4, at: size - 4) == [6, 6, 6, 6])
        #expect(try Self.read(image, count: 4, at: 600 << 20) == [0, 0, 0, 0])
        #expect(image.cachedTableCount == 1, "the middle 512 MiB maps nothing and needs no table")
        let extents = image.allocationExtents(at: 0, length: size, maxExtents: 100)
        #expect(extents == [
            AllocationExtent(length: 65536, isHole: false, isZero: false),
            AllocationExtent(length: size - 2 * 65536, isHole: true, isZero: true),
            AllocationExtent(length: 65536, isHole: false, isZero: false),
        ])
    }

    @Test("damaged inputs: an L2 table outside the file fails reads, a missing backing file fails the open")
    func damagedInputs() throws {
        let size = 8 * Self.cluster
        let (temporary, _, _) = try Self.makeChain(seed: 41, size: size)
        let directory = BackupDirectory(path: temporary.path)
        // Point the top file's first L1 entry past the end of the file.
        let top = directory.file("backup-0003.qcow2")
        let file = try BackupFile(path: top, flags: O_RDWR)
        let header = try file.read(count: 104, at: 0)
        let l1Offset = BigEndian.get64(header, at: 40)
        var entry = [UInt8](repeating: 0, count: 8)
        BigEndian.put64(Qcow2Format.copiedFlag | (1 << 40), into: &entry, at: 0)
        try file.write(entry, at: l1Offset)
        let image = try Self.open(temporary.path, point: nil)
        #expect {
            try Self.read(image, count: 4096, at: 0)
        } throws: { error in
            guard case StorageError.damagedImage(let path, _) = error else { return false }
            return path == top
        }
        #expect(!image.readIfCached(into: UnsafeMutableRawBufferPointer.allocate(byteCount: 1, alignment: 1), at: 0))
        // The points below are intact.
        let below = try Self.open(temporary.path, point: "2")
        #expect(try Self.read(below, count: 16, at: 0).count == 16)
        // A missing backing file.
        try FileManager.default.removeItem(atPath: directory.file("backup-0001.qcow2"))
        #expect {
            try ChainLocation.open(path: temporary.path, point: "2")
        } throws: { error in
            (error as? BackupError)?.description.contains("backup-0001.qcow2") == true
        }
        #expect(throws: BackupError.self) { try ChainLocation.open(path: directory.file("backup-0002.qcow2"), point: nil) }
    }

    /// The model of an overlay: the chain's bytes with writes on top.
    static func checksum(_ path: String) throws -> [UInt8] {
        Array(try Data(contentsOf: URL(fileURLWithPath: path)))
    }

    @Test("overlay: random writes and zeroes read back; flushed writes survive a reopen, unflushed granules fall back; backup files untouched", arguments: [51, 52])
    func overlayWrites(seed: UInt64) throws {
        let size = 24 * Self.cluster + 4096
        let (temporary, _, expected) = try Self.makeChain(seed: seed, size: size)
        let location = try ChainLocation.open(path: temporary.path, point: nil)
        let backupFiles = (0..<4).map { temporary.path + "/" + BackupDirectory.imageName(index: $0) }
        let before = try backupFiles.map(Self.checksum)
        var model = expected[3]
        var generator = SeededGenerator(seed: seed &+ 7)
        do {
            let overlay = try ChainOverlay(chain: ChainImage(layers: location.layers), dataPath: location.overlayPath, identity: location.identity)
            #expect(try Self.read(overlay, count: size, at: 0) == model)
            for round in 0..<60 {
                let offset = Int.random(in: 0..<size, using: &generator)
                let count = Int.random(in: 1...min(200_000, size - offset), using: &generator)
                if round % 4 == 3 {
                    try overlay.writeZeroes(at: UInt64(offset), length: UInt64(count), fastOnly: false)
                    model.replaceSubrange(offset..<(offset + count), with: repeatElement(0, count: count))
                } else {
                    let bytes = (0..<count).map { _ in UInt8.random(in: 0...255, using: &generator) }
                    try bytes.withUnsafeBytes { try overlay.write($0, at: UInt64(offset)) }
                    model.replaceSubrange(offset..<(offset + count), with: bytes)
                }
            }
            #expect(try Self.read(overlay, count: size, at: 0) == model)
            let written = overlay.allocationExtents(at: 0, length: UInt64(size), maxExtents: 10_000)
            #expect(written.reduce(0) { $0 + $1.length } == UInt64(size))
            try overlay.flush()
            // After the flush: a write to granule 0 only (not flushed).
            try [UInt8](repeating: 0xAB, count: 100).withUnsafeBytes { try overlay.write($0, at: 0) }
        }
        // Reopened as after a crash: the flushed model, except granule 0 if it was new
        // after the flush (it was written before too in most seeds; the model holds either way
        // for flushed granules).
        let reopened = try ChainOverlay(chain: ChainImage(layers: location.layers), dataPath: location.overlayPath, identity: location.identity)
        let granule = Int(ChainOverlay.granule)
        let afterReopen = try Self.read(reopened, count: size, at: 0)
        #expect(Array(afterReopen[granule...]) == Array(model[granule...]))
        let first = Array(afterReopen[0..<granule])
        #expect(first == Array(model[0..<granule]) || first == [UInt8](repeating: 0xAB, count: 100) + Array(model[100..<granule]))
        #expect(try backupFiles.map(Self.checksum) == before, "the backup files changed")
    }

    @Test("overlay: a write to a new granule after the last flush reads as the chain after a reopen")
    func unflushedGranuleFallsBack() throws {
        let size = 8 * Self.cluster
        let (temporary, _, expected) = try Self.makeChain(seed: 61, size: size)
        let location = try ChainLocation.open(path: temporary.path, point: nil)
        do {
            let overlay = try ChainOverlay(chain: ChainImage(layers: location.layers), dataPath: location.overlayPath, identity: location.identity)
            try [UInt8](repeating: 1, count: 4096).withUnsafeBytes { try overlay.write($0, at: 4096) }
            try overlay.flush()
            try [UInt8](repeating: 2, count: 4096).withUnsafeBytes { try overlay.write($0, at: UInt64(3 * Self.cluster)) }
            #expect(overlay.writtenGranules == 2)
        }
        let reopened = try ChainOverlay(chain: ChainImage(layers: location.layers), dataPath: location.overlayPath, identity: location.identity)
        #expect(reopened.writtenGranules == 1)
        var model = expected[3]
        model.replaceSubrange(4096..<8192, with: repeatElement(1, count: 4096))
        #expect(try Self.read(reopened, count: size, at: 0) == model)
        // Writing part of that granule again copies the chain in first: no stale bytes.
        try [UInt8](repeating: 3, count: 10).withUnsafeBytes { try reopened.write($0, at: UInt64(3 * Self.cluster + 50_000)) }
        model.replaceSubrange((3 * Self.cluster + 50_000)..<(3 * Self.cluster + 50_010), with: repeatElement(3, count: 10))
        #expect(try Self.read(reopened, count: size, at: 0) == model)
        #expect(throws: StorageError.notSupported(operation: "fast zeroing of part of a granule of a backup")) {
            try reopened.writeZeroes(at: UInt64(5 * Self.cluster + 1), length: 10, fastOnly: true)
        }
    }

    @Test("overlay map: a damaged map or one of another chain point refuses the overlay")
    func mapRefusals() throws {
        let size = 8 * Self.cluster
        let (temporary, _, _) = try Self.makeChain(seed: 71, size: size)
        let location = try ChainLocation.open(path: temporary.path, point: nil)
        do {
            let overlay = try ChainOverlay(chain: ChainImage(layers: location.layers), dataPath: location.overlayPath, identity: location.identity)
            try [UInt8](repeating: 1, count: 4096).withUnsafeBytes { try overlay.write($0, at: 0) }
            try overlay.flush()
        }
        #expect(throws: StorageError.self) {
            try ChainOverlay(chain: ChainImage(layers: location.layers), dataPath: location.overlayPath, identity: "another point")
        }
        let map = try BackupFile(path: location.overlayPath + ".map", flags: O_RDWR)
        let length = try map.length()
        var last = try map.read(count: 1, at: length - 1)
        last[0] ^= 0x10
        try map.write(last, at: length - 1)
        #expect {
            try ChainOverlay(chain: ChainImage(layers: location.layers), dataPath: location.overlayPath, identity: location.identity)
        } throws: { error in
            "\(error)".contains("checksum")
        }
    }
}

extension ChainImageTests {
    @Test("live restore copy: copyNext fills every granule the client did not write, never over a client's write")
    func copyNextSkipsClientWrites() throws {
        let size = 30 * Self.cluster + 4096
        let (temporary, _, expected) = try Self.makeChain(seed: 81, size: size)
        let location = try ChainLocation.open(path: temporary.path, point: "2")
        let target = temporary.path + "/target.raw"
        // A target with old content everywhere: the copy must replace all of it.
        try Data(repeating: 0xCC, count: size + 8192).write(to: URL(fileURLWithPath: target))
        let overlay = try ChainOverlay(
            chain: ChainImage(layers: location.layers), dataPath: target, mapPath: target + ".map", identity: "restore",
            allowLarger: true)
        #expect(overlay.size == UInt64(size))
        var model = expected[2]
        try [UInt8](repeating: 0x11, count: 5000).withUnsafeBytes { try overlay.write($0, at: 70_000) }
        model.replaceSubrange(70_000..<75_000, with: repeatElement(0x11, count: 5000))
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 3 * Int(ChainOverlay.granule), alignment: 4096)
        defer { buffer.deallocate() }
        var cursor = 0
        var covered: UInt64 = 0
        var steps = 0
        while true {
            let done = try overlay.copyNext(cursor: &cursor, buffer: buffer)
            if done == 0 { break }
            #expect(done <= 3 * ChainOverlay.granule)
            covered += done
            steps += 1
            if steps == 4 {
                // A client write in the middle of the copy, to a granule not copied yet.
                try [UInt8](repeating: 0x22, count: 100).withUnsafeBytes { try overlay.write($0, at: UInt64(size - 200)) }
                model.replaceSubrange((size - 200)..<(size - 100), with: repeatElement(0x22, count: 100))
            }
        }
        #expect(overlay.writtenGranules == overlay.granuleCount)
        #expect(covered < UInt64(size), "granules written by the client were not copied")
        let onDisk = try Data(contentsOf: URL(fileURLWithPath: target))
        #expect(Array(onDisk.prefix(size)) == model, "the target holds the point and the client's writes")
        #expect(try Self.read(overlay, count: size, at: 0) == model)
    }

    @Test("a map left behind by a deleted overlay is dropped, not trusted, when the overlay is created again")
    func staleMapIsDropped() throws {
        let size = 8 * Self.cluster
        let (temporary, _, expected) = try Self.makeChain(seed: 91, size: size)
        let location = try ChainLocation.open(path: temporary.path, point: nil)
        do {
            let overlay = try ChainOverlay(chain: ChainImage(layers: location.layers), dataPath: location.overlayPath, identity: location.identity)
            try [UInt8](repeating: 9, count: 4096).withUnsafeBytes { try overlay.write($0, at: 0) }
            try overlay.flush()
        }
        try FileManager.default.removeItem(atPath: location.overlayPath)
        do {
            let fresh = try ChainOverlay(chain: ChainImage(layers: location.layers), dataPath: location.overlayPath, identity: location.identity)
            #expect(fresh.writtenGranules == 0)
            #expect(!FileManager.default.fileExists(atPath: location.overlayPath + ".map"))
        }
        // As after a crash before any FLUSH: the reopened overlay shows the chain, not zeroes.
        let reopened = try ChainOverlay(chain: ChainImage(layers: location.layers), dataPath: location.overlayPath, identity: location.identity)
        #expect(try Self.read(reopened, count: size, at: 0) == expected[3])
    }
}
