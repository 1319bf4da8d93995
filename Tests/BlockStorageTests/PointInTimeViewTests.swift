import BlockStorage
import Foundation
import Synchronization
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Copy-before-write views: what a view reads after writes, its allocation at the
/// instant, what its sidecar holds, closing, and readers racing writers on one granule.
@Suite("PointInTimeView")
struct PointInTimeViewTests {
    static let granule = Int(PointInTimeView.defaultGranularity)
    static let size = 4 * mib

    /// An image of 4 MiB: data in [0, 1 MiB) and [2 MiB, 3 MiB), holes elsewhere.
    static func makeImage(_ directory: TemporaryDirectory) throws -> (RawImage, [UInt8]) {
        let path = directory.file("image.raw")
        try writeFile(path, [])
        guard truncate(path, off_t(size)) == 0 else { throw POSIXError(.EIO) }
        var original = [UInt8](repeating: 0, count: size)
        for start in [0, 2 * mib] {
            let data = pattern(mib, seed: UInt8(start / mib))
            try writeFile(path, data, at: start)
            original.replaceSubrange(start..<(start + mib), with: data)
        }
        return (try RawImage(path: path, readOnly: false), original)
    }

    /// A writer's whole protocol: preserve into the view, then write.
    static func overwrite(_ image: RawImage, _ view: PointInTimeView, _ bytes: [UInt8], at offset: Int) throws {
        try view.preserve(offset: UInt64(offset), length: UInt64(bytes.count))
        try image.write(bytes, at: UInt64(offset))
    }

    @Test("after writes, zeroes and trims the view reads the instant, the image the new data")
    func readsTheInstant() throws {
        let directory = try TemporaryDirectory()
        let (image, original) = try Self.makeImage(directory)
        let view = try PointInTimeView(image: image, sidecarPath: directory.file("view.cbw"))
        view.activate()
        #expect(view.needsPreservation(offset: 0, length: 1))
        // A write inside one granule, one across data and hole, one into a hole only.
        try Self.overwrite(image, view, [UInt8](repeating: 0xAA, count: 100), at: 1000)
        try Self.overwrite(image, view, [UInt8](repeating: 0xBB, count: 3 * Self.granule), at: mib - Self.granule)
        try Self.overwrite(image, view, [UInt8](repeating: 0xCC, count: 4096), at: 3 * mib + 8192)
        try view.preserve(offset: UInt64(2 * mib), length: UInt64(Self.granule))
        try image.discard(at: UInt64(2 * mib), length: UInt64(Self.granule))
        try view.preserve(offset: UInt64(2 * mib + 5 * Self.granule), length: 10)
        try image.writeZeroes(at: UInt64(2 * mib + 5 * Self.granule), length: 10, allowHole: false, fastOnly: false)

        #expect(try view.readBytes(Self.size, at: 0) == original)
        #expect(try image.readBytes(100, at: 1000) == [UInt8](repeating: 0xAA, count: 100))
        #expect(try image.readBytes(Self.granule, at: UInt64(2 * mib)) == [UInt8](repeating: 0, count: Self.granule))
        // Unaligned reads across preserved and untouched granules.
        for (offset, count) in [(999, 3), (mib - Self.granule - 7, Self.granule + 14), (2 * mib + 5 * Self.granule - 1, 2)] {
            #expect(try view.readBytes(count, at: UInt64(offset)) == Array(original[offset..<(offset + count)]))
        }
        #expect(!view.needsPreservation(offset: 1000, length: 100), "preserved once, never again")
        #expect(view.needsPreservation(offset: UInt64(3 * mib + 2 * Self.granule), length: 1))
    }

    @Test("the sidecar grows only with overwritten data: holes are preserved as holes")
    func sidecarGrowsWithOverwrittenDataOnly() throws {
        let directory = try TemporaryDirectory()
        let (image, _) = try Self.makeImage(directory)
        let view = try PointInTimeView(image: image, sidecarPath: directory.file("view.cbw"))
        view.activate()
        #expect(view.sidecarAllocatedBytes == 0)
        // 256 KiB over holes: nothing to keep.
        try Self.overwrite(image, view, [UInt8](repeating: 1, count: 256 * 1024), at: mib + 4096)
        #expect(view.sidecarAllocatedBytes == 0)
        #expect(view.preservedBytes == UInt64(5 * Self.granule))
        // 4 KiB twice into the same data granule: one granule kept, once.
        try Self.overwrite(image, view, [UInt8](repeating: 2, count: 4096), at: 0)
        try Self.overwrite(image, view, [UInt8](repeating: 3, count: 4096), at: 8192)
        #expect(view.sidecarAllocatedBytes == UInt64(Self.granule))
        // The view's allocation is the instant's: the overwritten hole is still a hole.
        let extents = view.allocationExtents(at: 0, length: UInt64(Self.size), maxExtents: 100)
        #expect(extents == [
            AllocationExtent(length: UInt64(mib), isHole: false), AllocationExtent(length: UInt64(mib), isHole: true),
            AllocationExtent(length: UInt64(mib), isHole: false), AllocationExtent(length: UInt64(mib), isHole: true),
        ])
        let live = image.allocationExtents(at: UInt64(mib + 4096), length: UInt64(mib / 2), maxExtents: 100)
        #expect(live.first?.isHole == false, "the live image has data there now: \(live)")
    }

    @Test("closing deletes the sidecar; reads then fail and writes need no copy")
    func close() throws {
        let directory = try TemporaryDirectory()
        let (image, _) = try Self.makeImage(directory)
        let sidecar = directory.file("view.cbw")
        let view = try PointInTimeView(image: image, sidecarPath: sidecar)
        view.activate()
        try Self.overwrite(image, view, [UInt8](repeating: 9, count: 4096), at: 0)
        #expect(FileManager.default.fileExists(atPath: sidecar))
        view.close()
        #expect(!FileManager.default.fileExists(atPath: sidecar))
        #expect(throws: StorageError.viewUnavailable(reason: "it was closed")) { try view.readBytes(10, at: 0) }
        #expect(!view.needsPreservation(offset: UInt64(2 * mib), length: 4096))
        try view.preserve(offset: UInt64(2 * mib), length: 4096)
        #expect(view.sidecarAllocatedBytes == 0)
    }

    @Test("a read-only image needs no sidecar; a writable one must have one")
    func sidecarRequirements() throws {
        let directory = try TemporaryDirectory()
        let (image, original) = try Self.makeImage(directory)
        #expect(throws: StorageError.self) { try PointInTimeView(image: image, sidecarPath: nil) }
        let readOnly = try RawImage(path: image.path, readOnly: true)
        let view = try PointInTimeView(image: readOnly, sidecarPath: nil)
        view.activate()
        #expect(!view.needsPreservation(offset: 0, length: 1))
        #expect(try view.readBytes(4096, at: UInt64(2 * mib)) == Array(original[(2 * mib)..<(2 * mib + 4096)]))
    }

    @Test("readers racing writers on the same granules always see the instant")
    func racingReadersAndWriters() throws {
        let directory = try TemporaryDirectory()
        let (image, original) = try Self.makeImage(directory)
        let view = try PointInTimeView(image: image, sidecarPath: directory.file("view.cbw"))
        view.activate()
        let mismatches = Atomic<Int>(0)
        let reads = Atomic<Int>(0)
        let errors = Atomic<Int>(0)
        let writersDone = Atomic<Int>(0)
        let writers = 3
        let readers = 3
        // Writers sweep the same granules in different orders, so copies of one granule
        // race each other and the readers.
        DispatchQueue.concurrentPerform(iterations: writers + readers) { worker in
            var generator = SystemRandomNumberGenerator()
            if worker < writers {
                let granules = (0..<(Self.size / Self.granule)).shuffled(using: &generator)
                for granule in granules {
                    let offset = granule * Self.granule + Int.random(in: 0..<(Self.granule - 512), using: &generator)
                    do {
                        try Self.overwrite(image, view, [UInt8](repeating: UInt8(0xE0 + worker), count: 512), at: offset)
                    } catch {
                        errors.add(1, ordering: .relaxed)
                    }
                }
                writersDone.add(1, ordering: .relaxed)
                return
            }
            while writersDone.load(ordering: .relaxed) < writers || reads.load(ordering: .relaxed) < 500 {
                let count = Int.random(in: 1...(3 * Self.granule), using: &generator)
                let offset = Int.random(in: 0...(Self.size - count), using: &generator)
                var bytes = [UInt8](repeating: 0xFF, count: count)
                let cached = bytes.withUnsafeMutableBytes { view.readIfCached(into: $0, at: UInt64(offset)) }
                if !cached {
                    guard let read = try? view.readBytes(count, at: UInt64(offset)) else {
                        errors.add(1, ordering: .relaxed)
                        continue
                    }
                    bytes = read
                }
                let equal = bytes.withUnsafeBytes { read in
                    original.withUnsafeBytes { all in
                        guard let mine = read.baseAddress, let theirs = all.baseAddress else { return false }
                        return memcmp(mine, theirs + offset, count) == 0
                    }
                }
                if !equal { mismatches.add(1, ordering: .relaxed) }
                reads.add(1, ordering: .relaxed)
            }
        }
        let (errorCount, mismatchCount, readCount) = (
            errors.load(ordering: .relaxed), mismatches.load(ordering: .relaxed), reads.load(ordering: .relaxed)
        )
        #expect(errorCount == 0)
        #expect(mismatchCount == 0, "of \(readCount) reads")
        #expect(try view.readBytes(Self.size, at: 0) == original)
        #expect(view.preservedBytes == UInt64(Self.size))
        #expect(view.sidecarAllocatedBytes == UInt64(2 * mib), "only the 2 MiB of data were copied")
    }
}
