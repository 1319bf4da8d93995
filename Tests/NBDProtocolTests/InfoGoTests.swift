import NBDProtocol
import NIOCore
import Testing

/// Decoded payloads of the NBD_REP_INFO replies of one INFO/GO.
private struct InfoReplies {
    var export: (size: UInt64, flags: UInt16)?
    var blockSize: (minimum: UInt32, preferred: UInt32, maximum: UInt32)?
    var name: String?
    var description: String?
    var types: [UInt16] = []
    var lengths: [UInt16: Int] = [:]

    init(_ replies: [OptionReply]) {
        for reply in replies {
            guard let info = reply.info else { continue }
            types.append(info.type)
            lengths[info.type] = reply.data.count
            var reader = ByteReader(info.payload)
            switch info.type {
            case Wire.infoExport:
                if let size = reader.u64(), let flags = reader.u16() { export = (size, flags) }
            case Wire.infoBlockSize:
                if let minimum = reader.u32(), let preferred = reader.u32(), let maximum = reader.u32() {
                    blockSize = (minimum, preferred, maximum)
                }
            case Wire.infoName:
                name = String(decoding: info.payload, as: UTF8.self)
            case Wire.infoDescription:
                description = String(decoding: info.payload, as: UTF8.self)
            default:
                break
            }
        }
    }
}

@Suite("Handshake: INFO and GO")
struct InfoGoTests {
    @Test("INFO without requests: BLOCK_SIZE (14 bytes) before EXPORT (12 bytes), then ACK; stays negotiating")
    func infoDisk() throws {
        var driver = HandshakeDriver.negotiating()
        let replies = try driver.send(Client.info("disk"))
        #expect(replies.allSatisfy { $0.option == Wire.optInfo })
        #expect(replies.last == OptionReply(option: Wire.optInfo, type: Wire.repAck, data: []))
        #expect(replies.dropLast().allSatisfy { $0.type == Wire.repInfo })
        let infos = InfoReplies(replies)
        #expect(infos.lengths[Wire.infoBlockSize] == 14)
        #expect(infos.lengths[Wire.infoExport] == 12)
        #expect(infos.blockSize?.minimum == 512)
        #expect(infos.blockSize?.preferred == 4096)
        #expect(infos.blockSize?.maximum == 32 << 20)
        #expect(infos.export?.size == 1 << 30)
        #expect(infos.export?.flags == ExpectedFlags.writable)
        let blockIndex = try #require(infos.types.firstIndex(of: Wire.infoBlockSize))
        let exportIndex = try #require(infos.types.firstIndex(of: Wire.infoExport))
        #expect(blockIndex < exportIndex)
        // NAME is only sent on request.
        #expect(infos.name == nil)
        #expect(driver.outcome == .needMoreData)
        #expect(driver.session == nil)
    }

    @Test("the exact bytes of INFO_EXPORT and INFO_BLOCK_SIZE for the read-only, unaligned export")
    func infoReadOnlyBytes() throws {
        var driver = HandshakeDriver.negotiating()
        let replies = try driver.send(Client.info("ro", [Wire.infoBlockSize]))
        var export = Bytes()
        export.u16(Wire.infoExport)
        export.u64(1000)
        export.u16(ExpectedFlags.readOnly)
        var block = Bytes()
        block.u16(Wire.infoBlockSize)
        block.u32(1)
        block.u32(4096)
        block.u32(33_554_432)
        #expect(replies.contains(OptionReply(option: Wire.optInfo, type: Wire.repInfo, data: export.bytes)))
        #expect(replies.contains(OptionReply(option: Wire.optInfo, type: Wire.repInfo, data: block.bytes)))
        // "ro" has no description, and none was asked for.
        #expect(InfoReplies(replies).description == nil)
        #expect(replies.count == 3)
    }

    @Test("SEND_DF is advertised only after STRUCTURED_REPLY", arguments: [false, true])
    func sendDFFollowsStructuredReplies(structured: Bool) throws {
        var driver = HandshakeDriver.negotiating()
        if structured { _ = try driver.send(Client.structuredReply) }
        let disk = InfoReplies(try driver.send(Client.info("disk")))
        let readOnly = InfoReplies(try driver.send(Client.info("ro")))
        let df: UInt16 = structured ? ExpectedFlags.sendDF : 0
        #expect(disk.export?.flags == ExpectedFlags.writable | df)
        #expect(readOnly.export?.flags == ExpectedFlags.readOnly | df)
    }

    @Test("writable exports advertise TRIM, WRITE_ZEROES, FAST_ZERO and not READ_ONLY; read-only the opposite")
    func flagBitsByExport() throws {
        var driver = HandshakeDriver.negotiating()
        let disk = try #require(InfoReplies(try driver.send(Client.info("disk"))).export?.flags)
        let readOnly = try #require(InfoReplies(try driver.send(Client.info("ro"))).export?.flags)
        let trim: UInt16 = 0x20
        let zeroes: UInt16 = 0x40
        let fastZero: UInt16 = 0x800
        let ro: UInt16 = 0x2
        for flags in [disk, readOnly] {
            // HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_CACHE, CAN_MULTI_CONN always.
            #expect(flags & 0x0001 != 0)
            #expect(flags & 0x0004 != 0)
            #expect(flags & 0x0008 != 0)
            #expect(flags & 0x0400 != 0)
            #expect(flags & 0x0100 != 0)
            // Never ROTATIONAL, RESIZE, or extension bits.
            #expect(flags & 0x0010 == 0)
            #expect(flags & 0x0200 == 0)
            #expect(flags & 0xF000 == 0)
        }
        #expect(disk & (trim | zeroes | fastZero) == trim | zeroes | fastZero)
        #expect(disk & ro == 0)
        #expect(readOnly & (trim | zeroes | fastZero) == 0)
        #expect(readOnly & ro == ro)
    }

    @Test("NAME is sent on request with the canonical name, even for the empty (default) name")
    func infoName() throws {
        var driver = HandshakeDriver.negotiating()
        #expect(InfoReplies(try driver.send(Client.info("disk", [Wire.infoName]))).name == "disk")
        let byDefault = try driver.send(Client.info("", [Wire.infoName]))
        #expect(InfoReplies(byDefault).name == "disk")
        #expect(InfoReplies(byDefault).export?.size == 1 << 30)
        let nameReply = try #require(byDefault.first { $0.info?.type == Wire.infoName })
        #expect(nameReply.data == [0, 1] + Array("disk".utf8))
    }

    @Test("DESCRIPTION is sent on request, even when empty")
    func infoDescription() throws {
        var driver = HandshakeDriver.negotiating()
        let disk = try driver.send(Client.info("disk", [Wire.infoDescription]))
        #expect(InfoReplies(disk).description == "the main disk")
        let description = try #require(disk.first { $0.info?.type == Wire.infoDescription })
        #expect(description.data == [0, 2] + Array("the main disk".utf8))
        let readOnly = try driver.send(Client.info("ro", [Wire.infoDescription]))
        #expect(InfoReplies(readOnly).description == "")
        #expect(InfoReplies(readOnly).lengths[Wire.infoDescription] == 2)
    }

    @Test("unknown information requests are ignored")
    func unknownInfoRequest() throws {
        var driver = HandshakeDriver.negotiating()
        let replies = try driver.send(Client.info("ro", [0x7777, 4, 0xFFFF]))
        #expect(replies.last?.type == Wire.repAck)
        #expect(InfoReplies(replies).types.sorted() == [Wire.infoExport, Wire.infoBlockSize])
    }

    @Test("INFO or GO for an unknown export gets ERR_UNKNOWN and negotiation continues", arguments: [Wire.optInfo, Wire.optGo])
    func unknownExport(option: UInt32) throws {
        var driver = HandshakeDriver.negotiating()
        let replies = try driver.send(Client.option(option, Client.infoPayload(name: "missing", requests: [])))
        #expect(replies.count == 1)
        #expect(replies.first?.option == option)
        #expect(replies.first?.type == Wire.errUnknown)
        #expect(driver.outcome == .needMoreData)
        _ = try driver.send(Client.go("ro"))
        #expect(driver.session?.exportName == "ro")
    }

    /// INFO/GO payloads whose lengths do not add up.
    static let malformedPayloads: [[UInt8]] = {
        var cases: [[UInt8]] = [[], [0, 0, 0, 0, 0], [0, 0, 0]]
        // Name length larger than optlen - 6.
        var b = Bytes()
        b.u32(5)
        b.string("disk")
        b.u16(0)
        cases.append(b.bytes)
        // Name length of 2^32 - 1.
        b = Bytes()
        b.u32(0xFFFF_FFFF)
        b.u16(0)
        cases.append(b.bytes)
        // Request count says 2, only one request present.
        b = Bytes()
        b.u32(4)
        b.string("disk")
        b.u16(2)
        b.u16(Wire.infoName)
        cases.append(b.bytes)
        // Request count says 0, but a request follows.
        b = Bytes()
        b.u32(4)
        b.string("disk")
        b.u16(0)
        b.u16(Wire.infoName)
        cases.append(b.bytes)
        // Odd trailing byte.
        cases.append(Client.infoPayload(name: "disk", requests: [Wire.infoName]) + [0])
        // Name is not valid UTF-8.
        b = Bytes()
        b.u32(2)
        b.raw([0xC3, 0x28])
        b.u16(0)
        cases.append(b.bytes)
        return cases
    }()

    @Test("malformed INFO/GO lengths get ERR_INVALID and negotiation continues", arguments: malformedPayloads)
    func malformed(payload: [UInt8]) throws {
        for option in [Wire.optInfo, Wire.optGo] {
            var driver = HandshakeDriver.negotiating()
            let replies = try driver.send(Client.option(option, payload))
            #expect(replies.map(\.type) == [Wire.errInvalid], "option \(option)")
            #expect(replies.first?.option == option)
            #expect(driver.outcome == .needMoreData)
            #expect(driver.input.readableBytes == 0)
            _ = try driver.send(Client.go("disk"))
            #expect(driver.session?.exportName == "disk")
        }
    }

    @Test("GO enters transmission with the negotiated session")
    func goSession() throws {
        var driver = HandshakeDriver.negotiating()
        _ = try driver.send(Client.structuredReply)
        let replies = try driver.send(Client.go("disk", [Wire.infoBlockSize]))
        #expect(replies.last == OptionReply(option: Wire.optGo, type: Wire.repAck, data: []))
        #expect(InfoReplies(replies).export?.flags == ExpectedFlags.writable | ExpectedFlags.sendDF)
        let session = try #require(driver.session)
        #expect(
            session
                == NBDSession(
                    exportName: "disk", size: 1 << 30,
                    transmissionFlags: NBDTransmissionFlags(rawValue: ExpectedFlags.writable | ExpectedFlags.sendDF),
                    structuredReplies: true, metaContexts: [], minimumBlockSize: 512, enforcesBlockSize: true))
    }

    @Test("GO with the empty name enters the first export")
    func goDefault() throws {
        var driver = HandshakeDriver.negotiating()
        _ = try driver.send(Client.go(""))
        #expect(driver.session?.exportName == "disk")
    }

    @Test("enforcesBlockSize only when GO itself requested BLOCK_SIZE")
    func enforcesBlockSize() throws {
        var withRequest = HandshakeDriver.negotiating()
        _ = try withRequest.send(Client.go("disk", [Wire.infoName, Wire.infoBlockSize]))
        #expect(withRequest.session?.enforcesBlockSize == true)

        var without = HandshakeDriver.negotiating()
        _ = try without.send(Client.go("disk", [Wire.infoName]))
        #expect(without.session?.enforcesBlockSize == false)

        // Seeing the sizes in INFO does not commit the client.
        var infoFirst = HandshakeDriver.negotiating()
        _ = try infoFirst.send(Client.info("disk", [Wire.infoBlockSize]))
        _ = try infoFirst.send(Client.go("disk"))
        #expect(infoFirst.session?.enforcesBlockSize == false)
    }

    @Test("INFO followed by GO with the same parameters returns the same information")
    func infoThenGoSame() throws {
        var driver = HandshakeDriver.negotiating()
        let requests = [Wire.infoName, Wire.infoDescription, Wire.infoBlockSize]
        let info = try driver.send(Client.info("disk", requests))
        let go = try driver.send(Client.go("disk", requests))
        #expect(info.map(\.type) == go.map(\.type))
        #expect(info.map(\.data) == go.map(\.data))
        #expect(go.allSatisfy { $0.option == Wire.optGo })
    }

    @Test("bytes after GO stay in the input for the transmission phase")
    func pipelinedRequest() throws {
        var driver = HandshakeDriver.negotiating()
        let request = Client.request(type: Wire.cmdRead, cookie: 9, offset: 0, length: 4096)
        _ = driver.feed(Client.go("disk") + request)
        #expect(driver.session != nil)
        #expect(driver.input.bytes == request)
    }
}

@Suite("Handshake: INFO/GO edge cases")
struct InfoGoEdgeTests {
    @Test("asking for INFO_EXPORT explicitly (and twice) still yields exactly one")
    func explicitExportRequest() throws {
        var driver = HandshakeDriver.negotiating()
        let replies = try driver.send(Client.info("disk", [Wire.infoExport, Wire.infoExport, Wire.infoName, Wire.infoName]))
        let types = replies.compactMap(\.info?.type)
        #expect(types.filter { $0 == Wire.infoExport }.count == 1)
        #expect(types.filter { $0 == Wire.infoName }.count == 1)
        #expect(types.filter { $0 == Wire.infoBlockSize }.count == 1)
    }

    @Test("an unknown 4096-byte export name gets ERR_UNKNOWN with a message of at most 4096 bytes")
    func longUnknownName() throws {
        let name = String(repeating: "n", count: 4096)
        for option in [Wire.optInfo, Wire.optGo, Wire.optListMeta] {
            var driver = HandshakeDriver.negotiating()
            let payload =
                option == Wire.optListMeta
                ? Client.metaPayload(name: name, queries: []) : Client.infoPayload(name: name, requests: [])
            let replies = try driver.send(Client.option(option, payload))
            #expect(replies.map(\.type) == [Wire.errUnknown])
            let message = try #require(replies.first?.data)
            #expect(message.count <= 4096)
            #expect(String(validating: message, as: UTF8.self) != nil)
        }
    }

    @Test("an export name over 4096 bytes is invalid")
    func overlongName() throws {
        let name = String(repeating: "n", count: 4097)
        var driver = HandshakeDriver.negotiating()
        #expect(try driver.send(Client.info(name)).map(\.type) == [Wire.errInvalid])
        #expect(try driver.send(Client.listMeta(name, [])).map(\.type) == [Wire.errInvalid])
        _ = driver.feed(Client.option(Wire.optExportName, Array(name.utf8)))
        #expect(driver.outcome == .close(.invalidExportName))
    }

    @Test("a multi-byte UTF-8 export name is matched byte for byte")
    func utf8Names() throws {
        var catalog = TestCatalog.standard
        catalog.exports.append(
            NBDExportSummary(
                name: "dïsk-ü", description: "ünïcode", size: 4096, isReadOnly: true, minimumBlockSize: 512,
                metaContexts: []))
        var driver = HandshakeDriver.negotiating(catalog: catalog)
        let list = try driver.send(Client.option(Wire.optList))
        let server = try #require(list.compactMap(\.server).first { $0.name == "dïsk-ü" })
        #expect(server.description == "ünïcode")
        let replies = try driver.send(Client.go("dïsk-ü", [Wire.infoName]))
        #expect(replies.last?.type == Wire.repAck)
        #expect(driver.session?.exportName == "dïsk-ü")
        #expect(driver.session?.size == 4096)
    }
}
