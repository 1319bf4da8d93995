import CLinuxIO

#if canImport(Glibc)
import Glibc
#endif

/// The few POSIX file operations the bitmap store needs, with errors that name the file.
enum FileIO {
    static func describe(_ code: Int32) -> String { String(cString: strerror(code)) }

    /// The error for a failed system call on `path`: `.storeFull` for a full file system,
    /// `.storeIOFailed` otherwise.
    static func failure(_ path: String, _ what: String, _ code: Int32) -> BitmapError {
        let reason = "\(what): \(describe(code))"
        return code == ENOSPC || code == EDQUOT ? .storeFull(path: path, reason: reason) : .storeIOFailed(path: path, reason: reason)
    }

    /// Reads a whole file; nil when it does not exist.
    static func readFile(_ path: String) throws(BitmapError) -> [UInt8]? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        if fd < 0 {
            if errno == ENOENT { return nil }
            throw .storeIOFailed(path: path, reason: "cannot open: \(describe(errno))")
        }
        defer { close(fd) }
        var result: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                throw .storeIOFailed(path: path, reason: "cannot read: \(describe(errno))")
            }
            if n == 0 { break }
            result.append(contentsOf: chunk[0..<n])
        }
        return result
    }

    /// Writes `bytes` to `path` atomically: a temporary file, fsync, rename, fsync of the
    /// directory. Readers see the old file or the new one, never a mix.
    static func writeAtomically(_ bytes: [UInt8], to path: String, directory: String) throws(BitmapError) {
        var renamed = false
        try writeAtomically(bytes, to: path, directory: directory, renamed: &renamed)
    }

    /// As `writeAtomically(_:to:directory:)`; `renamed` tells, on failure, whether the new
    /// file already replaced the old one (only the directory fsync failed).
    static func writeAtomically(_ bytes: [UInt8], to path: String, directory: String, renamed: inout Bool) throws(BitmapError) {
        let temporary = path + ".tmp"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw failure(temporary, "cannot create", errno) }
        do throws(BitmapError) {
            try writeAll(fd, bytes, path: temporary)
            guard fdatasync(fd) == 0 else { throw failure(temporary, "fsync", errno) }
        } catch {
            close(fd)
            unlink(temporary)
            throw error
        }
        close(fd)
        guard rename(temporary, path) == 0 else {
            let code = errno
            unlink(temporary)
            throw failure(path, "rename", code)
        }
        renamed = true
        try syncDirectory(directory)
    }

    static func writeAll(_ fd: Int32, _ bytes: [UInt8], path: String) throws(BitmapError) {
        guard bytes.withUnsafeBytes({ clinuxio_write_all(fd, $0.baseAddress, $0.count) }) == 0 else {
            throw failure(path, "write", errno)
        }
    }

    static func syncDirectory(_ directory: String) throws(BitmapError) {
        let fd = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw .storeIOFailed(path: directory, reason: "cannot open: \(describe(errno))") }
        defer { close(fd) }
        guard fsync(fd) == 0 else { throw failure(directory, "fsync", errno) }
    }

    /// Writes `bytes` at `offset` (positioned, so a failed append can simply be retried
    /// at the same place).
    static func writeAll(_ fd: Int32, _ bytes: [UInt8], at offset: UInt64, path: String) throws(BitmapError) {
        guard bytes.withUnsafeBytes({ clinuxio_pwrite_all(fd, $0.baseAddress, $0.count, off_t(offset)) }) == 0 else {
            throw failure(path, "write", errno)
        }
    }

    /// Names in a directory.
    static func listDirectory(_ directory: String) -> [String] {
        guard let handle = opendir(directory) else { return [] }
        defer { closedir(handle) }
        var names: [String] = []
        while let entry = readdir(handle) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names
    }

    static func encodeWords(_ words: [UInt64], into bytes: inout [UInt8]) {
        bytes.reserveCapacity(bytes.count + words.count * 8)
        for word in words {
            withUnsafeBytes(of: word.littleEndian) { bytes.append(contentsOf: $0) }
        }
    }

    static func decodeWords(_ bytes: ArraySlice<UInt8>) -> [UInt64] {
        var words: [UInt64] = []
        words.reserveCapacity(bytes.count / 8)
        var index = bytes.startIndex
        while index + 8 <= bytes.endIndex {
            var value: UInt64 = 0
            for shift in 0..<8 { value |= UInt64(bytes[index + shift]) << UInt64(shift * 8) }
            words.append(value)
            index += 8
        }
        return words
    }
}
