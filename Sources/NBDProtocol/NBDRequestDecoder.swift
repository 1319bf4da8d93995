import NIOCore

/// Splits the transmission byte stream into requests.
///
/// WRITE payloads up to the advertised maximum come out as zero-copy slices of the input.
/// Larger ones, up to `NBDLimits.maximumDrainedPayload`, are consumed as they arrive
/// without being buffered, and the request is marked `payloadDiscarded` so it can be
/// refused with EINVAL while the stream stays in sync. Anything larger, or a bad magic,
/// ends the connection: the stream cannot be trusted after that.
public struct NBDRequestDecoder {
    /// What one decoding step produced.
    public enum Result {
        case request(NBDRequest)
        case needMoreData
        /// Unrecoverable framing error: hard-disconnect.
        case protocolViolation(RequestFramingError)
    }

    private var draining: (request: NBDRequest, remaining: Int)?

    public init() {}

    /// Bytes the decoder still needs before it can emit the request being read, if known.
    /// Lets the caller size its receive buffer for a large WRITE in one allocation.
    public func bytesNeeded(in buffer: ByteBuffer) -> Int? {
        guard draining == nil,
            let (magic, _, type, _, _, length) = buffer.getMultipleIntegers(
                at: buffer.readerIndex, as: (UInt32, UInt16, UInt16, UInt64, UInt64, UInt32).self),
            // A header with a bad magic ends the connection: never reserve (or wait for) the
            // payload it claims.
            magic == NBDMagic.request, type == NBDCommandType.write.rawValue, length <= NBDLimits.maximumPayload
        else { return nil }
        return NBDRequest.headerSize + Int(length)
    }

    /// Bytes still to come before the message at the front of `buffer` can be decoded:
    /// what completes the header, then, for a WRITE, its payload. Zero when the message
    /// is complete; nil while an oversized payload is drained, which takes any bytes.
    ///
    /// Lets the caller top up a message split across two socket reads with just the
    /// bytes it lacks, instead of appending the whole second read.
    public func bytesMissing(in buffer: ByteBuffer) -> Int? {
        guard draining == nil else { return nil }
        let available = buffer.readableBytes
        guard available >= NBDRequest.headerSize else { return NBDRequest.headerSize - available }
        guard let needed = bytesNeeded(in: buffer) else { return 0 }
        return max(0, needed - available)
    }

    /// Decodes at most one request from `buffer`.
    public mutating func decode(_ buffer: inout ByteBuffer) -> Result {
        if let (request, remaining) = draining {
            let take = min(remaining, buffer.readableBytes)
            buffer.moveReaderIndex(forwardBy: take)
            if take == remaining {
                draining = nil
                return .request(request)
            }
            draining = (request, remaining - take)
            return .needMoreData
        }
        guard
            let (magic, flags, type, cookie, offset, length) = buffer.getMultipleIntegers(
                at: buffer.readerIndex, as: (UInt32, UInt16, UInt16, UInt64, UInt64, UInt32).self)
        else { return .needMoreData }
        guard magic == NBDMagic.request else { return .protocolViolation(.badMagic(magic)) }
        var request = NBDRequest(
            type: type, flags: NBDCommandFlags(rawValue: flags), cookie: cookie, offset: offset, length: length)
        guard type == NBDCommandType.write.rawValue, length > 0 else {
            buffer.moveReaderIndex(forwardBy: NBDRequest.headerSize)
            return .request(request)
        }
        if length > NBDLimits.maximumDrainedPayload {
            return .protocolViolation(.payloadTooLarge(length))
        }
        if length > NBDLimits.maximumPayload {
            buffer.moveReaderIndex(forwardBy: NBDRequest.headerSize)
            request.payloadDiscarded = true
            draining = (request, Int(length))
            return decode(&buffer)
        }
        guard buffer.readableBytes >= NBDRequest.headerSize + Int(length) else { return .needMoreData }
        buffer.moveReaderIndex(forwardBy: NBDRequest.headerSize)
        request.payload = buffer.readSlice(length: Int(length))
        return .request(request)
    }
}

/// Framing errors after which the request stream cannot be resynchronised.
public enum RequestFramingError: Error, Equatable, CustomStringConvertible {
    case badMagic(UInt32)
    case payloadTooLarge(UInt32)

    public var description: String {
        switch self {
        case .badMagic(let magic): return "bad request magic 0x\(String(magic, radix: 16))"
        case .payloadTooLarge(let length): return "WRITE payload of \(length) bytes is too large to drain"
        }
    }
}
