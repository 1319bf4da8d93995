import Foundation

/// Extended headers on the raw client: the option, 32-byte requests with 64-bit lengths
/// and 32-byte reply chunks, for what no installed client sends (libnbd 1.14 has no
/// extended headers; qemu sends only well-formed requests).
extension RawNBDSocket {
    static let extendedRequestMagic: UInt32 = 0x21e4_1c71
    static let extendedReplyMagic: UInt32 = 0x6e8a_278c
    static let optionExtendedHeaders: UInt32 = 11
    static let flagPayloadLength: UInt16 = 1 << 5

    /// One extended reply chunk.
    struct ExtendedChunk {
        let flags: UInt16
        let type: UInt16
        let cookie: UInt64
        let offset: UInt64
        let payload: [UInt8]

        var isDone: Bool { flags & 1 != 0 }
        /// The error of an ERROR chunk (bit 15 of the type), else 0.
        var error: UInt32 { type & 0x8000 != 0 && payload.count >= 4 ? RawNBDSocket.u32(payload, 0) : 0 }
    }

    /// Greeting, flags, NBD_OPT_EXTENDED_HEADERS (must be ACKed), optional SET_META_CONTEXT,
    /// then GO on `export`.
    func negotiateExtended(export: String = "disk", contexts: [String] = []) throws {
        try handshake()
        try sendOption(Self.optionExtendedHeaders)
        let reply = try readOptionReply()
        guard reply.type == Reply.ack.rawValue else {
            throw HarnessError("NBD_OPT_EXTENDED_HEADERS answered 0x\(String(reply.type, radix: 16)), not ACK")
        }
        if !contexts.isEmpty {
            try sendOption(.setMetaContext, data: Self.metaContextPayload(export: export, queries: contexts))
            let replies = try readOptionReplies()
            guard replies.last?.type == Reply.ack.rawValue else { throw HarnessError("SET_META_CONTEXT failed") }
        }
        try go(export: export, infoRequests: [3])
    }

    /// A 32-byte extended request header and `payload`; `magic` may be wrong on purpose.
    func sendExtendedRequest(
        type: UInt16, flags: UInt16 = 0, cookie: UInt64, offset: UInt64 = 0, length: UInt64 = 0,
        payload: [UInt8] = [], magic: UInt32 = RawNBDSocket.extendedRequestMagic
    ) throws {
        try send(
            Self.be(magic) + Self.be(flags) + Self.be(type) + Self.be(cookie) + Self.be(offset) + Self.be(length)
                + payload)
    }

    /// Reads extended chunks up to the one flagged DONE; fails on any other magic.
    func readExtendedReply() throws -> [ExtendedChunk] {
        var chunks: [ExtendedChunk] = []
        while true {
            let header = try receive(32)
            let magic = Self.u32(header, 0)
            guard magic == Self.extendedReplyMagic else {
                throw HarnessError("expected an extended reply chunk, got magic \(String(magic, radix: 16))")
            }
            let length = Self.u64(header, 24)
            guard length <= 64 << 20 else { throw HarnessError("chunk too long: \(length)") }
            let chunk = ExtendedChunk(
                flags: Self.u16(header, 4), type: Self.u16(header, 6), cookie: Self.u64(header, 8),
                offset: Self.u64(header, 16), payload: try receive(Int(length)))
            chunks.append(chunk)
            if chunk.isDone { return chunks }
        }
    }
}
