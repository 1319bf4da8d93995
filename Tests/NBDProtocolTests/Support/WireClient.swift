import NIOCore

/// Big-endian byte building, independent of the code under test.
struct Bytes {
    var bytes: [UInt8] = []

    init() {}

    mutating func u8(_ value: UInt8) { bytes.append(value) }
    mutating func u16(_ value: UInt16) { append(UInt64(value), width: 2) }
    mutating func u32(_ value: UInt32) { append(UInt64(value), width: 4) }
    mutating func u64(_ value: UInt64) { append(value, width: 8) }
    mutating func raw(_ data: [UInt8]) { bytes += data }
    mutating func string(_ text: String) { bytes += Array(text.utf8) }

    private mutating func append(_ value: UInt64, width: Int) {
        withUnsafeBytes(of: value.bigEndian) { bytes.append(contentsOf: $0[(8 - width)...]) }
    }
}

/// Reads big-endian integers from a byte array, failing (nil) instead of trapping.
struct ByteReader {
    let bytes: [UInt8]
    var position = 0

    init(_ bytes: [UInt8]) { self.bytes = bytes }

    var remaining: Int { bytes.count - position }

    mutating func read(width: Int) -> UInt64? {
        guard remaining >= width else { return nil }
        var value: UInt64 = 0
        for index in position..<(position + width) { value = value << 8 | UInt64(bytes[index]) }
        position += width
        return value
    }

    mutating func u16() -> UInt16? { read(width: 2).map { UInt16($0) } }
    mutating func u32() -> UInt32? { read(width: 4).map { UInt32($0) } }
    mutating func u64() -> UInt64? { read(width: 8) }

    mutating func bytes(_ count: Int) -> [UInt8]? {
        guard count >= 0, remaining >= count else { return nil }
        defer { position += count }
        return Array(bytes[position..<(position + count)])
    }

    mutating func rest() -> [UInt8] { bytes(remaining) ?? [] }
}

/// The constants as the spec writes them, so tests do not merely echo the sources.
enum Wire {
    static let nbdMagic: UInt64 = 0x4e42_444d_4147_4943  // "NBDMAGIC"
    static let ihaveopt: UInt64 = 0x4948_4156_454F_5054  // "IHAVEOPT"
    static let replyMagic: UInt64 = 0x0003_e889_0455_65a9
    static let requestMagic: UInt32 = 0x2560_9513
    static let simpleReplyMagic: UInt32 = 0x6744_6698
    static let structuredReplyMagic: UInt32 = 0x668e_33ef

    // Options.
    static let optExportName: UInt32 = 1
    static let optAbort: UInt32 = 2
    static let optList: UInt32 = 3
    static let optPeekExport: UInt32 = 4
    static let optStartTLS: UInt32 = 5
    static let optInfo: UInt32 = 6
    static let optGo: UInt32 = 7
    static let optStructuredReply: UInt32 = 8
    static let optListMeta: UInt32 = 9
    static let optSetMeta: UInt32 = 10
    static let optExtendedHeaders: UInt32 = 11

    // Replies.
    static let repAck: UInt32 = 1
    static let repServer: UInt32 = 2
    static let repInfo: UInt32 = 3
    static let repMetaContext: UInt32 = 4
    static let errUnsup: UInt32 = 0x8000_0001
    static let errPolicy: UInt32 = 0x8000_0002
    static let errInvalid: UInt32 = 0x8000_0003
    static let errUnknown: UInt32 = 0x8000_0006
    static let errTooBig: UInt32 = 0x8000_0009
    static let errTLSRequired: UInt32 = 0x8000_0005

    // Info types.
    static let infoExport: UInt16 = 0
    static let infoName: UInt16 = 1
    static let infoDescription: UInt16 = 2
    static let infoBlockSize: UInt16 = 3

    // Commands.
    static let cmdRead: UInt16 = 0
    static let cmdWrite: UInt16 = 1
    static let cmdDisc: UInt16 = 2
    static let cmdFlush: UInt16 = 3
    static let cmdTrim: UInt16 = 4
    static let cmdCache: UInt16 = 5
    static let cmdWriteZeroes: UInt16 = 6
    static let cmdBlockStatus: UInt16 = 7

    // Command flags.
    static let flagFUA: UInt16 = 1 << 0
    static let flagNoHole: UInt16 = 1 << 1
    static let flagDF: UInt16 = 1 << 2
    static let flagReqOne: UInt16 = 1 << 3
    static let flagFastZero: UInt16 = 1 << 4

    // Errors.
    static let EPERM: UInt32 = 1
    static let EINVAL: UInt32 = 22
    static let ENOSPC: UInt32 = 28
}

/// A tiny client-side encoder for handshake and transmission messages.
enum Client {
    static func flags(_ value: UInt32) -> [UInt8] {
        var b = Bytes()
        b.u32(value)
        return b.bytes
    }

    /// One option request: IHAVEOPT, option, length, data. `length` overrides the real length.
    static func option(_ code: UInt32, _ data: [UInt8] = [], length: UInt32? = nil) -> [UInt8] {
        var b = Bytes()
        b.u64(Wire.ihaveopt)
        b.u32(code)
        b.u32(length ?? UInt32(data.count))
        b.raw(data)
        return b.bytes
    }

    /// The INFO/GO payload: name length, name, request count, requests.
    static func infoPayload(name: String, requests: [UInt16]) -> [UInt8] {
        var b = Bytes()
        b.u32(UInt32(name.utf8.count))
        b.string(name)
        b.u16(UInt16(requests.count))
        for request in requests { b.u16(request) }
        return b.bytes
    }

    static func info(_ name: String, _ requests: [UInt16] = []) -> [UInt8] {
        option(Wire.optInfo, infoPayload(name: name, requests: requests))
    }

    static func go(_ name: String, _ requests: [UInt16] = []) -> [UInt8] {
        option(Wire.optGo, infoPayload(name: name, requests: requests))
    }

    /// The LIST/SET_META_CONTEXT payload.
    static func metaPayload(name: String, queries: [String]) -> [UInt8] {
        var b = Bytes()
        b.u32(UInt32(name.utf8.count))
        b.string(name)
        b.u32(UInt32(queries.count))
        for query in queries {
            b.u32(UInt32(query.utf8.count))
            b.string(query)
        }
        return b.bytes
    }

    static func listMeta(_ name: String, _ queries: [String]) -> [UInt8] {
        option(Wire.optListMeta, metaPayload(name: name, queries: queries))
    }

    static func setMeta(_ name: String, _ queries: [String]) -> [UInt8] {
        option(Wire.optSetMeta, metaPayload(name: name, queries: queries))
    }

    static var structuredReply: [UInt8] { option(Wire.optStructuredReply) }

    /// A compact transmission request header (plus `payload`, for WRITE).
    static func request(
        type: UInt16, flags: UInt16 = 0, cookie: UInt64 = 0x1122_3344_5566_7788, offset: UInt64 = 0,
        length: UInt32 = 0, payload: [UInt8] = [], magic: UInt32 = Wire.requestMagic
    ) -> [UInt8] {
        var b = Bytes()
        b.u32(magic)
        b.u16(flags)
        b.u16(type)
        b.u64(cookie)
        b.u64(offset)
        b.u32(length)
        b.raw(payload)
        return b.bytes
    }
}

/// One option reply as parsed from the server's bytes.
struct OptionReply: Equatable, CustomStringConvertible {
    var option: UInt32
    var type: UInt32
    var data: [UInt8]

    var isError: Bool { type & 0x8000_0000 != 0 }

    var description: String {
        "reply(option: \(option), type: 0x\(String(type, radix: 16)), \(data.count) bytes)"
    }

    /// For NBD_REP_INFO: the info type and its payload.
    var info: (type: UInt16, payload: [UInt8])? {
        var reader = ByteReader(data)
        guard type == Wire.repInfo, let infoType = reader.u16() else { return nil }
        return (infoType, reader.rest())
    }

    /// For NBD_REP_META_CONTEXT: the id and the name.
    var metaContext: (id: UInt32, name: String)? {
        var reader = ByteReader(data)
        guard type == Wire.repMetaContext, let id = reader.u32() else { return nil }
        return (id, String(decoding: reader.rest(), as: UTF8.self))
    }

    /// For NBD_REP_SERVER: the name and the description.
    var server: (name: String, description: String)? {
        var reader = ByteReader(data)
        guard type == Wire.repServer, let length = reader.u32(), let name = reader.bytes(Int(length)) else {
            return nil
        }
        return (String(decoding: name, as: UTF8.self), String(decoding: reader.rest(), as: UTF8.self))
    }
}

enum ReplyParseError: Error, CustomStringConvertible {
    case truncated(at: Int)
    case badMagic(UInt64, at: Int)

    var description: String {
        switch self {
        case .truncated(let at): return "option reply truncated at byte \(at)"
        case .badMagic(let magic, let at): return "bad reply magic 0x\(String(magic, radix: 16)) at byte \(at)"
        }
    }
}

enum OptionReplyParser {
    /// Parses a byte stream made only of option replies. Every length field must match
    /// its body exactly: a reply that runs past the end, or trailing garbage, throws.
    static func parse(_ bytes: [UInt8]) throws(ReplyParseError) -> [OptionReply] {
        var reader = ByteReader(bytes)
        var replies: [OptionReply] = []
        while reader.remaining > 0 {
            let start = reader.position
            guard let magic = reader.u64(), let option = reader.u32(), let type = reader.u32(),
                let length = reader.u32()
            else { throw .truncated(at: start) }
            guard magic == Wire.replyMagic else { throw .badMagic(magic, at: start) }
            guard let data = reader.bytes(Int(length)) else { throw .truncated(at: start) }
            replies.append(OptionReply(option: option, type: type, data: data))
        }
        return replies
    }

    static func parse(_ buffer: ByteBuffer) throws(ReplyParseError) -> [OptionReply] {
        try parse(Array(buffer.readableBytesView))
    }
}

extension ByteBuffer {
    var bytes: [UInt8] { Array(readableBytesView) }
}
