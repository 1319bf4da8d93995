import BlockStorage
import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A fresh temporary directory per test, removed afterwards.
final class TemporaryDirectory {
    let path: String

    init() throws {
        var template = Array((NSTemporaryDirectory() + "/rawimage-test-XXXXXX").utf8CString)
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        guard made != nil else { throw POSIXError(.EIO) }
        path = template.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
    }

    func file(_ name: String) -> String { path + "/" + name }

    deinit {
        try? FileManager.default.removeItem(atPath: path)
    }
}

let mib = 1 << 20

/// Reads a file through the kernel, not through RawImage.
private func fileBytes(_ path: String, offset: Int, count: Int) throws -> [UInt8] {
    let handle = try #require(FileHandle(forReadingAtPath: path))
    defer { try? handle.close() }
    try handle.seek(toOffset: UInt64(offset))
    return [UInt8](try handle.read(upToCount: count) ?? Data())
}

func writeFile(_ path: String, _ bytes: [UInt8], at offset: Int = 0) throws {
    let fd = open(path, O_WRONLY | O_CREAT, 0o644)
    guard fd >= 0 else { throw POSIXError(.EIO) }
    defer { close(fd) }
    let written = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(offset)) }
    guard written == bytes.count, fsync(fd) == 0 else { throw POSIXError(.EIO) }
}

/// Allocated 512-byte blocks of a file (st_blocks).
private func allocatedBlocks(_ path: String) throws -> Int {
    var info = stat()
    guard stat(path, &info) == 0 else { throw POSIXError(.ENOENT) }
    return Int(info.st_blocks)
}

func pattern(_ count: Int, seed: UInt8) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(seed)) | 1 }
}

extension ImageReader {
    func readBytes(_ count: Int, at offset: UInt64, prefill: UInt8 = 0xCC) throws -> [UInt8] {
        var bytes = [UInt8](repeating: prefill, count: count)
        var failure: StorageError?
        bytes.withUnsafeMutableBytes { buffer in
            do throws(StorageError) { try read(into: buffer, at: offset) } catch { failure = error }
        }
        if let failure { throw failure }
        return bytes
    }
}

extension RawImage {
    func write(_ bytes: [UInt8], at offset: UInt64) throws {
        var failure: StorageError?
        bytes.withUnsafeBytes { buffer in
            do throws(StorageError) { try write(buffer, at: offset) } catch { failure = error }
        }
        if let failure { throw failure }
    }
}

@Suite("RawImage")
struct RawImageTests {
    @Test("copyRange copies a range to the same offsets of another image, and refuses a read-only one")
    func copyRange() throws {
        let directory = try TemporaryDirectory()
        let source = directory.file("source.raw")
        let target = directory.file("target.raw")
        let data = pattern(3 * mib, seed: 7)
        try writeFile(source, data)
        try RawImage.createSparseFileIfMissing(path: target, size: UInt64(3 * mib))
        let from = try RawImage(path: source, readOnly: true)
        let to = try RawImage(path: target, readOnly: false)
        try from.copyRange(at: 4096 + 100, length: UInt64(2 * mib), to: to)
        #expect(try to.readBytes(2 * mib, at: 4196) == Array(data[4196..<(4196 + 2 * mib)]))
        #expect(try to.readBytes(4196, at: 0) == [UInt8](repeating: 0, count: 4196), "nothing outside the range")
        let readOnly = try RawImage(path: target, readOnly: true)
        #expect(throws: StorageError.readOnly) { try from.copyRange(at: 0, length: 10, to: readOnly) }
    }

    @Test("createSparseFileIfMissing creates a sparse file once and never touches an existing one")
    func createSparse() throws {
        let directory = try TemporaryDirectory()
        let path = directory.file("image.raw")
        #expect(try RawImage.createSparseFileIfMissing(path: path, size: 64 * UInt64(mib)))
        #expect(try allocatedBlocks(path) == 0)
        let image = try RawImage(path: path, readOnly: false)
        #expect(image.size == 64 * UInt64(mib))
        #expect(!image.isReadOnly)
        #expect(!image.isBlockDevice)
        #expect(image.path == path)
        try image.write([1, 2, 3], at: 10)

        // A second call (even with another size) leaves the file alone.
        #expect(try RawImage.createSparseFileIfMissing(path: path, size: 4096) == false)
        #expect(try FileManager.default.attributesOfItem(atPath: path)[.size] as? UInt64 == 64 * UInt64(mib))
        #expect(try fileBytes(path, offset: 10, count: 3) == [1, 2, 3])
    }

    @Test("createSparseFileIfMissing in a missing directory fails with openFailed(ENOENT)")
    func createSparseMissingDirectory() throws {
        let directory = try TemporaryDirectory()
        let path = directory.file("no/such/dir/image.raw")
        #expect(throws: StorageError.openFailed(path: path, errno: ENOENT)) {
            try RawImage.createSparseFileIfMissing(path: path, size: 4096)
        }
    }

    @Test("written bytes read back, at aligned and unaligned offsets, and land in the file")
    func roundTrip() throws {
        let directory = try TemporaryDirectory()
        let path = directory.file("image.raw")
        try RawImage.createSparseFileIfMissing(path: path, size: 4 * UInt64(mib))
        let image = try RawImage(path: path, readOnly: false)
        let cases: [(offset: UInt64, count: Int)] = [(0, 4096), (4097, 1000), (UInt64(mib) - 3, 7), (4 * UInt64(mib) - 512, 512)]
        for (index, testCase) in cases.enumerated() {
            let data = pattern(testCase.count, seed: UInt8(index))
            try image.write(data, at: testCase.offset)
            #expect(try image.readBytes(testCase.count, at: testCase.offset) == data)
            #expect(try fileBytes(path, offset: Int(testCase.offset), count: testCase.count) == data)
        }
        try image.flush()
        // Untouched regions still read as zeroes.
        #expect(try image.readBytes(512, at: 2 * UInt64(mib)) == [UInt8](repeating: 0, count: 512))
        // A second image on the same file sees the data.
        let other = try RawImage(path: path, readOnly: true)
        #expect(try other.readBytes(7, at: UInt64(mib) - 3) == pattern(7, seed: 2))
    }

    @Test("reads past the end of the file are zero-filled")
    func readPastEOF() throws {
        let directory = try TemporaryDirectory()
        let path = directory.file("small.raw")
        let data = pattern(1000, seed: 9)
        try writeFile(path, data)
        let image = try RawImage(path: path, readOnly: true)
        #expect(image.size == 1000)
        let straddling = try image.readBytes(4096, at: 0)
        #expect(Array(straddling[0..<1000]) == data)
        #expect(straddling[1000...].allSatisfy { $0 == 0 })
        #expect(try image.readBytes(512, at: 2000) == [UInt8](repeating: 0, count: 512))
        #expect(try image.readBytes(10, at: 995) == Array(data[995...]) + [0, 0, 0, 0, 0])
    }

    @Test("readIfCached returns true and the data for a freshly written file")
    func readIfCached() throws {
        let directory = try TemporaryDirectory()
        let path = directory.file("image.raw")
        try RawImage.createSparseFileIfMissing(path: path, size: UInt64(mib))
        let image = try RawImage(path: path, readOnly: false)
        let data = pattern(64 << 10, seed: 4)
        try image.write(data, at: 128 << 10)
        var buffer = [UInt8](repeating: 0, count: data.count)
        let cached = buffer.withUnsafeMutableBytes { image.readIfCached(into: $0, at: 128 << 10) }
        #expect(cached)
        #expect(buffer == data)
        // An empty read trivially succeeds.
        var empty: [UInt8] = []
        #expect(empty.withUnsafeMutableBytes { image.readIfCached(into: $0, at: 0) })
    }

    @Test("readIfCached returns false rather than a short read past the end of the file")
    func readIfCachedPastEOF() throws {
        let directory = try TemporaryDirectory()
        let path = directory.file("small.raw")
        try writeFile(path, pattern(1000, seed: 1))
        let image = try RawImage(path: path, readOnly: true)
        var buffer = [UInt8](repeating: 0, count: 4096)
        #expect(buffer.withUnsafeMutableBytes { image.readIfCached(into: $0, at: 0) } == false)
    }

    @Test("writeIfNonBlocking writes a prefix the kernel accepts; the rest goes through write")
    func writeIfNonBlocking() throws {
        let directory = try TemporaryDirectory()
        let path = directory.file("image.raw")
        try RawImage.createSparseFileIfMissing(path: path, size: UInt64(mib))
        let image = try RawImage(path: path, readOnly: false)
        for (index, offset) in [UInt64(0), 4096, 777].enumerated() {
            let data = pattern(16 << 10, seed: UInt8(index))
            let written = data.withUnsafeBytes { image.writeIfNonBlocking($0, at: offset) }
            #expect((0...data.count).contains(written))
            #expect(try image.readBytes(written, at: offset) == Array(data[0..<written]))
            if written < data.count {
                try image.write(Array(data[written...]), at: offset + UInt64(written))
            }
            #expect(try fileBytes(path, offset: Int(offset), count: data.count) == data)
        }
    }

    @Test("a read-only image refuses every mutation with .readOnly")
    func readOnly() throws {
        let directory = try TemporaryDirectory()
        let path = directory.file("image.raw")
        try writeFile(path, pattern(8192, seed: 3))
        let image = try RawImage(path: path, readOnly: true)
        #expect(image.isReadOnly)
        #expect(throws: StorageError.readOnly) { try image.write([1, 2, 3], at: 0) }
        #expect(throws: StorageError.readOnly) { try image.discard(at: 0, length: 4096) }
        #expect(throws: StorageError.readOnly) { try image.writeZeroes(at: 0, length: 4096, allowHole: true, fastOnly: false) }
        #expect(throws: StorageError.readOnly) { try image.writeZeroes(at: 0, length: 4096, allowHole: false, fastOnly: true) }
        let data: [UInt8] = [9, 9, 9, 9]
        #expect(data.withUnsafeBytes { image.writeIfNonBlocking($0, at: 0) } == 0)
        #expect(try fileBytes(path, offset: 0, count: 8192) == pattern(8192, seed: 3))
        #expect(StorageError.readOnly.errno == EROFS)
    }

    @Test("discard punches a hole that reads as zeroes and shows in allocationExtents")
    func discard() throws {
        let directory = try TemporaryDirectory()
        let path = directory.file("image.raw")
        try writeFile(path, pattern(4 * mib, seed: 7))
        let image = try RawImage(path: path, readOnly: false)
        let before = try allocatedBlocks(path)
        try image.discard(at: UInt64(mib), length: UInt64(mib))
        try image.flush()
        #expect(try image.readBytes(mib, at: UInt64(mib)) == [UInt8](repeating: 0, count: mib))
        #expect(try image.readBytes(4096, at: 0) == Array(pattern(4 * mib, seed: 7)[0..<4096]))
        #expect(try allocatedBlocks(path) <= before - mib / 512)
        #expect(image.size == 4 * UInt64(mib))
        #expect(
            image.allocationExtents(at: 0, length: 4 * UInt64(mib), maxExtents: 100) == [
                AllocationExtent(length: UInt64(mib), isHole: false),
                AllocationExtent(length: UInt64(mib), isHole: true),
                AllocationExtent(length: 2 * UInt64(mib), isHole: false),
            ])
        // Discarding nothing is a no-op.
        try image.discard(at: 0, length: 0)
        #expect(try image.readBytes(16, at: 0) == Array(pattern(16, seed: 7)))
    }

    @Test("writeZeroes with allowHole false zeroes the range and keeps its blocks allocated")
    func writeZeroesKeepsAllocation() throws {
        let directory = try TemporaryDirectory()
        let path = directory.file("image.raw")
        try writeFile(path, pattern(2 * mib, seed: 5))
        let image = try RawImage(path: path, readOnly: false)
        let before = try allocatedBlocks(path)
        #expect(before >= 2 * mib / 512)
        try image.writeZeroes(at: 0, length: UInt64(mib), allowHole: false, fastOnly: false)
        try image.flush()
        #expect(try image.readBytes(mib, at: 0) == [UInt8](repeating: 0, count: mib))
        #expect(try fileBytes(path, offset: 0, count: 4096) == [UInt8](repeating: 0, count: 4096))
        #expect(try image.readBytes(4096, at: UInt64(mib)) == Array(pattern(2 * mib, seed: 5)[mib..<(mib + 4096)]))
        #expect(try allocatedBlocks(path) >= before)
    }

    @Test("writeZeroes with allowHole true zeroes the range and may free it")
    func writeZeroesAllowHole() throws {
        let directory = try TemporaryDirectory()
        let path = directory.file("image.raw")
        try writeFile(path, pattern(2 * mib, seed: 6))
        let image = try RawImage(path: path, readOnly: false)
        let before = try allocatedBlocks(path)
        try image.writeZeroes(at: UInt64(mib), length: UInt64(mib), allowHole: true, fastOnly: true)
        try image.flush()
        #expect(try image.readBytes(mib, at: UInt64(mib)) == [UInt8](repeating: 0, count: mib))
        #expect(try image.readBytes(64, at: 0) == Array(pattern(64, seed: 6)))
        #expect(try allocatedBlocks(path) < before)
        #expect(image.size == 2 * UInt64(mib))
    }

    @Test("writeZeroes on an unaligned range zeroes exactly that range")
    func writeZeroesUnaligned() throws {
        let directory = try TemporaryDirectory()
        let path = directory.file("image.raw")
        let data = pattern(16384, seed: 8)
        try writeFile(path, data)
        let image = try RawImage(path: path, readOnly: false)
        for allowHole in [false, true] {
            try image.write(data, at: 0)
            try image.writeZeroes(at: 1000, length: 5000, allowHole: allowHole, fastOnly: false)
            let expected = Array(data[0..<1000]) + [UInt8](repeating: 0, count: 5000) + Array(data[6000...])
            #expect(try image.readBytes(16384, at: 0) == expected, "allowHole: \(allowHole)")
        }
    }

    @Test("allocationExtents reports a data/hole/data file, sub-ranges, the extent cap and trailing holes")
    func allocationExtents() throws {
        let directory = try TemporaryDirectory()
        let path = directory.file("image.raw")
        try RawImage.createSparseFileIfMissing(path: path, size: 4 * UInt64(mib))
        try writeFile(path, pattern(mib, seed: 1), at: 0)
        try writeFile(path, pattern(mib, seed: 2), at: 2 * mib)
        let image = try RawImage(path: path, readOnly: true)
        let m = UInt64(mib)
        #expect(
            image.allocationExtents(at: 0, length: 4 * m, maxExtents: 100) == [
                AllocationExtent(length: m, isHole: false), AllocationExtent(length: m, isHole: true),
                AllocationExtent(length: m, isHole: false), AllocationExtent(length: m, isHole: true),
            ])
        // A range starting and ending inside extents is clipped at both ends.
        #expect(
            image.allocationExtents(at: m / 2, length: 2 * m, maxExtents: 100) == [
                AllocationExtent(length: m / 2, isHole: false), AllocationExtent(length: m, isHole: true),
                AllocationExtent(length: m / 2, isHole: false),
            ])
        // Starting in a hole.
        #expect(
            image.allocationExtents(at: m + 4096, length: m, maxExtents: 100) == [
                AllocationExtent(length: m - 4096, isHole: true), AllocationExtent(length: 4096, isHole: false),
            ])
        // The cap stops early; the caller asks again from where it stopped.
        #expect(image.allocationExtents(at: 0, length: 4 * m, maxExtents: 1) == [AllocationExtent(length: m, isHole: false)])
        #expect(
            image.allocationExtents(at: 0, length: 4 * m, maxExtents: 2) == [
                AllocationExtent(length: m, isHole: false), AllocationExtent(length: m, isHole: true),
            ])
        // Ranges past the end are clipped to the size; a range at the end is empty.
        #expect(
            image.allocationExtents(at: 3 * m, length: 10 * m, maxExtents: 100) == [AllocationExtent(length: m, isHole: true)])
        #expect(image.allocationExtents(at: 4 * m, length: m, maxExtents: 100) == [])
        #expect(image.allocationExtents(at: 0, length: 0, maxExtents: 100) == [])
    }

    @Test("a wholly sparse file is one hole; a wholly written file is one data extent")
    func allocationExtremes() throws {
        let directory = try TemporaryDirectory()
        let sparse = directory.file("sparse.raw")
        try RawImage.createSparseFileIfMissing(path: sparse, size: 8 * UInt64(mib))
        let sparseImage = try RawImage(path: sparse, readOnly: true)
        #expect(
            sparseImage.allocationExtents(at: 0, length: 8 * UInt64(mib), maxExtents: 10) == [
                AllocationExtent(length: 8 * UInt64(mib), isHole: true)
            ])
        let full = directory.file("full.raw")
        try writeFile(full, pattern(2 * mib, seed: 3))
        let fullImage = try RawImage(path: full, readOnly: true)
        #expect(
            fullImage.allocationExtents(at: 4096, length: 2 * UInt64(mib), maxExtents: 10) == [
                AllocationExtent(length: 2 * UInt64(mib) - 4096, isHole: false)
            ])
    }

    @Test("extents written but not yet flushed are already reported as data")
    func allocationBeforeFlush() throws {
        let directory = try TemporaryDirectory()
        let path = directory.file("image.raw")
        try RawImage.createSparseFileIfMissing(path: path, size: 2 * UInt64(mib))
        let image = try RawImage(path: path, readOnly: false)
        try image.write(pattern(mib, seed: 4), at: UInt64(mib))
        #expect(
            image.allocationExtents(at: 0, length: 2 * UInt64(mib), maxExtents: 10) == [
                AllocationExtent(length: UInt64(mib), isHole: true), AllocationExtent(length: UInt64(mib), isHole: false),
            ])
    }

    @Test("opening a directory read-only fails with unsupportedFileType")
    func directoryReadOnly() throws {
        let directory = try TemporaryDirectory()
        #expect(throws: StorageError.unsupportedFileType(path: directory.path, kind: "a directory")) {
            try RawImage(path: directory.path, readOnly: true)
        }
    }

    @Test("opening a directory for writing is an unsupported file type too (the kernel's EISDIR)")
    func directoryWritable() throws {
        let directory = try TemporaryDirectory()
        #expect(throws: StorageError.unsupportedFileType(path: directory.path, kind: "a directory")) {
            try RawImage(path: directory.path, readOnly: false)
        }
    }

    @Test("a character device is an unsupported file type, read-only or writable")
    func characterDevice() {
        for readOnly in [true, false] {
            #expect(throws: StorageError.unsupportedFileType(path: "/dev/null", kind: "a character device")) {
                try RawImage(path: "/dev/null", readOnly: readOnly)
            }
        }
        #expect(
            StorageError.unsupportedFileType(path: "/dev/null", kind: "a character device").description
                == "'/dev/null' is a character device, not an image: export a regular file or a block device")
    }

    @Test("a FIFO is refused at once, without waiting for a writer, read-only or writable")
    func fifo() throws {
        let directory = try TemporaryDirectory()
        let path = directory.file("pipe")
        #expect(mkfifo(path, 0o600) == 0)
        for readOnly in [true, false] {
            let start = ContinuousClock.now
            #expect(throws: StorageError.unsupportedFileType(path: path, kind: "a FIFO (named pipe)")) {
                try RawImage(path: path, readOnly: readOnly)
            }
            #expect(ContinuousClock.now - start < .seconds(1))
        }
    }

    @Test("a regular file still reads and writes after the non-blocking open")
    func regularFileIsBlocking() throws {
        let directory = try TemporaryDirectory()
        let path = directory.file("image.raw")
        let fd = creat(path, 0o600)
        #expect(fd >= 0)
        close(fd)
        #expect(truncate(path, 1 << 20) == 0)
        let image = try RawImage(path: path, readOnly: false)
        try image.write(pattern(4096, seed: 9), at: 8192)
        #expect(try image.readBytes(4096, at: 8192) == pattern(4096, seed: 9))
    }

    @Test("a missing file fails with openFailed(ENOENT)")
    func missingFile() throws {
        let directory = try TemporaryDirectory()
        let path = directory.file("missing.raw")
        #expect(throws: StorageError.openFailed(path: path, errno: ENOENT)) {
            try RawImage(path: path, readOnly: false)
        }
        #expect(throws: StorageError.openFailed(path: path, errno: ENOENT)) {
            try RawImage(path: path, readOnly: true)
        }
        #expect(StorageError.openFailed(path: path, errno: ENOENT).errno == ENOENT)
    }

    @Test("errors map to the errno callers translate into protocol errors")
    func errnoMapping() {
        #expect(StorageError.ioFailed(operation: "pread", errno: EIO).errno == EIO)
        #expect(StorageError.unsupportedFileType(path: "x", kind: "a FIFO (named pipe)").errno == EINVAL)
        #expect(StorageError.outOfRange(offset: 1, length: 2, size: 0).errno == EINVAL)
        #expect(StorageError.notSupported(operation: "x").errno == EOPNOTSUPP)
        #expect(StorageError.readOnly.errno == EROFS)
    }
}

@Suite("RawImage: hostile ranges")
struct RawImageHostileRangeTests {
    @Test("allocationExtents with a range whose end overflows UInt64 returns nothing instead of trapping")
    func allocationExtentsOverflow() async {
        await #expect(processExitsWith: .success) {
            let directory = try TemporaryDirectory()
            let path = directory.file("image.raw")
            try RawImage.createSparseFileIfMissing(path: path, size: 1 << 20)
            let image = try RawImage(path: path, readOnly: true)
            // Past the end: nothing to describe, whatever the length.
            let extents = image.allocationExtents(at: UInt64.max - 10, length: 100, maxExtents: 10)
            guard extents.isEmpty else { exit(1) }
            // Inside the file with a huge length: clipped to the file.
            let clipped = image.allocationExtents(at: 4096, length: UInt64.max, maxExtents: 10)
            guard clipped == [AllocationExtent(length: (1 << 20) - 4096, isHole: true)] else { exit(2) }
        }
    }
}
