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

    /// The file's SHA-256, from coreutils' `sha256sum`.
    static func sha256(_ path: String) throws -> String {
        let result = try ExternalTool.check("sha256sum", [path], timeout: 60)
        guard let digest = result.stdout.split(separator: " ").first, digest.count == 64 else {
            throw HarnessError("unexpected sha256sum output: \(result.stdout)")
        }
        return String(digest)
    }

    /// The file's apparent size.
    static func size(_ path: String) throws -> Int {
        var info = stat()
        guard stat(path, &info) == 0 else {
            throw HarnessError("stat \(path) failed: errno \(errno)")
        }
        return Int(info.st_size)
    }

    /// A deterministic, offset-dependent byte pattern with no zero bytes, so a misplaced,
    /// stale or zeroed block shows up.
    ///
    /// Byte at position `p` is `(31·(p mod 256) + k) mod 255 + 1` with
    /// `k = 7·(p / 256) + p / 65536 + seed`: every 256-byte run differs from its neighbours,
    /// and different seeds give different bytes everywhere. Built from a table of 255
    /// precomputed rows so that even debug builds make tens of MiB quickly.
    static func pattern(count: Int, offset: Int, seed: UInt8 = 0) -> [UInt8] {
        [UInt8](unsafeUninitializedCapacity: count) { buffer, initialized in
            patternRows.withUnsafeBufferPointer { rows in
                var position = offset
                var written = 0
                while written < count {
                    let within = position & 255
                    let length = min(256 - within, count - written)
                    let row = ((position >> 8) &* 7 &+ (position >> 16) &+ Int(seed)) % 255
                    (buffer.baseAddress! + written).initialize(from: rows.baseAddress! + row * 256 + within, count: length)
                    written += length
                    position += length
                }
            }
            initialized = count
        }
    }

    /// Row `k` holds `(31·i + k) mod 255 + 1` for `i` in 0..<256.
    private static let patternRows: [UInt8] = {
        var rows = [UInt8](repeating: 0, count: 255 * 256)
        for row in 0..<255 {
            for index in 0..<256 {
                let value: Int = (index * 31 + row) % 255 + 1
                rows[row * 256 + index] = UInt8(value)
            }
        }
        return rows
    }()

    /// `count` copies of `byte`.
    static func constant(_ byte: UInt8, count: Int) -> [UInt8] {
        [UInt8](repeating: byte, count: count)
    }
}
