import NIOCore

/// Writes transmission replies: simple replies and structured reply chunks.
public enum NBDReplyEncoder {
    /// Bytes before the data in a simple READ reply.
    public static let simpleHeaderSize = 16
    /// Bytes before the data in an OFFSET_DATA chunk (chunk header + offset).
    public static let offsetDataHeaderSize = 28

    public static func writeSimpleReply(cookie: UInt64, error: UInt32, into buffer: inout ByteBuffer) {
        buffer.writeMultipleIntegers(NBDMagic.simpleReply, error, cookie)
    }

    public static func writeChunkHeader(
        cookie: UInt64, type: UInt16, done: Bool, length: UInt32, into buffer: inout ByteBuffer
    ) {
        buffer.writeMultipleIntegers(
            NBDMagic.structuredReply, done ? NBDChunkType.flagDone : 0, type, cookie, length)
    }

    /// The header of an OFFSET_DATA chunk whose `length` data bytes the caller appends.
    public static func writeOffsetDataHeader(
        cookie: UInt64, offset: UInt64, length: UInt32, done: Bool, into buffer: inout ByteBuffer
    ) {
        buffer.writeMultipleIntegers(
            NBDMagic.structuredReply, done ? NBDChunkType.flagDone : 0, NBDChunkType.offsetData, cookie, length + 8,
            offset)
    }

    public static func writeOffsetHole(
        cookie: UInt64, offset: UInt64, length: UInt32, done: Bool, into buffer: inout ByteBuffer
    ) {
        writeChunkHeader(cookie: cookie, type: NBDChunkType.offsetHole, done: done, length: 12, into: &buffer)
        buffer.writeMultipleIntegers(offset, length)
    }

    /// A final ERROR chunk with a message (trimmed to what every client accepts).
    public static func writeErrorChunk(cookie: UInt64, error: UInt32, message: String, into buffer: inout ByteBuffer) {
        let text = Self.clientSafeMessage(message)
        writeChunkHeader(
            cookie: cookie, type: NBDChunkType.error, done: true, length: UInt32(6 + text.utf8.count), into: &buffer)
        buffer.writeMultipleIntegers(error, UInt16(text.utf8.count))
        buffer.writeString(text)
    }

    /// Replies to a request with an error in the form the session allows: an ERROR chunk
    /// for READ and BLOCK_STATUS under structured replies, a simple reply otherwise.
    public static func writeError(
        cookie: UInt64, command: UInt16, error: NBDError, message: String, structured: Bool,
        into buffer: inout ByteBuffer
    ) {
        let needsChunk =
            structured
            && (command == NBDCommandType.read.rawValue || command == NBDCommandType.blockStatus.rawValue)
        if needsChunk {
            writeErrorChunk(cookie: cookie, error: error.rawValue, message: message, into: &buffer)
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
