import CLinuxIO

#if canImport(Glibc)
import Glibc
#endif

/// Starts the kernel's writeback of freshly written file ranges right away
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), without waiting for it.
///
/// Why: a backup must be fsynced before it is renamed into place. Left alone, the kernel
/// starts writing back only when dirty pages pile up, so the final fsync of a 1 GiB backup
/// waits for most of the gigabyte (about 0.5 s here). Starting writeback as each range is
/// written overlaps the disk work with the copy, and the final fsync finds little left.
enum WritebackHint {
    /// Asks the kernel to start writing `length` bytes at `offset` of `descriptor` back.
    /// Advisory: failures are ignored (the final fsync reports real errors).
    static func start(descriptor: Int32, offset: UInt64, length: UInt64) {
        guard length > 0, offset <= UInt64(Int64.max), length <= UInt64(Int64.max) - offset else { return }
        _ = clinuxio_start_writeback(descriptor, off_t(offset), off_t(length))
    }
}
