import BlockStorage
import NBDProtocol
import NIOCore

/// Produces the reply to one READ from an image: the wire shape is ``NBDReadReply``'s,
/// the bytes come from the image straight into the reply buffer.
///
/// The same plan runs twice at most: first on the event loop reading only from the page
/// cache, and, if that would block, on the I/O pool with blocking reads. It is a value of
/// `Sendable` parts so it can cross to the pool.
struct ReadPlan: Sendable {
    let reply: NBDReadReply
    /// The allocation map of the range when holes may be sent as OFFSET_HOLE chunks.
    let holes: [AllocationExtent]?

    init(
        cookie: UInt64, offset: UInt64, length: UInt32, structured: Bool, framing: NBDFraming = .compact,
        holes: [AllocationExtent]?
    ) {
        self.reply = NBDReadReply(cookie: cookie, offset: offset, length: length, structured: structured, framing: framing)
        self.holes = holes
    }

    /// Appends the reply to `buffer`.
    /// - Parameter blocking: false to read only what the page cache holds.
    /// - Returns: false when a non-blocking read would have blocked; `buffer` is then as
    ///   it was, and the caller runs the plan again with `blocking: true` off the loop.
    func encode(into buffer: inout ByteBuffer, image: some ImageReader, blocking: Bool) -> Bool {
        let start = buffer.writerIndex
        var failure: StorageError?
        let complete = reply.write(runs: holes?.lazy.map { (length: $0.length, isHole: $0.isHole) }, into: &buffer) {
            buffer, count, position in
            var appended = false
            buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: count) { raw in
                let target = UnsafeMutableRawBufferPointer(rebasing: raw[0..<count])
                if blocking {
                    do throws(StorageError) {
                        try image.read(into: target, at: position)
                    } catch {
                        failure = error
                        return 0
                    }
                } else if !image.readIfCached(into: target, at: position) {
                    return 0
                }
                appended = true
                return count
            }
            return appended
        }
        if complete { return true }
        buffer.moveWriterIndex(to: start)
        guard let failure else { return false }
        reply.writeError(NBDError(storageError: failure, command: .read), message: failure.description, into: &buffer)
        return true
    }

    /// Bytes the reply needs, to size its buffer in one allocation.
    var replyCapacity: Int { reply.capacity(runs: holes?.count ?? 0) }
}
