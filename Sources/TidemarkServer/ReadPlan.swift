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

    /// Appends the reply to `buffer`.
    /// - Parameter blocking: false to read only what the page cache holds.
    /// - Returns: false when a non-blocking read would have blocked; `buffer` is then as
    ///   it was, and the caller runs the plan again with `blocking: true` off the loop.
    func encode(into buffer: inout ByteBuffer, image: some ImageReader, blocking: Bool) -> Bool {
        let start = buffer.writerIndex
        if length == 0 {
            if structured {
                NBDReplyEncoder.writeChunkHeader(cookie: cookie, type: NBDChunkType.none, done: true, length: 0, into: &buffer)
            } else {
                NBDReplyEncoder.writeSimpleReply(cookie: cookie, error: 0, into: &buffer)
            }
            return true
        }
        let outcome: ReadOutcome
        if let holes, holes.contains(where: \.isHole) {
            outcome = encodeSparse(holes, into: &buffer, image: image, blocking: blocking)
        } else {
            buffer.reserveCapacity(minimumWritableBytes: NBDReplyEncoder.offsetDataHeaderSize + Int(length))
            if structured {
                NBDReplyEncoder.writeOffsetDataHeader(cookie: cookie, offset: offset, length: length, done: true, into: &buffer)
            } else {
                NBDReplyEncoder.writeSimpleReply(cookie: cookie, error: 0, into: &buffer)
            }
            outcome = readData(into: &buffer, count: Int(length), at: offset, image: image, blocking: blocking)
        }
        switch outcome {
        case .success:
            return true
        case .wouldBlock:
            buffer.moveWriterIndex(to: start)
            return false
        case .failure(let error):
            buffer.moveWriterIndex(to: start)
            NBDReplyEncoder.writeError(
                cookie: cookie, command: NBDCommandType.read.rawValue,
                error: CommandExecutor.nbdError(for: error, command: .read),
                message: error.description, structured: structured, into: &buffer)
            return true
        }
    }

    /// Bytes the reply needs, to size its buffer in one allocation.
    var replyCapacity: Int { Int(length) + NBDReplyEncoder.offsetDataHeaderSize * ((holes?.count ?? 0) + 1) }

    private enum ReadOutcome {
        case success
        case wouldBlock
        case failure(StorageError)
    }

    private func readData(
        into buffer: inout ByteBuffer, count: Int, at position: UInt64, image: some ImageReader, blocking: Bool
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
        _ extents: [AllocationExtent], into buffer: inout ByteBuffer, image: some ImageReader, blocking: Bool
    ) -> ReadOutcome {
        buffer.reserveCapacity(minimumWritableBytes: replyCapacity)
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
                let outcome = readData(into: &buffer, count: Int(runLength), at: position, image: image, blocking: blocking)
                guard case .success = outcome else { return outcome }
            }
            position += UInt64(runLength)
        }
        return .success
    }
}
