import CLinuxIO

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A POSIX file descriptor with positioned I/O that reports failures as ``BackupError``.
///
/// Foundation's FileHandle hides errno (so "disk full" could not be told from other
/// failures) and has no positioned writes; several connections write different clusters of
/// one backup file at once, so `pwrite` at explicit offsets is what the writer needs.
public final class BackupFile: @unchecked Sendable {
    /// The descriptor; closed in `deinit` or by ``close()``.
    public private(set) var descriptor: Int32
    public let path: String

    /// Opens `path` with `flags` (`O_RDONLY`, `O_RDWR | O_CREAT | O_TRUNC`, …).
    public init(path: String, flags: Int32, mode: mode_t = 0o644) throws(BackupError) {
        let fd = open(path, flags | O_CLOEXEC, mode)
        guard fd >= 0 else { throw Self.failure(path, "open", errno) }
        descriptor = fd
        self.path = path
    }

    deinit { close() }

    /// Closes the descriptor (idempotent).
    public func close() {
        if descriptor >= 0 {
            _ = Glibc.close(descriptor)
            descriptor = -1
        }
    }

    /// Writes all of `bytes` at `offset`.
    public func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws(BackupError) {
        guard let base = bytes.baseAddress else { return }
        guard let position = off_t(exactly: offset) else { throw Self.failure(path, "write", EINVAL) }
        // A write that makes no progress fails with ENOSPC: disk full.
        guard clinuxio_pwrite_all(descriptor, base, bytes.count, position) == 0 else {
            throw Self.failure(path, "write", errno)
        }
    }

    /// Writes an array at `offset`.
    public func write(_ bytes: [UInt8], at offset: UInt64) throws(BackupError) {
        var failure: BackupError?
        bytes.withUnsafeBytes { raw in
            do throws(BackupError) { try write(raw, at: offset) } catch { failure = error }
        }
        if let failure { throw failure }
    }

    /// Fills `buffer` from `offset`; bytes past the end of the file read as zeroes.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(BackupError) {
        guard let base = buffer.baseAddress else { return }
        // An offset read from a damaged file may not fit off_t: refuse it, do not trap.
        guard let position = off_t(exactly: offset), !position.addingReportingOverflow(off_t(buffer.count)).overflow else {
            throw Self.failure(path, "read", EINVAL)
        }
        guard clinuxio_pread_full(descriptor, base, buffer.count, position) == 0 else {
            throw Self.failure(path, "read", errno)
        }
    }

    /// `count` bytes at `offset`.
    public func read(count: Int, at offset: UInt64) throws(BackupError) -> [UInt8] {
        var failure: BackupError?
        let bytes = [UInt8](unsafeUninitializedCapacity: count) { buffer, initialized in
            do throws(BackupError) {
                try read(into: UnsafeMutableRawBufferPointer(buffer), at: offset)
            } catch {
                failure = error
                buffer.initialize(repeating: 0)
            }
            initialized = count
        }
        if let failure { throw failure }
        return bytes
    }

    /// Sets the file's length.
    public func truncate(to length: UInt64) throws(BackupError) {
        if ftruncate(descriptor, off_t(length)) != 0 { throw Self.failure(path, "truncate", errno) }
    }

    /// The file's length.
    public func length() throws(BackupError) -> UInt64 {
        var info = stat()
        if fstat(descriptor, &info) != 0 { throw Self.failure(path, "stat", errno) }
        return UInt64(info.st_size)
    }

    /// Makes everything written durable.
    public func sync() throws(BackupError) {
        if fsync(descriptor) != 0 { throw Self.failure(path, "fsync", errno) }
    }

    /// Maps ENOSPC and EDQUOT to ``BackupError/diskFull(path:)``, the rest to
    /// ``BackupError/fileSystem(path:operation:errno:)``.
    package static func failure(_ path: String, _ operation: String, _ code: Int32) -> BackupError {
        if code == ENOSPC || code == EDQUOT { return .diskFull(path: path) }
        return .fileSystem(path: path, operation: operation, errno: code)
    }

    /// fsyncs a directory so that renames and unlinks in it are durable.
    package static func syncDirectory(_ path: String) throws(BackupError) {
        let directory = try BackupFile(path: path, flags: O_RDONLY | O_DIRECTORY)
        try directory.sync()
    }
}
