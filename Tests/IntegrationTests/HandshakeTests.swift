import Foundation
import NBDClient
import Testing

/// The handshake, on the wire (greeting, options, replies) and through libnbd's option mode.
@Suite("Handshake", .serialized)
struct HandshakeTests {
    // Transmission flags (NBD_FLAG_*).
    static let hasFlags: UInt16 = 0x0001
    static let readOnly: UInt16 = 0x0002
    static let sendFlush: UInt16 = 0x0004
    static let sendFUA: UInt16 = 0x0008
    static let sendTrim: UInt16 = 0x0020
    static let sendWriteZeroes: UInt16 = 0x0040
    static let sendDF: UInt16 = 0x0080
    static let canMultiConn: UInt16 = 0x0100
    static let sendCache: UInt16 = 0x0400
    static let sendFastZero: UInt16 = 0x0800

    static let writableFlags = hasFlags | sendFlush | sendFUA | sendTrim | sendWriteZeroes | canMultiConn | sendCache | sendFastZero
    static let readOnlyFlags = hasFlags | readOnly | sendFlush | sendFUA | canMultiConn | sendCache

    /// The INFO replies of a GO/INFO, by info type.
    static func infos(_ replies: [RawNBDSocket.OptionReply]) -> [UInt16: [UInt8]] {
        var result: [UInt16: [UInt8]] = [:]
        for reply in replies where reply.type == RawNBDSocket.Reply.info.rawValue && reply.data.count >= 2 {
            result[RawNBDSocket.u16(reply.data, 0)] = reply.data
        }
        return result
    }

    @Test("greeting: NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE|NO_ZEROES")
    func greeting() throws {
        let fixture = try ServerFixture()
        let raw = try RawNBDSocket(unixSocket: fixture.directory.socketPath)
        #expect(try raw.readGreeting() == 0x0003)
    }

    @Test("client flags with an unknown bit end the connection")
    func unknownClientFlags() throws {
        let fixture = try ServerFixture()
        let raw = try RawNBDSocket(unixSocket: fixture.directory.socketPath)
        _ = try raw.readGreeting()
        try raw.send(RawNBDSocket.be(UInt32(0x0000_0007)))
        #expect(raw.isClosedByPeer())
        // The server itself is fine.
        #expect(try fixture.connect().size == UInt64(ServerFixture.defaultSize))
    }

    @Test("unknown options get NBD_REP_ERR_UNSUP, their data is skipped, negotiation goes on", arguments: [
        UInt32(4), 0x42, 0x7FFF_FFFF, 0xFFFF_FFFF,
    ])
    func unknownOption(option: UInt32) throws {
        let fixture = try ServerFixture()
        let raw = try RawNBDSocket(unixSocket: fixture.directory.socketPath)
        try raw.handshake()
        try raw.sendOption(option, data: Array("IHAVEOPT junk that must be skipped".utf8))
        let reply = try raw.readOptionReply()
        #expect(reply.option == option)
        #expect(reply.type == RawNBDSocket.Reply.errUnsup.rawValue)
        try raw.sendOption(.list)
        let list = try raw.readOptionReplies()
        #expect(list.last?.type == RawNBDSocket.Reply.ack.rawValue)
        #expect(list.count == 2)
    }

    @Test("with --no-extended-headers, NBD_OPT_EXTENDED_HEADERS (newer clients send it first) is refused without dropping the client")
    func extendedHeadersOption() throws {
        let fixture = try ServerFixture(extraArguments: ["--no-extended-headers"])
        let raw = try RawNBDSocket(unixSocket: fixture.directory.socketPath)
        try raw.handshake()
        try raw.sendOption(11)
        let reply = try raw.readOptionReply()
        // ERR_UNSUP (ExtendedHeadersInteropTests covers the server that offers them).
        #expect(reply.type == RawNBDSocket.Reply.errUnsup.rawValue)
        try raw.sendOption(.structuredReply)
        #expect(try raw.readOptionReply().type == RawNBDSocket.Reply.ack.rawValue)
        try raw.go(export: "disk")
    }

    @Test("NBD_OPT_ABORT is acknowledged and the server closes")
    func abort() throws {
        let fixture = try ServerFixture()
        let raw = try RawNBDSocket(unixSocket: fixture.directory.socketPath)
        try raw.handshake()
        try raw.sendOption(.abort)
        let reply = try raw.readOptionReply()
        #expect(reply.type == RawNBDSocket.Reply.ack.rawValue)
        #expect(reply.data.isEmpty)
        #expect(raw.isClosedByPeer())

        let connection = try NBDConnection(NBDConnectionConfiguration(optMode: true))
        try connection.connect(unixSocket: fixture.directory.socketPath)
        try connection.optAbort()
        #expect(!connection.isReady)
    }

    @Test("NBD_OPT_LIST: one NBD_REP_SERVER per export with name and description, then ACK")
    func list() throws {
        let fixture = try ServerFixture(name: "vm-disk", extraArguments: ["--description", "a disk"])
        let raw = try RawNBDSocket(unixSocket: fixture.directory.socketPath)
        try raw.handshake()
        try raw.sendOption(.list)
        let replies = try raw.readOptionReplies()
        #expect(replies.map(\.type) == [RawNBDSocket.Reply.server.rawValue, RawNBDSocket.Reply.ack.rawValue])
        let server = try #require(replies.first).data
        let nameLength = Int(RawNBDSocket.u32(server, 0))
        #expect(nameLength == 7)
        #expect(String(decoding: server[4..<(4 + nameLength)], as: UTF8.self) == "vm-disk")
        #expect(String(decoding: server[(4 + nameLength)...], as: UTF8.self) == "a disk")
    }

    @Test("NBD_OPT_INFO always sends NBD_INFO_EXPORT, block sizes when asked, and stays in negotiation")
    func info() throws {
        let fixture = try ServerFixture()
        let raw = try RawNBDSocket(unixSocket: fixture.directory.socketPath)
        try raw.handshake()
        try raw.sendOption(.info, data: RawNBDSocket.goPayload(export: "disk"))
        let plain = Self.infos(try raw.readOptionReplies())
        let export = try #require(plain[0])
        #expect(export.count == 12)
        #expect(RawNBDSocket.u64(export, 2) == UInt64(ServerFixture.defaultSize))
        #expect(RawNBDSocket.u16(export, 10) == Self.writableFlags)

        try raw.sendOption(.info, data: RawNBDSocket.goPayload(export: "disk", infoRequests: [3]))
        let replies = try raw.readOptionReplies()
        #expect(replies.last?.type == RawNBDSocket.Reply.ack.rawValue)
        let sized = Self.infos(replies)
        #expect(sized[0] != nil)
        let blockSize = try #require(sized[3])
        #expect(blockSize.count == 14)
        #expect(RawNBDSocket.u32(blockSize, 2) == 512)
        #expect(RawNBDSocket.u32(blockSize, 6) == 4096)
        #expect(RawNBDSocket.u32(blockSize, 10) == 32 << 20)

        // Still negotiating: GO works.
        let go = Self.infos(try raw.go(export: "disk", infoRequests: [3]))
        #expect(go[0] == export)
        #expect(go[3] == blockSize)
        try raw.sendRequest(type: 3, cookie: 1)  // FLUSH
        #expect(try raw.readSimpleReply().error == 0)
    }

    @Test("transmission flags: SEND_DF only with structured replies; read-only exports drop TRIM/ZEROES/FAST_ZERO", arguments: [
        (readOnly: false, structured: false), (readOnly: false, structured: true),
        (readOnly: true, structured: false), (readOnly: true, structured: true),
    ])
    func transmissionFlags(readOnly: Bool, structured: Bool) throws {
        let fixture = try ServerFixture(extraArguments: readOnly ? ["--read-only"] : [])
        let raw = try RawNBDSocket(unixSocket: fixture.directory.socketPath)
        try raw.handshake()
        if structured {
            try raw.sendOption(.structuredReply)
            #expect(try raw.readOptionReply().type == RawNBDSocket.Reply.ack.rawValue)
        }
        let export = try #require(Self.infos(try raw.go(export: "disk"))[0])
        var expected = readOnly ? Self.readOnlyFlags : Self.writableFlags
        if structured { expected |= Self.sendDF }
        let flags = RawNBDSocket.u16(export, 10)
        #expect(flags == expected, "flags 0x\(String(flags, radix: 16)), expected 0x\(String(expected, radix: 16))")
    }

    @Test("a repeated NBD_OPT_STRUCTURED_REPLY is refused; data on it too")
    func structuredReplyRules() throws {
        let fixture = try ServerFixture()
        let raw = try RawNBDSocket(unixSocket: fixture.directory.socketPath)
        try raw.handshake()
        try raw.sendOption(.structuredReply, data: [1, 2, 3])
        #expect(try raw.readOptionReply().type & 0x8000_0000 != 0)
        try raw.sendOption(.structuredReply)
        #expect(try raw.readOptionReply().type == RawNBDSocket.Reply.ack.rawValue)
        try raw.sendOption(.structuredReply)
        #expect(try raw.readOptionReply().type & 0x8000_0000 != 0)
        try raw.go(export: "disk")
    }

    @Test("NBD_OPT_EXPORT_NAME: size and flags, without the 124 zero bytes when both sides said NO_ZEROES")
    func exportNameNoZeroes() throws {
        let fixture = try ServerFixture(filled: true)
        let raw = try RawNBDSocket(unixSocket: fixture.directory.socketPath)
        try raw.handshake(clientFlags: 3)
        try raw.sendOption(.exportName, data: Array("disk".utf8))
        let reply = try raw.receive(10)
        #expect(RawNBDSocket.u64(reply, 0) == UInt64(ServerFixture.defaultSize))
        #expect(RawNBDSocket.u16(reply, 8) == Self.writableFlags)
        // The next bytes are the reply to our first request, not padding.
        try raw.sendRequest(type: 0, cookie: 0x1234, offset: 4096, length: 512)
        let header = try raw.readSimpleReply()
        #expect(header.cookie == 0x1234 && header.error == 0)
        #expect(try raw.receive(512) == ImageFile.pattern(count: 512, offset: 4096))
    }

    @Test("NBD_OPT_EXPORT_NAME without NO_ZEROES: 124 zero bytes follow size and flags")
    func exportNameWithZeroes() throws {
        let fixture = try ServerFixture()
        let raw = try RawNBDSocket(unixSocket: fixture.directory.socketPath)
        try raw.handshake(clientFlags: 1)
        try raw.sendOption(.exportName, data: [])  // empty name: the default export
        let reply = try raw.receive(10 + 124)
        #expect(RawNBDSocket.u64(reply, 0) == UInt64(ServerFixture.defaultSize))
        #expect(reply[10...].allSatisfy { $0 == 0 })
        try raw.sendRequest(type: 3, cookie: 5)
        #expect(try raw.readSimpleReply().error == 0)
    }

    @Test("libnbd as an old client: non-fixed newstyle, and fixed newstyle without NO_ZEROES", arguments: [
        NBDHandshakeFlags(), [.fixedNewstyle],
    ])
    func oldClients(flags: NBDHandshakeFlags) throws {
        let fixture = try ServerFixture(filled: true)
        let connection = try fixture.connect { $0.handshakeFlags = flags }
        #expect(try connection.size == UInt64(ServerFixture.defaultSize))
        #expect(try connection.pread(count: 65536, offset: 65536) == ImageFile.pattern(count: 65536, offset: 65536))
        try connection.pwrite(ImageFile.constant(3, count: 4096), offset: 0)
        #expect(try connection.pread(count: 4096, offset: 0) == ImageFile.constant(3, count: 4096))
    }

    @Test("NBD_OPT_GO without a block-size request still works; libnbd then sees the sizes or none")
    func goWithoutBlockSizeRequest() throws {
        let fixture = try ServerFixture()
        let connection = try fixture.connect { $0.requestBlockSize = false }
        #expect(try connection.size == UInt64(ServerFixture.defaultSize))
        try connection.pwrite(ImageFile.constant(1, count: 512), offset: 512)
        #expect(try connection.pread(count: 512, offset: 512) == ImageFile.constant(1, count: 512))
    }

    @Test("option mode: INFO reports size, flags and block sizes; GO then enters transmission")
    func optModeInfoGo() throws {
        let fixture = try ServerFixture(size: 3 << 20, extraArguments: ["--read-only"])
        let connection = try NBDConnection(NBDConnectionConfiguration(metaContexts: ["base:allocation"], optMode: true))
        try connection.connect(unixSocket: fixture.directory.socketPath)
        #expect(connection.isNegotiating)
        try connection.optInfo(exportName: "disk")
        #expect(try connection.size == 3 << 20)
        #expect(try connection.isReadOnly)
        #expect(try connection.blockSizes == NBDBlockSizes(minimum: 512, preferred: 4096, maximum: 32 << 20))
        try connection.optGo()
        #expect(connection.isReady)
        #expect(try connection.canMetaContext("base:allocation"))
        #expect(try connection.pread(count: 4096, offset: 0) == ImageFile.constant(0, count: 4096))
    }

    @Test("NBD_OPT_LIST_META_CONTEXT offers base:allocation and nothing unknown")
    func listMetaContexts() throws {
        let fixture = try ServerFixture()
        let connection = try NBDConnection(NBDConnectionConfiguration(optMode: true))
        try connection.connect(unixSocket: fixture.directory.socketPath)
        #expect(try connection.structuredRepliesNegotiated)
        #expect(try connection.optListMetaContexts(exportName: "disk").contains("base:allocation"))
        #expect(try connection.optListMetaContexts(["base:allocation"], exportName: "disk") == ["base:allocation"])
        #expect(try connection.optListMetaContexts(["nosuch:context"], exportName: "disk") == [])
        #expect(try connection.optListMetaContexts(["base:allocation", "nosuch:context"], exportName: "") == ["base:allocation"])
        try connection.optGo(exportName: "disk")
        #expect(connection.isReady)
    }

    @Test("NBD_OPT_SET_META_CONTEXT selects base:allocation and ignores unknown contexts")
    func setMetaContext() throws {
        let fixture = try ServerFixture()
        let connection = try fixture.connect { $0.metaContexts = ["nosuch:context", "base:allocation", "qemu:nosuch"] }
        #expect(try connection.canMetaContext("base:allocation"))
        #expect(try !connection.canMetaContext("nosuch:context"))
        #expect(try !connection.canMetaContext("qemu:nosuch"))
        let status = try connection.blockStatus(count: 1 << 20, offset: 0)
        #expect(Array(status.keys) == ["base:allocation"])

        // On the wire: exactly one META_CONTEXT reply naming base:allocation, then ACK.
        let raw = try RawNBDSocket(unixSocket: fixture.directory.socketPath)
        try raw.handshake()
        try raw.sendOption(.structuredReply)
        _ = try raw.readOptionReply()
        try raw.sendOption(.setMetaContext, data: RawNBDSocket.metaContextPayload(export: "disk", queries: ["nosuch:context", "base:allocation"]))
        let replies = try raw.readOptionReplies()
        #expect(replies.map(\.type) == [RawNBDSocket.Reply.metaContext.rawValue, RawNBDSocket.Reply.ack.rawValue])
        let context = try #require(replies.first).data
        #expect(String(decoding: context[4...], as: UTF8.self) == "base:allocation")
    }

    @Test("a client that never finishes the handshake does not block others")
    func idleClientDoesNotBlock() throws {
        let fixture = try ServerFixture()
        let idle = try RawNBDSocket(unixSocket: fixture.directory.socketPath)
        _ = try idle.readGreeting()
        // Half an option: the server is waiting for the rest.
        try idle.send(RawNBDSocket.be(UInt32(3)) + RawNBDSocket.be(RawNBDSocket.optionMagic))
        let connection = try fixture.connect()
        #expect(try connection.size == UInt64(ServerFixture.defaultSize))
    }
}
