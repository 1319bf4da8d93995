import NBDProtocol
import NIOCore
import Testing

@Suite("Handshake: greeting, client flags, EXPORT_NAME, ABORT, LIST, STARTTLS")
struct HandshakeBasicsTests {
    @Test("the greeting is NBDMAGIC, IHAVEOPT and handshake flags 0x0003, 18 bytes")
    func greeting() {
        var output = ByteBuffer()
        HandshakeStateMachine().writeGreeting(into: &output)
        let expected: [UInt8] =
            Array("NBDMAGIC".utf8) + Array("IHAVEOPT".utf8) + [0x00, 0x03]
        #expect(output.bytes == expected)
    }

    @Test("client flags 0, 1, 2 and 3 are accepted and consume exactly four bytes", arguments: [UInt32(0), 1, 2, 3])
    func acceptedClientFlags(flags: UInt32) {
        var machine = HandshakeStateMachine()
        var input = ByteBuffer(bytes: Client.flags(flags) + [0xAA])
        var output = ByteBuffer()
        let action = machine.process(&input, catalog: TestCatalog.standard, output: &output)
        #expect(action == .continueNegotiating)
        #expect(input.bytes == [0xAA])
        #expect(output.readableBytes == 0)
    }

    @Test(
        "client flags with an unknown bit close the connection",
        arguments: [UInt32(4), 5, 7, 0x8000_0000, 0x8000_0003, 0xFFFF_FFFF, 0x0000_0100])
    func unknownClientFlags(flags: UInt32) {
        var driver = HandshakeDriver()
        let output = driver.feed(Client.flags(flags))
        #expect(driver.outcome == .close(.unknownClientFlags(flags)))
        #expect(output.isEmpty)
    }

    @Test("client flags arriving in pieces wait for all four bytes")
    func partialClientFlags() {
        var machine = HandshakeStateMachine()
        var input = ByteBuffer(bytes: [0, 0, 0])
        var output = ByteBuffer()
        #expect(machine.process(&input, catalog: TestCatalog.standard, output: &output) == .needMoreData)
        #expect(input.readableBytes == 3)
        input.writeBytes([3])
        #expect(machine.process(&input, catalog: TestCatalog.standard, output: &output) == .continueNegotiating)
        #expect(input.readableBytes == 0)
    }

    @Test(
        "a non-fixed-newstyle client may only send EXPORT_NAME",
        arguments: [Wire.optList, Wire.optInfo, Wire.optGo, Wire.optStructuredReply, Wire.optAbort, 0xdead_beef])
    func nonFixedNewstyleClient(option: UInt32) {
        var driver = HandshakeDriver.negotiating(flags: 0)
        let output = driver.feed(Client.option(option))
        #expect(driver.outcome == .close(.optionNotAllowedWithoutFixedNewstyle(option)))
        #expect(output.isEmpty)
    }

    @Test("a non-fixed-newstyle client gets EXPORT_NAME with the 124 zero bytes")
    func nonFixedNewstyleExportName() throws {
        var driver = HandshakeDriver.negotiating(flags: 0)
        let output = driver.feed(Client.option(Wire.optExportName, Array("disk".utf8)))
        var expected = Bytes()
        expected.u64(1 << 30)
        expected.u16(ExpectedFlags.writable)
        expected.raw([UInt8](repeating: 0, count: 124))
        #expect(output == expected.bytes)
        #expect(driver.session?.exportName == "disk")
    }

    @Test("EXPORT_NAME without NO_ZEROES: 134 bytes (size, flags, 124 zeroes)")
    func exportNameWithZeroes() throws {
        var driver = HandshakeDriver.negotiating(flags: 1)
        let output = driver.feed(Client.option(Wire.optExportName, Array("ro".utf8)))
        #expect(output.count == 134)
        var reader = ByteReader(output)
        let size = reader.u64()
        let flags = reader.u16()
        let rest = reader.rest()
        #expect(size == 1000)
        #expect(flags == ExpectedFlags.readOnly)
        #expect(rest == [UInt8](repeating: 0, count: 124))
        let session = try #require(driver.session)
        #expect(
            session
                == NBDSession(
                    exportName: "ro", size: 1000,
                    transmissionFlags: NBDTransmissionFlags(rawValue: ExpectedFlags.readOnly),
                    structuredReplies: false, metaContexts: [], minimumBlockSize: 1, enforcesBlockSize: false))
    }

    @Test("EXPORT_NAME with NO_ZEROES: exactly 10 bytes")
    func exportNameNoZeroes() throws {
        var driver = HandshakeDriver.negotiating(flags: 3)
        let output = driver.feed(Client.option(Wire.optExportName, Array("disk".utf8)))
        var expected = Bytes()
        expected.u64(1 << 30)
        expected.u16(ExpectedFlags.writable)
        #expect(output == expected.bytes)
        let session = try #require(driver.session)
        #expect(session.size == 1 << 30)
        #expect(session.transmissionFlags.rawValue == ExpectedFlags.writable)
        #expect(session.minimumBlockSize == 512)
        #expect(session.enforcesBlockSize == false)
        #expect(session.structuredReplies == false)
    }

    @Test("EXPORT_NAME after STRUCTURED_REPLY advertises SEND_DF and carries structured replies")
    func exportNameAfterStructuredReply() throws {
        var driver = HandshakeDriver.negotiating()
        _ = try driver.send(Client.structuredReply)
        let output = driver.feed(Client.option(Wire.optExportName, Array("disk".utf8)))
        var reader = ByteReader(output)
        let size = reader.u64()
        let flags = reader.u16()
        #expect(size == 1 << 30)
        #expect(flags == ExpectedFlags.writable | ExpectedFlags.sendDF)
        #expect(reader.remaining == 0)
        #expect(driver.session?.structuredReplies == true)
    }

    @Test("EXPORT_NAME for an unknown export hard-disconnects without output")
    func exportNameUnknown() {
        var driver = HandshakeDriver.negotiating()
        let output = driver.feed(Client.option(Wire.optExportName, Array("nope".utf8)))
        #expect(driver.outcome == .close(.unknownExport("nope")))
        #expect(output.isEmpty)
    }

    @Test("EXPORT_NAME with a NUL byte or invalid UTF-8 in the name closes", arguments: [[0x64, 0x00], [0xFF, 0xFE]])
    func exportNameInvalid(name: [UInt8]) {
        var driver = HandshakeDriver.negotiating()
        let output = driver.feed(Client.option(Wire.optExportName, name))
        #expect(driver.outcome == .close(.invalidExportName))
        #expect(output.isEmpty)
    }

    @Test("EXPORT_NAME with an empty name selects the first export")
    func exportNameEmpty() throws {
        var driver = HandshakeDriver.negotiating()
        let output = driver.feed(Client.option(Wire.optExportName))
        #expect(output.count == 10)
        #expect(driver.session?.exportName == "disk")
        #expect(driver.session?.size == 1 << 30)
    }

    @Test("ABORT is acknowledged, then the machine says abort (data is ignored)", arguments: [[], [1, 2, 3]])
    func abort(data: [UInt8]) throws {
        var driver = HandshakeDriver.negotiating()
        let replies = try driver.send(Client.option(Wire.optAbort, data))
        #expect(replies == [OptionReply(option: Wire.optAbort, type: Wire.repAck, data: [])])
        #expect(driver.outcome == .abort)
    }

    @Test("after the handshake ends the machine ignores further input")
    func finishedIgnoresInput() {
        var driver = HandshakeDriver.negotiating()
        _ = driver.feed(Client.option(Wire.optAbort))
        var input = ByteBuffer(bytes: Client.structuredReply)
        var output = ByteBuffer()
        #expect(driver.machine.process(&input, catalog: TestCatalog.standard, output: &output) == .needMoreData)
        #expect(output.readableBytes == 0)
        #expect(input.readableBytes == 16)
    }

    @Test("LIST sends one NBD_REP_SERVER per export (u32 name length, name, description), then ACK")
    func list() throws {
        var driver = HandshakeDriver.negotiating()
        let output = driver.feed(Client.option(Wire.optList))
        var expected = Bytes()
        for (name, description) in [("disk", "the main disk"), ("ro", ""), ("bitmaps", "many contexts")] {
            expected.u64(Wire.replyMagic)
            expected.u32(Wire.optList)
            expected.u32(Wire.repServer)
            expected.u32(UInt32(4 + name.utf8.count + description.utf8.count))
            expected.u32(UInt32(name.utf8.count))
            expected.string(name)
            expected.string(description)
        }
        expected.u64(Wire.replyMagic)
        expected.u32(Wire.optList)
        expected.u32(Wire.repAck)
        expected.u32(0)
        #expect(output == expected.bytes)
        #expect(driver.outcome == .needMoreData)
        let servers = try OptionReplyParser.parse(output).compactMap(\.server)
        #expect(servers.map(\.name) == ["disk", "ro", "bitmaps"])
    }

    @Test("LIST with data gets ERR_INVALID and negotiation continues")
    func listWithData() throws {
        var driver = HandshakeDriver.negotiating()
        let replies = try driver.send(Client.option(Wire.optList, [0]))
        #expect(replies.count == 1)
        #expect(replies.first?.option == Wire.optList)
        #expect(replies.first?.type == Wire.errInvalid)
        #expect(driver.outcome == .needMoreData)
        #expect(try driver.send(Client.option(Wire.optList)).last?.type == Wire.repAck)
    }

    @Test("STARTTLS without TLS configured gets ERR_POLICY; with data ERR_INVALID")
    func startTLS() throws {
        var driver = HandshakeDriver.negotiating()
        let plain = try driver.send(Client.option(Wire.optStartTLS))
        #expect(plain.map(\.type) == [Wire.errPolicy])
        #expect(plain.first?.option == Wire.optStartTLS)
        let withData = try driver.send(Client.option(Wire.optStartTLS, [1, 2]))
        #expect(withData.map(\.type) == [Wire.errInvalid])
        #expect(driver.outcome == .needMoreData)
    }

    @Test("error replies carry a readable UTF-8 message no longer than 4096 bytes")
    func errorMessages() throws {
        var driver = HandshakeDriver.negotiating()
        let replies = try driver.send(Client.option(Wire.optStartTLS))
        let message = try #require(replies.first?.data)
        #expect(!message.isEmpty && message.count <= 4096)
        #expect(String(validating: message, as: UTF8.self) != nil)
    }
}

@Suite("Handshake: STRUCTURED_REPLY, unknown options, limits")
struct HandshakeOptionTests {
    @Test("STRUCTURED_REPLY is acknowledged once; a second time gets ERR_INVALID")
    func structuredReply() throws {
        var driver = HandshakeDriver.negotiating()
        #expect(
            try driver.send(Client.structuredReply)
                == [OptionReply(option: Wire.optStructuredReply, type: Wire.repAck, data: [])])
        let second = try driver.send(Client.structuredReply)
        #expect(second.map(\.type) == [Wire.errInvalid])
        #expect(second.first?.option == Wire.optStructuredReply)
        _ = driver.feed(Client.go("disk"))
        #expect(driver.session?.structuredReplies == true)
    }

    @Test("with structured replies turned off, STRUCTURED_REPLY gets ERR_UNSUP and negotiation goes on without them")
    func structuredRepliesTurnedOff() throws {
        var driver = HandshakeDriver.negotiating(offersStructuredReplies: false)
        for _ in 0..<2 {
            let replies = try driver.send(Client.structuredReply)
            #expect(replies.map(\.type) == [Wire.errUnsup])
            #expect(replies.first?.option == Wire.optStructuredReply)
        }
        // No metadata contexts without structured replies.
        #expect(try driver.send(Client.setMeta("disk", ["base:allocation"])).map(\.type) == [Wire.errInvalid])
        _ = driver.feed(Client.go("disk"))
        let session = try #require(driver.session)
        #expect(session.structuredReplies == false)
        #expect(session.metaContexts.isEmpty)
        #expect(!session.transmissionFlags.contains(.sendDF))
    }

    @Test("STRUCTURED_REPLY with data gets ERR_INVALID and does not negotiate")
    func structuredReplyWithData() throws {
        var driver = HandshakeDriver.negotiating()
        #expect(try driver.send(Client.option(Wire.optStructuredReply, [0])).map(\.type) == [Wire.errInvalid])
        // Not negotiated: SET_META_CONTEXT is still refused...
        #expect(try driver.send(Client.setMeta("disk", ["base:allocation"])).map(\.type) == [Wire.errInvalid])
        // ...and a proper request still succeeds.
        #expect(try driver.send(Client.structuredReply).map(\.type) == [Wire.repAck])
    }

    @Test(
        "unknown options get ERR_UNSUP, their data is drained and the next option works",
        arguments: [UInt32(4), 0xdead_beef, 0, 12, 13, 0x8000_0001])
    func unknownOption(option: UInt32) throws {
        var driver = HandshakeDriver.negotiating()
        let payload: [UInt8] = Array("some payload bytes".utf8)
        // Send the unknown option and a LIST in one buffer.
        let output = driver.feed(Client.option(option, payload) + Client.option(Wire.optList))
        let replies = try OptionReplyParser.parse(output)
        #expect(replies.first?.option == option)
        #expect(replies.first?.type == Wire.errUnsup)
        #expect(replies.dropFirst().allSatisfy { $0.option == Wire.optList })
        #expect(replies.last?.type == Wire.repAck)
        #expect(driver.input.readableBytes == 0)
        #expect(driver.outcome == .needMoreData)
    }

    @Test("an unknown option with exactly 1 MiB of data is drained and refused")
    func unknownOptionMaximumLength() throws {
        var driver = HandshakeDriver.negotiating()
        let data = [UInt8](repeating: 0x5A, count: 1 << 20)
        let replies = try driver.send(Client.option(0x4242, data))
        #expect(replies.map(\.type) == [Wire.errUnsup])
        #expect(driver.input.readableBytes == 0)
    }

    @Test("a wrong option magic closes the connection", arguments: [UInt64(0), 0x4948_4156_454F_5055, Wire.nbdMagic])
    func badOptionMagic(magic: UInt64) {
        var driver = HandshakeDriver.negotiating()
        var bytes = Bytes()
        bytes.u64(magic)
        bytes.u32(Wire.optList)
        bytes.u32(0)
        let output = driver.feed(bytes.bytes)
        #expect(driver.outcome == .close(.badOptionMagic(magic)))
        #expect(output.isEmpty)
    }

    @Test(
        "an option longer than 1 MiB closes before its data arrives",
        arguments: [UInt32(1 << 20) + 1, 32 << 20, 0xFFFF_FFFF])
    func optionTooLong(length: UInt32) {
        var driver = HandshakeDriver.negotiating()
        let output = driver.feed(Client.option(Wire.optList, length: length))
        #expect(driver.outcome == .close(.optionTooLong(length)))
        #expect(output.isEmpty)
    }

    @Test("an option whose data has not all arrived waits without consuming anything")
    func optionIncomplete() {
        var driver = HandshakeDriver.negotiating()
        let output = driver.feed(Client.option(0x77, [1, 2, 3, 4, 5], length: 10))
        #expect(output.isEmpty)
        #expect(driver.outcome == .needMoreData)
        #expect(driver.input.readableBytes == 16 + 5)
    }

    @Test("512 options are answered; the 513th closes the connection")
    func tooManyOptions() throws {
        var driver = HandshakeDriver.negotiating()
        for _ in 0..<512 {
            let replies = try driver.send(Client.option(0x99))
            #expect(replies.count == 1)
            guard replies.count == 1 else { return }
        }
        #expect(driver.outcome == .needMoreData)
        let output = driver.feed(Client.go("disk"))
        #expect(driver.outcome == .close(.tooManyOptions))
        #expect(output.isEmpty)
    }

    @Test("the 512th option may still be GO")
    func fiveHundredTwelfthOptionIsGo() throws {
        var driver = HandshakeDriver.negotiating()
        for _ in 0..<511 { _ = try driver.send(Client.option(0x99)) }
        _ = try driver.send(Client.go("disk"))
        #expect(driver.session?.exportName == "disk")
    }

    /// A full negotiation: every option kind, ending in GO with a request behind it.
    static var scriptedNegotiation: [UInt8] {
        Client.flags(3) + Client.option(Wire.optList) + Client.option(11) + Client.structuredReply
            + Client.listMeta("disk", []) + Client.setMeta("disk", ["base:allocation", "qemu:dirty-bitmap:b0"])
            + Client.info("ro", [Wire.infoName, Wire.infoDescription]) + Client.option(Wire.optStartTLS)
            + Client.go("disk", [Wire.infoBlockSize])
            + Client.request(type: Wire.cmdRead, length: 512)
    }

    @Test("options fed byte by byte produce the same output and actions as one buffer")
    func byteByByte() throws {
        let script = Self.scriptedNegotiation
        var whole = HandshakeDriver()
        let wholeOutput = whole.feed(script)

        var split = HandshakeDriver()
        var splitOutput: [UInt8] = []
        for byte in script { splitOutput += split.feed([byte]) }

        #expect(splitOutput == wholeOutput)
        #expect(split.actions.filter { $0 != .needMoreData } == whole.actions.filter { $0 != .needMoreData })
        #expect(split.session == whole.session)
        #expect(split.session != nil)
        // The pipelined request stays in the input for the transmission phase.
        #expect(whole.input.bytes == Client.request(type: Wire.cmdRead, length: 512))
        #expect(split.input.bytes == Client.request(type: Wire.cmdRead, length: 512))
        // And every reply in it is well formed.
        let replies = try OptionReplyParser.parse(wholeOutput)
        #expect(replies.count == 22)
    }

    @Test("every option reply's length field matches its body and echoes the option")
    func repliesWellFormed() throws {
        var driver = HandshakeDriver()
        _ = driver.feed(Client.flags(3))
        let options: [[UInt8]] = [
            Client.option(Wire.optList), Client.option(Wire.optList, [1]), Client.option(7777, [1, 2, 3]),
            Client.structuredReply, Client.structuredReply, Client.listMeta("", []),
            Client.listMeta("bitmaps", ["qemu:"]), Client.setMeta("bitmaps", ["base:allocation", "qemu:dirty-bitmap:b1"]),
            Client.info("disk", [Wire.infoName, Wire.infoDescription, Wire.infoBlockSize]), Client.info("x"),
            Client.option(Wire.optInfo, [0, 0]), Client.option(Wire.optStartTLS),
        ]
        for option in options {
            var header = ByteReader(option)
            _ = header.u64()
            let code = header.u32() ?? 0
            let output = driver.feed(option)
            let replies = try OptionReplyParser.parse(output)
            #expect(!replies.isEmpty)
            #expect(replies.allSatisfy { $0.option == code })
            // Exactly the last reply is final (ACK or error).
            #expect(replies.dropLast().allSatisfy { !$0.isError && $0.type != Wire.repAck })
            #expect(replies.last.map { $0.isError || $0.type == Wire.repAck } == true)
            #expect(replies.filter { $0.type == Wire.repAck }.allSatisfy { $0.data.isEmpty })
        }
    }
}
