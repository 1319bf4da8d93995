import CLinuxIO
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A raw disk image: a regular file or a block device, addressed by byte offsets.
///
/// One open file descriptor serves every caller at once: `pread`/`pwrite` at explicit
/// offsets are thread-safe, so the server's event loops and its I/O pool share it without
/// locks. The type is immutable after opening, hence `Sendable`.
public final class RawImage: Sendable {
    /// The path the image was opened from.
    public let path: String
    /// Size in bytes: the file's size, or the block device's capacity.
    public let size: UInt64
    /// True when the image refused writes at open time.
    public let isReadOnly: Bool
    /// True for block devices (no SEEK_DATA/SEEK_HOLE, size from BLKGETSIZE64).
    public let isBlockDevice: Bool
    /// Internal, not private: `DeviceIdentity` asks the open device what it is.
    let fd: Int32
    /// Set once the kernel refuses RWF_NOWAIT writes on this file.
    private let nonBlockingWritesUnsupported = Atomic<Bool>(false)

    /// Opens an existing image.
    /// - Parameters:
    ///   - path: a regular file or a block device.
    ///   - readOnly: open with `O_RDONLY`; every mutating call then throws `.readOnly`.
    ///
    /// Opening never blocks: a FIFO opened for reading would wait for a writer (stalling
    /// the control thread that runs `block-export-add`), and a device may wait for
    /// carrier. So the file is opened with `O_NONBLOCK`, checked with `fstat`, and only a
    /// regular file or block device gets its descriptor switched back to blocking I/O.
    /// - Throws: `.unsupportedFileType` for anything else (FIFO, socket, character
    ///   device, directory), `.openFailed` when the kernel refuses the open.
    public init(path: String, readOnly: Bool) throws(StorageError) {
        let flags = (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC | O_NONBLOCK
        let fd = Glibc.open(path, flags)
        guard fd >= 0 else {
            let code = Glibc.errno
            if code == EISDIR { throw .unsupportedFileType(path: path, kind: "a directory") }
            throw .openFailed(path: path, errno: code)
        }
        var info = stat()
        guard fstat(fd, &info) == 0 else {
            let code = Glibc.errno
            close(fd)
            throw .openFailed(path: path, errno: code)
        }
        let kind = info.st_mode & S_IFMT
        guard kind == S_IFREG || kind == S_IFBLK else {
            close(fd)
            throw .unsupportedFileType(path: path, kind: Self.describe(fileType: kind))
        }
        let status = fcntl(fd, F_GETFL)
        guard status >= 0, fcntl(fd, F_SETFL, status & ~O_NONBLOCK) == 0 else {
            let code = Glibc.errno
            close(fd)
            throw .openFailed(path: path, errno: code)
        }
        // Reads leave the access time alone: updating it is a timestamp read and an
        // inode check on every 4 KiB read (1.4% of the server's CPU at QD32). Only the
        // owner (or CAP_FOWNER) may ask; for anyone else the image is served all the same.
        _ = clinuxio_set_noatime(fd)
        if kind == S_IFBLK {
            var bytes: UInt64 = 0
            guard clinuxio_block_device_size(fd, &bytes) == 0 else {
                let code = Glibc.errno
                close(fd)
                throw .openFailed(path: path, errno: code)
            }
            self.size = bytes
            self.isBlockDevice = true
        } else if kind == S_IFREG {
            self.size = UInt64(max(0, info.st_size))
            self.isBlockDevice = false
        } else {
            close(fd)
            throw .unsupportedFileType(path: path, kind: Self.describe(fileType: kind))
        }
        self.fd = fd
        self.path = path
        self.isReadOnly = readOnly
    }

    /// What a file that is not an image is, for error messages.
    static func describe(fileType kind: mode_t) -> String {
        switch kind {
        case S_IFIFO: return "a FIFO (named pipe)"
        case S_IFCHR: return "a character device"
        case S_IFDIR: return "a directory"
        case S_IFSOCK: return "a socket"
        case S_IFLNK: return "a symbolic link"
        default: return "not a regular file"
        }
    }

    /// Creates a sparse regular file of `size` bytes if nothing exists at `path`.
    /// - Returns: true when a file was created.
    @discardableResult
    public static func createSparseFileIfMissing(path: String, size: UInt64) throws(StorageError) -> Bool {
        let fd = Glibc.open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        if fd < 0 {
            let code = Glibc.errno
            if code == EEXIST { return false }
            throw .openFailed(path: path, errno: code)
        }
        defer { close(fd) }
        guard ftruncate(fd, off_t(size)) == 0 else { throw .ioFailed(operation: "ftruncate", errno: Glibc.errno) }
        return true
    }

    deinit {
        close(fd)
    }

    // MARK: - Reads

    /// Reads exactly `buffer.count` bytes at `offset`, blocking on disk I/O if needed.
    /// Bytes past the end of a file that shrank underneath us read as zeroes.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(StorageError) {
        try Self.checkRepresentable(offset, UInt64(buffer.count), size: size)
        guard let base = buffer.baseAddress else { return }
        guard clinuxio_pread_full(fd, base, buffer.count, off_t(offset)) == 0 else {
            throw .ioFailed(operation: "pread", errno: Glibc.errno)
        }
    }

    /// Reads from the page cache only, never waiting for the disk.
    /// - Returns: true when the whole range was read; false when any of it would block
    ///   (the caller then repeats the read with `read(into:at:)` off the event loop).
    public func readIfCached(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Bool {
        guard let base = buffer.baseAddress else { return true }
        // Unrepresentable offsets are left to the blocking read, which reports them.
        guard (try? Self.checkRepresentable(offset, UInt64(buffer.count), size: size)) != nil else { return false }
        let n = clinuxio_pread_nowait(fd, base, buffer.count, off_t(offset))
        return n == buffer.count
    }

    // MARK: - Writes

    /// Writes all of `bytes` at `offset`.
    public func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws(StorageError) {
        guard !isReadOnly else { throw .readOnly }
        try Self.checkRepresentable(offset, UInt64(bytes.count), size: size)
        guard let base = bytes.baseAddress else { return }
        guard clinuxio_pwrite_all(fd, base, bytes.count, off_t(offset)) == 0 else {
            throw .ioFailed(operation: "pwrite", errno: Glibc.errno)
        }
    }

    /// Writes what the kernel accepts without blocking (`pwritev2(RWF_NOWAIT)`), so an
    /// event loop can write into the page cache inline and hand only the rest to a pool.
    /// File systems without non-blocking buffered writes get a plain `pwrite`, which into
    /// the page cache does not wait for the disk either.
    /// - Returns: bytes written (possibly 0); the caller writes the rest with `write(_:at:)`.
    public func writeIfNonBlocking(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) -> Int {
        guard !isReadOnly, let base = bytes.baseAddress,
            (try? Self.checkRepresentable(offset, UInt64(bytes.count), size: size)) != nil
        else { return 0 }
        if nonBlockingWritesUnsupported.load(ordering: .relaxed) {
            let n = pwrite(fd, base, bytes.count, off_t(offset))
            return max(n, 0)
        }
        let n = clinuxio_pwrite_nowait(fd, base, bytes.count, off_t(offset))
        if n >= 0 { return n }
        if Glibc.errno == EOPNOTSUPP || Glibc.errno == EINVAL {
            nonBlockingWritesUnsupported.store(true, ordering: .relaxed)
            return max(pwrite(fd, base, bytes.count, off_t(offset)), 0)
        }
        return 0
    }

    /// Starts the kernel's writeback of a freshly written range without waiting for it
    /// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), for writes that stream data in.
    ///
    /// Why: left alone, the kernel writes dirty pages back only when gigabytes pile up or
    /// after 30 s, so the FLUSH at the end of a copy (or the flush when the server stops)
    /// waits for all of it. Writing back as the copy goes overlaps the disk with the
    /// network: a 1 GiB nbdcopy into a captive `tidemark serve` took 0.87–1.37 s instead
    /// of 1.6–2.7 s (6 rounds). Starting writeback of the whole file every 8 MiB instead
    /// was slower (1.86–2.03 s). Advisory: errors are left to `flush`.
    public func startWriteback(at offset: UInt64, length: UInt64) {
        _ = clinuxio_start_writeback(fd, offset, length)
    }

    /// Makes every completed write durable (`fdatasync`).
    public func flush() throws(StorageError) {
        guard fdatasync(fd) == 0 else { throw .ioFailed(operation: "fdatasync", errno: Glibc.errno) }
    }

    /// Discards a range: the data is gone and the space is returned where the file system
    /// can (a hole in a file, a discard on a device). Reads afterwards return zeroes.
    public func discard(at offset: UInt64, length: UInt64) throws(StorageError) {
        guard !isReadOnly else { throw .readOnly }
        guard length > 0 else { return }
        try Self.checkRepresentable(offset, length, size: size)
        if clinuxio_punch_hole(fd, off_t(offset), off_t(length)) == 0 { return }
        let code = Glibc.errno
        if code == EOPNOTSUPP || code == ENOSYS {
            throw .notSupported(operation: "punching a hole")
        }
        throw .ioFailed(operation: "fallocate(PUNCH_HOLE)", errno: code)
    }

    /// Makes a range read as zeroes.
    /// - Parameters:
    ///   - allowHole: the range may become a hole (sparse); false keeps it allocated.
    ///   - fastOnly: fail with `.notSupported` rather than write zero buffers.
    public func writeZeroes(at offset: UInt64, length: UInt64, allowHole: Bool, fastOnly: Bool) throws(StorageError) {
        guard !isReadOnly else { throw .readOnly }
        guard length > 0 else { return }
        try Self.checkRepresentable(offset, length, size: size)
        if allowHole {
            if clinuxio_punch_hole(fd, off_t(offset), off_t(length)) == 0 { return }
            let code = Glibc.errno
            if code != EOPNOTSUPP && code != ENOSYS && code != EINVAL {
                throw .ioFailed(operation: "fallocate(PUNCH_HOLE)", errno: code)
            }
        }
        if clinuxio_zero_range(fd, off_t(offset), off_t(length)) == 0 { return }
        let code = Glibc.errno
        if code != EOPNOTSUPP && code != ENOSYS && code != EINVAL {
            throw .ioFailed(operation: "fallocate(ZERO_RANGE)", errno: code)
        }
        if fastOnly { throw .notSupported(operation: "fast zeroing") }
        try writeZeroBuffers(at: offset, length: length)
    }

    private func writeZeroBuffers(at offset: UInt64, length: UInt64) throws(StorageError) {
        let chunk = Int(min(length, 1 << 20))
        let zeroes = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { zeroes.deallocate() }
        zeroes.initializeMemory(as: UInt8.self, repeating: 0)
        var done: UInt64 = 0
        while done < length {
            let n = Int(min(UInt64(chunk), length - done))
            try write(UnsafeRawBufferPointer(rebasing: zeroes[0..<n]), at: offset + done)
            done += UInt64(n)
        }
    }

    /// Copies `[offset, offset+length)` of this image to the same offsets of `destination`
    /// inside the kernel (`copy_file_range`: no trip through user memory, a reflink where
    /// the file system shares blocks). Falls back to reads and writes where the kernel
    /// cannot copy between the two files.
    public func copyRange(at offset: UInt64, length: UInt64, to destination: RawImage) throws(StorageError) {
        guard !destination.isReadOnly else { throw .readOnly }
        try Self.checkRepresentable(offset, length, size: size)
        var done: UInt64 = 0
        while done < length {
            let chunk = Int(min(length - done, 1 << 30))
            let n = clinuxio_copy_range(fd, destination.fd, off_t(offset + done), chunk)
            if n > 0 {
                done += UInt64(n)
                continue
            }
            if n < 0 && Glibc.errno == EINTR { continue }
            let code = n < 0 ? Glibc.errno : 0
            guard n == 0 || [EXDEV, EINVAL, ENOSYS, EOPNOTSUPP].contains(code) else {
                throw .ioFailed(operation: "copy_file_range", errno: code)
            }
            // Past the end of a file that shrank, or no in-kernel copy here: copy through memory.
            try copyThroughMemory(at: offset + done, length: length - done, to: destination)
            return
        }
    }

    private func copyThroughMemory(at offset: UInt64, length: UInt64, to destination: RawImage) throws(StorageError) {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(min(length, 1 << 20)), alignment: 4096)
        defer { buffer.deallocate() }
        var done: UInt64 = 0
        while done < length {
            let part = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<Int(min(UInt64(buffer.count), length - done))])
            try read(into: part, at: offset + done)
            try destination.write(UnsafeRawBufferPointer(part), at: offset + done)
            done += UInt64(part.count)
        }
    }

    /// Bytes the file occupies on disk, which for a sparse file is what was written.
    public var allocatedBytes: UInt64 {
        var info = stat()
        guard fstat(fd, &info) == 0 else { return 0 }
        return UInt64(max(0, info.st_blocks)) * 512
    }

    /// Asks the kernel to start reading a range into the page cache (advisory).
    public func prefetch(at offset: UInt64, length: UInt64) {
        guard (try? Self.checkRepresentable(offset, length, size: size)) != nil else { return }
        _ = clinuxio_fadvise_willneed(fd, off_t(offset), off_t(length))
    }

    /// Ranges must fit in `off_t` for the kernel calls; anything else is refused rather
    /// than trapping on the conversion. (Ranges past the end are allowed here: files
    /// read as zeroes there and the protocol layer bounds requests by the size.)
    private static func checkRepresentable(_ offset: UInt64, _ length: UInt64, size: UInt64) throws(StorageError) {
        let (end, overflow) = offset.addingReportingOverflow(length)
        guard !overflow, end <= UInt64(Int64.max) else {
            throw .outOfRange(offset: offset, length: length, size: size)
        }
    }

    // MARK: - Allocation

    /// Describes which parts of `[offset, offset+length)` are data and which are holes.
    ///
    /// Uses `SEEK_DATA`/`SEEK_HOLE`; block devices and file systems without them report
    /// everything as data, which is always a safe answer.
    /// - Parameter maxExtents: stop after this many runs; the caller asks again for the rest.
    public func allocationExtents(at offset: UInt64, length: UInt64, maxExtents: Int) -> [AllocationExtent] {
        let (sum, overflow) = offset.addingReportingOverflow(length)
        let end = overflow ? size : min(sum, size)
        guard offset < end else { return [] }
        if isBlockDevice { return [AllocationExtent(length: end - offset, isHole: false)] }
        var extents: [AllocationExtent] = []
        var position = offset
        while position < end && extents.count < maxExtents {
            let data = clinuxio_seek_data(fd, off_t(position))
            if data < 0 {
                if Glibc.errno == ENXIO {
                    // No data from here to EOF (or the file shrank): the rest is a hole.
                    extents.append(AllocationExtent(length: end - position, isHole: true))
                } else {
                    extents.append(AllocationExtent(length: end - position, isHole: false))
                }
                break
            }
            let dataStart = UInt64(data)
            if dataStart > position {
                let holeEnd = min(dataStart, end)
                extents.append(AllocationExtent(length: holeEnd - position, isHole: true))
                position = holeEnd
                continue
            }
            let hole = clinuxio_seek_hole(fd, off_t(position))
            let holeStart = hole < 0 ? end : min(UInt64(hole), end)
            let dataEnd = max(holeStart, position + 1)
            extents.append(AllocationExtent(length: min(dataEnd, end) - position, isHole: false))
            position = min(dataEnd, end)
        }
        return extents
    }
}
