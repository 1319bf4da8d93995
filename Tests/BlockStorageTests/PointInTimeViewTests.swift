import BlockStorage
import Foundation
import Synchronization
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Copy-before-write views: what a view reads after writes, its allocation at the
/// instant, what its sidecar holds, closing, readers racing writers on one granule, and
/// the page-sized preservation unit (most tests pin the old 64 KiB granule, which keeps
/// runs of several granules in play).
@Suite("PointInTimeView")
struct PointInTimeViewTests {
    static let granule = 64 * 1024
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

    /// A writer's whole protocol: preserve into the view, then write. `inline`: first try
    /// the event loop's way (`preserveIfNonBlocking`), and `preserve` only if it declines.
    static func overwrite(
        _ image: RawImage, _ view: PointInTimeView, _ bytes: [UInt8], at offset: Int, inline: Bool = false
    ) throws {
        if !inline || !view.preserveIfNonBlocking(offset: UInt64(offset), length: UInt64(bytes.count)) {
            try view.preserve(offset: UInt64(offset), length: UInt64(bytes.count))
        }
        try image.write(bytes, at: UInt64(offset))
    }

    @Test("after writes, zeroes and trims the view reads the instant, the image the new data")
    func readsTheInstant() throws {
        let directory = try TemporaryDirectory()
        let (image, original) = try Self.makeImage(directory)
        let view = try PointInTimeView(image: image, sidecarPath: directory.file("view.cbw"), granularity: UInt64(Self.granule))
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
        let view = try PointInTimeView(image: image, sidecarPath: directory.file("view.cbw"), granularity: UInt64(Self.granule))
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
        let view = try PointInTimeView(image: image, sidecarPath: sidecar, granularity: UInt64(Self.granule))
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

    @Test("the preservation unit is a page, coarser only where the bookkeeping would pass 16 MiB")
    func preservationUnit() {
        #expect(PointInTimeView.granularity(forImageSize: 0) == 4096)
        #expect(PointInTimeView.granularity(forImageSize: 1 << 30) == 4096)
        #expect(PointInTimeView.granularity(forImageSize: 256 << 30) == 4096)
        #expect(PointInTimeView.granularity(forImageSize: (256 << 30) + 1) == 8192)
        #expect(PointInTimeView.granularity(forImageSize: 1 << 40) == 16384)
        #expect(PointInTimeView.granularity(forImageSize: UInt64.max) == 1 << 38)
    }

    @Test("a write smaller than a bitmap granule preserves exactly the pages it changes")
    func smallWritesPreserveTheirPages() throws {
        let directory = try TemporaryDirectory()
        let (image, original) = try Self.makeImage(directory)
        let view = try PointInTimeView(image: image, sidecarPath: directory.file("view.cbw"))
        #expect(view.granularity == 4096)
        view.activate()
        // 4 KiB in the middle of a 64 KiB data granule: that page, and nothing around it.
        try Self.overwrite(image, view, [UInt8](repeating: 0x5A, count: 4096), at: 8192)
        #expect(view.preservedBytes == 4096)
        #expect(view.sidecarAllocatedBytes == 4096)
        #expect(!view.needsPreservation(offset: 8192, length: 4096))
        #expect(view.needsPreservation(offset: 4096, length: 4096), "the page before was not changed")
        #expect(view.needsPreservation(offset: 12288, length: 1), "nor the page after")
        // 100 bytes straddling two pages keep both; 1 byte inside a kept page keeps nothing more.
        try Self.overwrite(image, view, [UInt8](repeating: 0x6B, count: 100), at: 5 * 4096 - 50)
        try Self.overwrite(image, view, [0x7C], at: 8192 + 17)
        #expect(view.preservedBytes == 3 * 4096)
        #expect(view.sidecarAllocatedBytes == 3 * 4096)
        // The view reads the instant, the image the new data, across kept and untouched pages.
        #expect(try view.readBytes(Self.granule * 2, at: 0) == Array(original[0..<(Self.granule * 2)]))
        #expect(try view.readBytes(4096 + 77, at: 8192 - 77) == Array(original[(8192 - 77)..<(12288)]))
        #expect(try image.readBytes(1, at: 8192 + 17) == [0x7C])
        #expect(try image.readBytes(100, at: 5 * 4096 - 50) == [UInt8](repeating: 0x6B, count: 100))
    }

    @Test("a small write's cached pages are kept at once; other cases are left to preserve")
    func preserveIfNonBlocking() throws {
        let directory = try TemporaryDirectory()
        let (image, original) = try Self.makeImage(directory)
        let view = try PointInTimeView(image: image, sidecarPath: directory.file("view.cbw"))
        #expect(!view.preserveIfNonBlocking(offset: 8192, length: 4096), "not active yet: the writer must wait")
        view.activate()
        // One page, then 100 bytes straddling two pages: kept at once, exactly those pages.
        #expect(view.preserveIfNonBlocking(offset: 8192, length: 4096))
        #expect(view.preserveIfNonBlocking(offset: 5 * 4096 - 50, length: 100))
        #expect(view.preservedBytes == 3 * 4096 && view.sidecarAllocatedBytes == 3 * 4096)
        #expect(view.preserveIfNonBlocking(offset: 8192 + 1, length: 10), "already kept: nothing to do")
        // More than two pages: the pool's job.
        #expect(!view.preserveIfNonBlocking(offset: 16 * 4096, length: 3 * 4096))
        #expect(view.needsPreservation(offset: 16 * 4096, length: 3 * 4096))
        // A page of a hole (read once, so in the page cache) is kept as a hole.
        _ = try image.readBytes(4096, at: UInt64(mib + 4096))
        #expect(view.preserveIfNonBlocking(offset: UInt64(mib + 4096), length: 4096))
        #expect(view.preservedBytes == 4 * 4096 && view.sidecarAllocatedBytes == 3 * 4096)
        // Old data not in the page cache: the pool's job (it would wait for the disk).
        try image.flush()
        let fd = open(image.path, O_RDONLY)
        #expect(fd >= 0)
        #expect(posix_fadvise(fd, off_t(2 * mib), off_t(mib), POSIX_FADV_DONTNEED) == 0)
        Glibc.close(fd)
        #expect(!view.preserveIfNonBlocking(offset: UInt64(2 * mib + 4096), length: 4096))
        // The data changes after each keep; the view still reads the instant.
        for (offset, count) in [(8192, 4096), (5 * 4096 - 50, 100), (mib + 4096, 4096)] {
            try image.write([UInt8](repeating: 0xD0, count: count), at: UInt64(offset))
        }
        #expect(try view.readBytes(Self.size, at: 0) == original)
        view.close()
        #expect(view.preserveIfNonBlocking(offset: 40 * 4096, length: 4096), "a closed view keeps nothing")
    }

    @Test(
        "readers racing writers on the same granules always see the instant",
        arguments: [(4096, false), (64 * 1024, false), (4096, true), (8192, true)])
    func racingReadersAndWriters(granule: Int, inline: Bool) throws {
        let directory = try TemporaryDirectory()
        let (image, original) = try Self.makeImage(directory)
        let view = try PointInTimeView(image: image, sidecarPath: directory.file("view.cbw"), granularity: UInt64(granule))
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
                let granules = (0..<(Self.size / granule)).shuffled(using: &generator)
                for index in granules {
                    let offset = index * granule + Int.random(in: 0..<(granule - 512), using: &generator)
                    do {
                        // Inline writers alternate with pool writers, so the two ways race.
                        try Self.overwrite(
                            image, view, [UInt8](repeating: UInt8(0xE0 + worker), count: 512), at: offset,
                            inline: inline && (worker + index) % 2 == 0)
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
