import BlockStorage
import NBDProtocol
import NIOCore

/// Encodes the reply to one READ, header and data in a single buffer.
///
/// The same plan runs twice at most: first on the event loop reading only from the page
/// cache, and, if that would block, on the I/O pool with blocking reads. It is a value of
/// `Sendable` parts so it can cross to the pool.
struct ReadPlan: Sendable {
    let cookie: UInt64
    let offset: UInt64
    let length: UInt32
    let structured: Bool
    /// The allocation map of the range when holes may be sent as OFFSET_HOLE chunks.
    let holes: [AllocationExtent]?

    /// - Parameter blocking: false to read only what the page cache holds.
    /// - Returns: the reply, or nil when a non-blocking read would have blocked.
    func encode(image: RawImage, allocator: ByteBufferAllocator, blocking: Bool) -> ByteBuffer? {
        if length == 0 {
            var buffer = allocator.buffer(capacity: 20)
            if structured {
                NBDReplyEncoder.writeChunkHeader(cookie: cookie, type: NBDChunkType.none, done: true, length: 0, into: &buffer)
            } else {
                NBDReplyEncoder.writeSimpleReply(cookie: cookie, error: 0, into: &buffer)
            }
            return buffer
        }
        if let holes, holes.contains(where: \.isHole) {
            return encodeSparse(holes, image: image, allocator: allocator, blocking: blocking)
        }
        let headerSize = structured ? NBDReplyEncoder.offsetDataHeaderSize : NBDReplyEncoder.simpleHeaderSize
        var buffer = allocator.buffer(capacity: headerSize + Int(length))
        if structured {
            NBDReplyEncoder.writeOffsetDataHeader(cookie: cookie, offset: offset, length: length, done: true, into: &buffer)
        } else {
            NBDReplyEncoder.writeSimpleReply(cookie: cookie, error: 0, into: &buffer)
        }
        switch readData(into: &buffer, count: Int(length), at: offset, image: image, blocking: blocking) {
        case .success: return buffer
        case .wouldBlock: return nil
        case .failure(let error): return errorReply(error, allocator: allocator)
        }
    }

    private enum ReadOutcome {
        case success
        case wouldBlock
        case failure(StorageError)
    }

    private func readData(
        into buffer: inout ByteBuffer, count: Int, at position: UInt64, image: RawImage, blocking: Bool
    ) -> ReadOutcome {
        var outcome = ReadOutcome.success
        buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: count) { raw in
            let target = UnsafeMutableRawBufferPointer(rebasing: raw[0..<count])
            if blocking {
                do throws(StorageError) {
                    try image.read(into: target, at: position)
                } catch {
                    outcome = .failure(error)
                    return 0
                }
                return count
            }
            guard image.readIfCached(into: target, at: position) else {
                outcome = .wouldBlock
                return 0
            }
            return count
        }
        return outcome
    }

    /// OFFSET_DATA chunks for data and OFFSET_HOLE chunks for holes, DONE on the last.
    private func encodeSparse(
        _ extents: [AllocationExtent], image: RawImage, allocator: ByteBufferAllocator, blocking: Bool
    ) -> ByteBuffer? {
        let dataBytes = extents.lazy.filter { !$0.isHole }.reduce(0) { $0 + Int($1.length) }
        var buffer = allocator.buffer(capacity: dataBytes + 28 * (extents.count + 1))
        var position = offset
        let end = offset + UInt64(length)
        var index = 0
        while position < end {
            // Extents may stop short of the end (capped lookup): the rest is sent as data.
            let extent = index < extents.count ? extents[index] : AllocationExtent(length: end - position, isHole: false)
            index += 1
            let runLength = UInt32(min(extent.length, end - position))
            guard runLength > 0 else { continue }
            let isLast = position + UInt64(runLength) == end
            if extent.isHole {
                NBDReplyEncoder.writeOffsetHole(cookie: cookie, offset: position, length: runLength, done: isLast, into: &buffer)
            } else {
                NBDReplyEncoder.writeOffsetDataHeader(
                    cookie: cookie, offset: position, length: runLength, done: isLast, into: &buffer)
                switch readData(into: &buffer, count: Int(runLength), at: position, image: image, blocking: blocking) {
                case .success: break
                case .wouldBlock: return nil
                case .failure(let error): return errorReply(error, allocator: allocator)
                }
            }
            position += UInt64(runLength)
        }
        return buffer
    }

    private func errorReply(_ error: StorageError, allocator: ByteBufferAllocator) -> ByteBuffer {
        var buffer = allocator.buffer(capacity: 64)
        NBDReplyEncoder.writeError(
            cookie: cookie, command: NBDCommandType.read.rawValue,
            error: CommandExecutor.nbdError(for: error, command: .read),
            message: error.description, structured: structured, into: &buffer)
        return buffer
    }
}
