/// What serving reads needs from an image: data, page-cache-only data and allocation.
///
/// Both a live image and a point-in-time view of one answer reads, so the server's read
/// path is written once, generic over this protocol (no existential on the data path).
public protocol ImageReader: Sendable {
    /// Size in bytes.
    var size: UInt64 { get }
    /// Reads exactly `buffer.count` bytes at `offset`, blocking on disk I/O if needed.
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(StorageError)
    /// Reads without waiting for the disk; false when any of the range would block.
    func readIfCached(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Bool
    /// Data and hole runs of `[offset, offset+length)`, at most `maxExtents` of them.
    func allocationExtents(at offset: UInt64, length: UInt64, maxExtents: Int) -> [AllocationExtent]
    /// Starts reading a range into the page cache (advisory).
    func prefetch(at offset: UInt64, length: UInt64)
}

extension RawImage: ImageReader {}
