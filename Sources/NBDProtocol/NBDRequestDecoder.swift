import NIOCore

/// Splits the transmission byte stream into requests, in the connection's framing.
///
/// WRITE payloads up to the advertised maximum come out as zero-copy slices of the input.
/// A WRITE whose header has arrived without all of its payload gives up its header at
/// once and waits for the payload alone: a client that sends the two separately (libnbd
/// does) then has its payload sliced out of the next read where it lies, instead of
/// copied onto the header.
/// Larger ones, up to `NBDLimits.maximumDrainedPayload`, are consumed as they arrive
/// without being buffered, and the request is marked `payloadDiscarded` so it can be
/// refused with EINVAL while the stream stays in sync. Anything larger, or a bad magic,
/// ends the connection: the stream cannot be trusted after that.
///
/// With extended headers the header length is 64 bits and `NBD_CMD_FLAG_PAYLOAD_LEN` says
/// whether it counts payload bytes (which then follow) or the command's effect. A payload
/// on a command that takes none is read and dropped, then refused; effect lengths past
/// 2^63 - 1 are refused; both with `NBD_EINVAL` (as ``NBDRequest/defect``), and the
/// connection goes on. A WRITE's length is its payload's with or without the flag: the
/// spec makes the flag mandatory there, but qemu 10's client leaves it out and sends the
/// data all the same, and qemu's own server takes it (it only traces the lapse); refusing
/// would break every qemu write, and reading no payload would lose the stream.
public struct NBDRequestDecoder {
    /// What one decoding step produced.
    public enum Result {
        case request(NBDRequest)
        case needMoreData
        /// Unrecoverable framing error: hard-disconnect.
        case protocolViolation(RequestFramingError)
    }

    /// The header layout requests arrive in.
    public let framing: NBDFraming
    /// A request whose header was taken while its payload is still to come: the front of
    /// the input is that payload.
    private enum PayloadInProgress {
        /// A WRITE's, sliced out whole once all `length` bytes are there.
        case kept(NBDRequest, length: Int)
        /// One too large to keep, or on a command that takes none: dropped as it arrives.
        case drained(NBDRequest, remaining: Int)
    }
    private var payloadInProgress: PayloadInProgress?

    public init(framing: NBDFraming = .compact) {
        self.framing = framing
    }

    /// The fields of the header at the front of `buffer`, lengths widened to 64 bits.
    private func header(in buffer: ByteBuffer) -> (magic: UInt32, flags: UInt16, type: UInt16, cookie: UInt64, offset: UInt64, length: UInt64)? {
        switch framing {
        case .compact:
            guard let (magic, flags, type, cookie, offset, length) = buffer.getMultipleIntegers(
                at: buffer.readerIndex, as: (UInt32, UInt16, UInt16, UInt64, UInt64, UInt32).self)
            else { return nil }
            return (magic, flags, type, cookie, offset, UInt64(length))
        case .extended:
            guard let (magic, flags, type, cookie, offset, length) = buffer.getMultipleIntegers(
                at: buffer.readerIndex, as: (UInt32, UInt16, UInt16, UInt64, UInt64, UInt64).self)
            else { return nil }
            return (magic, flags, type, cookie, offset, length)
        }
    }

    /// Payload bytes that follow a header: the WRITE length, and in extended framing also
    /// the length of any other command flagged `NBD_CMD_FLAG_PAYLOAD_LEN`.
    private func payloadLength(type: UInt16, flags: UInt16, length: UInt64) -> UInt64 {
        if type == NBDCommandType.write.rawValue { return length }
        switch framing {
        case .compact:
            return 0
        case .extended:
            return flags & NBDCommandFlags.payloadLength.rawValue != 0 ? length : 0
        }
    }

    /// Bytes the decoder still needs before it can emit the request being read, if known:
    /// header and payload, or the payload alone once the header was taken.
    /// Lets the caller size its receive buffer for a large WRITE in one allocation.
    public func bytesNeeded(in buffer: ByteBuffer) -> Int? {
        switch payloadInProgress {
        case .kept(_, let length): return length
        case .drained: return nil
        case nil: break
        }
        guard let header = header(in: buffer),
            // A header with a bad magic ends the connection: never reserve (or wait for) the
            // payload it claims.
            header.magic == framing.requestMagic, header.type == NBDCommandType.write.rawValue
        else { return nil }
        let payload = payloadLength(type: header.type, flags: header.flags, length: header.length)
        guard payload <= UInt64(NBDLimits.maximumPayload) else { return nil }
        return framing.requestHeaderSize + Int(payload)
    }

    /// Bytes still to come before the message at the front of `buffer` can be decoded:
    /// what completes the header, then, for a WRITE, its payload. Zero when the message
    /// is complete; nil while an oversized payload is drained, which takes any bytes.
    ///
    /// Lets the caller top up a message split across two socket reads with just the
    /// bytes it lacks, instead of appending the whole second read.
    public func bytesMissing(in buffer: ByteBuffer) -> Int? {
        let available = buffer.readableBytes
        switch payloadInProgress {
        case .kept(_, let length): return max(0, length - available)
        case .drained: return nil
        case nil: break
        }
        let headerSize = framing.requestHeaderSize
        guard available >= headerSize else { return headerSize - available }
        guard let needed = bytesNeeded(in: buffer) else { return 0 }
        return max(0, needed - available)
    }

    /// True between a request's first byte being taken and its last: a WRITE's header
    /// without all its payload, or an oversized payload being drained. The input buffer
    /// may then be empty while a request is still partly received.
    public var isWithinRequest: Bool { payloadInProgress != nil }

    /// Decodes at most one request from `buffer`.
    public mutating func decode(_ buffer: inout ByteBuffer) -> Result {
        switch payloadInProgress {
        case .kept(var request, let length):
            guard buffer.readableBytes >= length else { return .needMoreData }
            request.payload = buffer.readSlice(length: length)
            payloadInProgress = nil
            return .request(request)
        case .drained(let request, let remaining):
            let take = min(remaining, buffer.readableBytes)
            buffer.moveReaderIndex(forwardBy: take)
            if take == remaining {
                payloadInProgress = nil
                return .request(request)
            }
            payloadInProgress = .drained(request, remaining: remaining - take)
            return .needMoreData
        case nil:
            break
        }
        guard let header = header(in: buffer) else { return .needMoreData }
        guard header.magic == framing.requestMagic else { return .protocolViolation(.badMagic(header.magic)) }
        let headerSize = framing.requestHeaderSize
        var request = NBDRequest(
            type: header.type, flags: NBDCommandFlags(rawValue: header.flags), cookie: header.cookie,
            offset: header.offset, length: header.length)
        let isWrite = header.type == NBDCommandType.write.rawValue
        let payload = payloadLength(type: header.type, flags: header.flags, length: header.length)
        if framing == .extended && payload == 0 && header.length > NBDLimits.maximumEffectLength {
            request.defect = .lengthTooLarge(header.length)
        }
        guard payload > 0 else {
            buffer.moveReaderIndex(forwardBy: headerSize)
            return .request(request)
        }
        if payload > UInt64(NBDLimits.maximumDrainedPayload) {
            return .protocolViolation(.payloadTooLarge(payload))
        }
        buffer.moveReaderIndex(forwardBy: headerSize)
        if !isWrite {
            // Only reachable with extended headers: no command but WRITE takes a payload here.
            request.defect = .unexpectedPayload(payload)
            payloadInProgress = .drained(request, remaining: Int(payload))
        } else if payload > UInt64(NBDLimits.maximumPayload) {
            request.payloadDiscarded = true
            payloadInProgress = .drained(request, remaining: Int(payload))
        } else {
            payloadInProgress = .kept(request, length: Int(payload))
        }
        return decode(&buffer)
    }
}

/// Framing errors after which the request stream cannot be resynchronised.
public enum RequestFramingError: Error, Equatable, CustomStringConvertible {
    case badMagic(UInt32)
    case payloadTooLarge(UInt64)

    public var description: String {
        switch self {
        case .badMagic(let magic): return "bad request magic 0x\(String(magic, radix: 16))"
        case .payloadTooLarge(let length): return "request payload of \(length) bytes is too large to drain"
        }
    }
}
