import NIOCore

/// The wire shape of the reply to one READ: a simple reply, one OFFSET_DATA chunk, or
/// OFFSET_DATA and OFFSET_HOLE chunks along the range's holes, DONE on the last.
///
/// The caller supplies the data: `write` asks it to append each data run where the run's
/// header leaves room, so the bytes are read once, straight into the reply buffer.
public struct NBDReadReply: Sendable {
    public let cookie: UInt64
    public let offset: UInt64
    public let length: UInt32
    /// Structured replies were negotiated: data goes in chunks and holes may be sent.
    public let structured: Bool
    /// Compact or extended chunk headers (extended implies structured).
    public let framing: NBDFraming

    public init(cookie: UInt64, offset: UInt64, length: UInt32, structured: Bool, framing: NBDFraming = .compact) {
        self.cookie = cookie
        self.offset = offset
        self.length = length
        self.structured = structured || framing == .extended
        self.framing = framing
    }

    /// Bytes the reply takes at most when the range is cut into `runs` runs, so the
    /// caller sizes its buffer in one allocation.
    @inlinable
    public func capacity(runs: Int) -> Int {
        Int(length) + NBDReplyEncoder.offsetDataHeaderSize(framing) * (runs + 1)
    }

    /// Appends the reply to `buffer`.
    /// - Parameters:
    ///   - runs: the range's allocation from `offset` as (length, isHole) runs, or nil to
    ///     send it all as data. Runs past the end are ignored; a range they do not cover
    ///     is sent as data. Holes are sent only under structured replies.
    ///   - appendData: appends `count` bytes of the image at `position` to the buffer and
    ///     returns true, or returns false (having appended nothing) to stop.
    /// - Returns: false when `appendData` stopped; the buffer then holds a partial reply
    ///   the caller must cut off (``NBDReadReply`` writes no error on its behalf).
    /// Inlinable so the caller's closure and run type are specialized into the READ path.
    @inlinable
    public func write<Runs: Collection>(
        runs: Runs?, into buffer: inout ByteBuffer,
        appendData: (_ buffer: inout ByteBuffer, _ count: Int, _ position: UInt64) -> Bool
    ) -> Bool where Runs.Element == (length: UInt64, isHole: Bool) {
        if length == 0 {
            if structured {
                NBDReplyEncoder.writeChunkHeader(
                    cookie: cookie, type: NBDChunkType.none, done: true, length: 0, framing: framing, requestOffset: offset,
                    into: &buffer)
            } else {
                NBDReplyEncoder.writeSimpleReply(cookie: cookie, error: 0, into: &buffer)
            }
            return true
        }
        guard structured, let runs, runs.contains(where: \.isHole) else {
            buffer.reserveCapacity(minimumWritableBytes: NBDReplyEncoder.offsetDataHeaderSize(framing) + Int(length))
            if structured {
                NBDReplyEncoder.writeOffsetDataHeader(
                    cookie: cookie, offset: offset, length: length, done: true, framing: framing, requestOffset: offset,
                    into: &buffer)
            } else {
                NBDReplyEncoder.writeSimpleReply(cookie: cookie, error: 0, into: &buffer)
            }
            return appendData(&buffer, Int(length), offset)
        }
        buffer.reserveCapacity(minimumWritableBytes: capacity(runs: runs.count))
        let end = offset + UInt64(length)
        var position = offset
        var next = runs.startIndex
        while position < end {
            let run: (length: UInt64, isHole: Bool)
            if next != runs.endIndex {
                run = runs[next]
                next = runs.index(after: next)
            } else {
                run = (end - position, false)
            }
            let runLength = UInt32(min(run.length, end - position))
            guard runLength > 0 else { continue }
            let isLast = position + UInt64(runLength) == end
            if run.isHole {
                NBDReplyEncoder.writeOffsetHole(
                    cookie: cookie, offset: position, length: runLength, done: isLast, framing: framing,
                    requestOffset: offset, into: &buffer)
            } else {
                NBDReplyEncoder.writeOffsetDataHeader(
                    cookie: cookie, offset: position, length: runLength, done: isLast, framing: framing,
                    requestOffset: offset, into: &buffer)
                guard appendData(&buffer, Int(runLength), position) else { return false }
            }
            position += UInt64(runLength)
        }
        return true
    }

    /// Appends the error reply for this READ: an ERROR chunk under structured replies,
    /// a simple reply otherwise.
    public func writeError(_ error: NBDError, message: String, into buffer: inout ByteBuffer) {
        NBDReplyEncoder.writeError(
            cookie: cookie, command: NBDCommandType.read.rawValue, error: error, message: message,
            structured: structured, framing: framing, requestOffset: offset, into: &buffer)
    }
}
