import NBDProtocol

/// Client-side bytes of the NBD handshake and requests, written out by hand so the tests
/// do not share the server's encoders.
enum ClientBytes {
    static func u16(_ value: UInt16) -> [UInt8] { [UInt8(value >> 8), UInt8(value & 0xFF)] }
    static func u32(_ value: UInt32) -> [UInt8] { (0..<4).reversed().map { UInt8((value >> ($0 * 8)) & 0xFF) } }
    static func u64(_ value: UInt64) -> [UInt8] { (0..<8).reversed().map { UInt8((value >> ($0 * 8)) & 0xFF) } }

    /// Fixed newstyle + no zeroes, then NBD_OPT_GO for the default export.
    static func handshake() -> [UInt8] {
        u32(3) + option(NBDOption.go, data: u32(0) + u16(0))
    }

    static func option(_ code: UInt32, data: [UInt8]) -> [UInt8] {
        u64(0x4948_4156_454F_5054) + u32(code) + u32(UInt32(data.count)) + data
    }

    static func request(_ type: NBDCommandType, cookie: UInt64, offset: UInt64 = 0, length: UInt32 = 0, payload: [UInt8] = []) -> [UInt8] {
        u32(0x2560_9513) + u16(0) + u16(type.rawValue) + u64(cookie) + u64(offset) + u32(length) + payload
    }
}

/// Option replies as a client reads them.
enum OptionReplies {
    /// True when the last reply in `bytes` is an ACK for `option`.
    static func endsWithAck(_ bytes: [UInt8], option: UInt32) -> Bool {
        var index = 0
        var lastWasAck = false
        while index + 20 <= bytes.count {
            let replyOption = Reader.u32(bytes, index + 8)
            let type = Reader.u32(bytes, index + 12)
            let length = Int(Reader.u32(bytes, index + 16))
            lastWasAck = replyOption == option && type == NBDOptionReply.ack
            index += 20 + length
        }
        return index == bytes.count && lastWasAck
    }
}

/// One simple reply: its cookie, error and the data that followed (READ).
struct SimpleReply: Equatable {
    var cookie: UInt64
    var error: UInt32
    var data: [UInt8]

    /// Splits `bytes` into simple replies; `readLengths` gives the data length of each
    /// READ reply by cookie.
    static func parse(_ bytes: [UInt8], readLengths: [UInt64: Int] = [:]) -> [SimpleReply]? {
        var replies: [SimpleReply] = []
        var index = 0
        while index < bytes.count {
            guard index + 16 <= bytes.count, Reader.u32(bytes, index) == 0x6744_6698 else { return nil }
            let error = Reader.u32(bytes, index + 4)
            let cookie = Reader.u64(bytes, index + 8)
            let dataLength = error == 0 ? readLengths[cookie] ?? 0 : 0
            guard index + 16 + dataLength <= bytes.count else { return nil }
            replies.append(SimpleReply(cookie: cookie, error: error, data: Array(bytes[(index + 16)..<(index + 16 + dataLength)])))
            index += 16 + dataLength
        }
        return replies
    }
}

enum Reader {
    static func u32(_ bytes: [UInt8], _ at: Int) -> UInt32 {
        bytes[at..<(at + 4)].reduce(0) { $0 << 8 | UInt32($1) }
    }
    static func u64(_ bytes: [UInt8], _ at: Int) -> UInt64 {
        bytes[at..<(at + 8)].reduce(0) { $0 << 8 | UInt64($1) }
    }
}
