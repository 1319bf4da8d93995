import BlockStorage
import NIOCore

/// Turns a modification's outcome (nil: success) into its reply, on the thread where the
/// modification finished. A value, not a closure, so a write that lands inline allocates
/// nothing for a reply it never builds this way.
protocol ModificationReply: Sendable {
    func encode(_ error: StorageError?) -> ByteBuffer
}
