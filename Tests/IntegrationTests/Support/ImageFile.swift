import Foundation

/// Creates and inspects the raw image files the server exports.
///
/// Tests check results on the file itself, not only through the server, so that a bug that
/// is symmetric in the server's read and write paths cannot hide.
enum ImageFile {
    /// Creates a sparse file of `size` bytes (all holes).
    static func createSparse(_ path: String, size: Int) throws {
        guard FileManager.default.createFile(atPath: path, contents: nil) else {
            throw HarnessError("cannot create \(path)")
        }
        guard truncate(path, off_t(size)) == 0 else {
            throw HarnessError("truncate \(path) to \(size) failed: errno \(errno)")
        }
    }

    /// Creates a fully allocated file of `size` bytes with a position-dependent pattern.
    static func createFilled(_ path: String, size: Int, seed: UInt8 = 0) throws {
        try write(path, bytes: pattern(count: size, offset: 0, seed: seed))
    }

    /// Replaces the file's content with `bytes`.
    static func write(_ path: String, bytes: [UInt8]) throws {
        guard FileManager.default.createFile(atPath: path, contents: Data(bytes)) else {
            throw HarnessError("cannot write \(path)")
        }
    }

    /// The whole file.
    static func read(_ path: String) throws -> [UInt8] {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw HarnessError("cannot read \(path)")
        }
        return [UInt8](data)
    }

    /// `count` bytes at `offset`.
    static func read(_ path: String, offset: Int, count: Int) throws -> [UInt8] {
        guard let handle = FileHandle(forReadingAtPath: path) else {
            throw HarnessError("cannot open \(path)")
        }
        defer { try? handle.close() }
        try handle.seek(toOffset: UInt64(offset))
        return [UInt8](try handle.read(upToCount: count) ?? Data())
    }

    /// Bytes actually allocated on disk (`st_blocks` × 512).
    static func allocatedBytes(_ path: String) throws -> Int {
        var info = stat()
        guard stat(path, &info) == 0 else {
            throw HarnessError("stat \(path) failed: errno \(errno)")
        }
        return Int(info.st_blocks) * 512
    }

    /// The file's apparent size.
    static func size(_ path: String) throws -> Int {
        var info = stat()
        guard stat(path, &info) == 0 else {
            throw HarnessError("stat \(path) failed: errno \(errno)")
        }
        return Int(info.st_size)
    }

    /// A deterministic, offset-dependent byte pattern: any misplaced or stale block shows up.
    static func pattern(count: Int, offset: Int, seed: UInt8 = 0) -> [UInt8] {
        [UInt8](unsafeUninitializedCapacity: count) { buffer, initialized in
            for index in 0..<count {
                let position = offset + index
                // Mixes the 4 KiB block number into the byte so equal offsets within
                // different blocks differ.
                buffer[index] = UInt8(truncatingIfNeeded: position &* 31 &+ (position >> 12) &+ Int(seed)) | 1
            }
            initialized = count
        }
    }

    /// `count` copies of `byte`.
    static func constant(_ byte: UInt8, count: Int) -> [UInt8] {
        [UInt8](repeating: byte, count: count)
    }
}
