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
///
/// Swift's Glibc module does not import `sync_file_range` (a GNU extension), so it is
/// looked up at run time; where it is missing this does nothing and fsync does it all.
enum WritebackHint {
    private typealias SyncFileRange = @convention(c) (Int32, Int64, Int64, UInt32) -> Int32
    private static let syncFileRangeWrite: UInt32 = 2

    nonisolated(unsafe) private static let function: SyncFileRange? = {
        guard let handle = dlopen(nil, RTLD_NOW), let symbol = dlsym(handle, "sync_file_range") else { return nil }
        return unsafeBitCast(symbol, to: SyncFileRange.self)
    }()

    /// Asks the kernel to start writing `length` bytes at `offset` of `descriptor` back.
    /// Advisory: failures are ignored (the final fsync reports real errors).
    static func start(descriptor: Int32, offset: UInt64, length: UInt64) {
        guard let function, length > 0 else { return }
        _ = function(descriptor, Int64(offset), Int64(length), syncFileRangeWrite)
    }
}
