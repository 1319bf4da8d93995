import NIOCore

/// Writes transmission replies: simple replies, structured reply chunks and, once extended
/// headers are negotiated, extended reply chunks.
///
/// Every writer takes the connection's ``NBDFraming`` and the offset of the request it
/// answers (extended chunk headers echo it; compact ones have no room for it). With the
/// default `.compact` framing the bytes are exactly the structured/simple replies of old.
public enum NBDReplyEncoder {
    /// Bytes before the data in a simple READ reply.
    public static let simpleHeaderSize = 16
    /// Bytes before the data in a compact OFFSET_DATA chunk (chunk header + offset).
    public static let offsetDataHeaderSize = 28

    /// Bytes before the data in an OFFSET_DATA chunk of `framing`.
    public static func offsetDataHeaderSize(_ framing: NBDFraming) -> Int {
        framing.chunkHeaderSize + 8
    }

    /// Bytes of the reply that only says "done" (or failed without a message).
    public static func statusReplySize(_ framing: NBDFraming) -> Int {
        switch framing {
        case .compact: simpleHeaderSize
        case .extended: framing.chunkHeaderSize
        }
    }

    public static func writeSimpleReply(cookie: UInt64, error: UInt32, into buffer: inout ByteBuffer) {
        buffer.writeMultipleIntegers(NBDMagic.simpleReply, error, cookie)
    }

    /// The reply of a command that has nothing to send back but its outcome: a simple
    /// reply with compact headers, a final NONE chunk (or an ERROR chunk without a message)
    /// with extended headers, which have no simple replies.
    public static func writeStatusReply(
        cookie: UInt64, error: UInt32, framing: NBDFraming, requestOffset: UInt64, into buffer: inout ByteBuffer
    ) {
        switch framing {
        case .compact:
            writeSimpleReply(cookie: cookie, error: error, into: &buffer)
        case .extended:
            if error == 0 {
                writeChunkHeader(
                    cookie: cookie, type: NBDChunkType.none, done: true, length: 0, framing: framing,
                    requestOffset: requestOffset, into: &buffer)
            } else {
                writeErrorChunk(
                    cookie: cookie, error: error, message: "", framing: framing, requestOffset: requestOffset,
                    into: &buffer)
            }
        }
    }

    /// A chunk header: 20 bytes (structured) or 32 (extended, with the request's offset).
    public static func writeChunkHeader(
        cookie: UInt64, type: UInt16, done: Bool, length: UInt32, framing: NBDFraming = .compact,
        requestOffset: UInt64 = 0, into buffer: inout ByteBuffer
    ) {
        let flags = done ? NBDChunkType.flagDone : 0
        switch framing {
        case .compact:
            buffer.writeMultipleIntegers(NBDMagic.structuredReply, flags, type, cookie, length)
        case .extended:
            buffer.writeMultipleIntegers(NBDMagic.extendedReply, flags, type, cookie, requestOffset, UInt64(length))
        }
    }

    /// The header of an OFFSET_DATA chunk whose `length` data bytes the caller appends.
    public static func writeOffsetDataHeader(
        cookie: UInt64, offset: UInt64, length: UInt32, done: Bool, framing: NBDFraming = .compact,
        requestOffset: UInt64 = 0, into buffer: inout ByteBuffer
    ) {
        switch framing {
        case .compact:
            buffer.writeMultipleIntegers(
                NBDMagic.structuredReply, done ? NBDChunkType.flagDone : 0, NBDChunkType.offsetData, cookie,
                length + 8, offset)
        case .extended:
            buffer.writeMultipleIntegers(
                NBDMagic.extendedReply, done ? NBDChunkType.flagDone : 0, NBDChunkType.offsetData, cookie,
                requestOffset, UInt64(length) + 8, offset)
        }
    }

    public static func writeOffsetHole(
        cookie: UInt64, offset: UInt64, length: UInt32, done: Bool, framing: NBDFraming = .compact,
        requestOffset: UInt64 = 0, into buffer: inout ByteBuffer
    ) {
        writeChunkHeader(
            cookie: cookie, type: NBDChunkType.offsetHole, done: done, length: 12, framing: framing,
            requestOffset: requestOffset, into: &buffer)
        buffer.writeMultipleIntegers(offset, length)
    }

    /// A final ERROR chunk with a message (trimmed to what every client accepts).
    public static func writeErrorChunk(
        cookie: UInt64, error: UInt32, message: String, framing: NBDFraming = .compact, requestOffset: UInt64 = 0,
        into buffer: inout ByteBuffer
    ) {
        let text = Self.clientSafeMessage(message)
        writeChunkHeader(
            cookie: cookie, type: NBDChunkType.error, done: true, length: UInt32(6 + text.utf8.count),
            framing: framing, requestOffset: requestOffset, into: &buffer)
        buffer.writeMultipleIntegers(error, UInt16(text.utf8.count))
        buffer.writeString(text)
    }

    /// Replies to a request with an error in the form the session allows: an ERROR chunk
    /// for READ and BLOCK_STATUS under structured replies and for every command under
    /// extended headers, a simple reply otherwise.
    public static func writeError(
        cookie: UInt64, command: UInt16, error: NBDError, message: String, structured: Bool,
        framing: NBDFraming = .compact, requestOffset: UInt64 = 0, into buffer: inout ByteBuffer
    ) {
        let needsChunk =
            framing == .extended
            || (structured
                && (command == NBDCommandType.read.rawValue || command == NBDCommandType.blockStatus.rawValue))
        if needsChunk {
            writeErrorChunk(
                cookie: cookie, error: error.rawValue, message: message, framing: framing, requestOffset: requestOffset,
                into: &buffer)
        } else {
            writeSimpleReply(cookie: cookie, error: error.rawValue, into: &buffer)
        }
    }

    /// Error messages stay short: qemu refuses non-data chunks over 1000 bytes.
    static func clientSafeMessage(_ message: String) -> String {
        guard message.utf8.count > 200 else { return message }
        var result = ""
        for character in message {
            if result.utf8.count + character.utf8.count > 200 { break }
            result.append(character)
        }
        return result
    }
}
