import NBDProtocol
import NIOCore
import Testing

/// A malformed reply seen by a test.
struct HarnessFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// The extended-header wire forms written out by hand from the spec's layout, so the tests
/// do not merely echo the encoder.
enum ExtendedWire {
    static let requestMagic: UInt32 = 0x21e4_1c71
    static let replyMagic: UInt32 = 0x6e8a_278c
    static let flagPayloadLength: UInt16 = 1 << 5
    static let errExtHeaderReqd: UInt32 = 0x8000_000A
    static let chunkNone: UInt16 = 0
    static let chunkOffsetData: UInt16 = 1
    static let chunkOffsetHole: UInt16 = 2
    static let chunkBlockStatus: UInt16 = 5
    static let chunkBlockStatusExt: UInt16 = 6
    static let chunkError: UInt16 = 0x8001

    /// A 32-byte extended request header (plus `payload`).
    static func request(
        type: UInt16, flags: UInt16 = 0, cookie: UInt64 = 0x1122_3344_5566_7788, offset: UInt64 = 0,
        length: UInt64 = 0, payload: [UInt8] = [], magic: UInt32 = requestMagic
    ) -> [UInt8] {
        var b = Bytes()
        b.u32(magic)
        b.u16(flags)
        b.u16(type)
        b.u64(cookie)
        b.u64(offset)
        b.u64(length)
        b.raw(payload)
        return b.bytes
    }

    /// One extended reply chunk: magic, flags, type, cookie, offset, 64-bit length, payload.
    struct Chunk: Equatable {
        var flags: UInt16
        var type: UInt16
        var cookie: UInt64
        var offset: UInt64
        var payload: [UInt8]
    }

    /// Splits `bytes` into extended chunks; fails on anything else.
    static func chunks(_ bytes: [UInt8]) throws -> [Chunk] {
        var reader = ByteReader(bytes)
        var result: [Chunk] = []
        while reader.remaining > 0 {
            guard let magic = reader.u32(), let flags = reader.u16(), let type = reader.u16(), let cookie = reader.u64(),
                let offset = reader.u64(), let length = reader.u64(), length <= UInt64(reader.remaining),
                let payload = reader.bytes(Int(length))
            else { throw HarnessFailure("truncated extended chunk at byte \(reader.position) of \(bytes.count)") }
            guard magic == replyMagic else { throw HarnessFailure("magic \(String(magic, radix: 16)), not an extended reply") }
            result.append(Chunk(flags: flags, type: type, cookie: cookie, offset: offset, payload: payload))
        }
        return result
    }
}

@Suite("Extended headers: request decoding")
struct ExtendedRequestDecoderTests {
    @Test("a 32-byte header is decoded field by field with a 64-bit length, exactly 32 bytes consumed")
    func headerFields() throws {
        var decoder = NBDRequestDecoder(framing: .extended)
        var buffer = ByteBuffer(
            bytes: ExtendedWire.request(type: Wire.cmdTrim, flags: Wire.flagFUA, cookie: 7, offset: 1 << 40, length: 5 << 30)
                + [0xEE])
        let request = try #require(decoder.decode(&buffer).request)
        #expect(request.type == Wire.cmdTrim)
        #expect(request.flags == [.fua])
        #expect(request.cookie == 7)
        #expect(request.offset == 1 << 40)
        #expect(request.length == 5 << 30)
        #expect(request.defect == nil)
        #expect(buffer.bytes == [0xEE])
    }

    @Test("WRITE with PAYLOAD_LEN: the payload is a slice of the input, the next request follows")
    func writeWithPayload() throws {
        var decoder = NBDRequestDecoder(framing: .extended)
        let data = (0..<4096).map { UInt8(truncatingIfNeeded: $0) }
        let next = ExtendedWire.request(type: Wire.cmdFlush, cookie: 2)
        var buffer = ByteBuffer(
            bytes: ExtendedWire.request(
                type: Wire.cmdWrite, flags: ExtendedWire.flagPayloadLength, cookie: 1, offset: 512, length: 4096,
                payload: data) + next)
        #expect(decoder.bytesNeeded(in: buffer) == 32 + 4096)
        let request = try #require(decoder.decode(&buffer).request)
        #expect(request.payload?.readableBytesView.elementsEqual(data) == true)
        #expect(request.defect == nil)
        #expect(try #require(decoder.decode(&buffer).request).cookie == 2)
    }

    @Test("a WRITE split across reads waits for the whole payload")
    func writeSplit() throws {
        var decoder = NBDRequestDecoder(framing: .extended)
        let bytes = ExtendedWire.request(
            type: Wire.cmdWrite, flags: ExtendedWire.flagPayloadLength, length: 100, payload: [UInt8](repeating: 9, count: 100))
        var buffer = ByteBuffer(bytes: bytes[0..<20])
        #expect(decoder.bytesMissing(in: buffer) == 12)
        #expect(decoder.decode(&buffer).isNeedMoreData)
        buffer.writeBytes(bytes[20..<60])
        #expect(decoder.bytesMissing(in: buffer) == 72)
        #expect(decoder.decode(&buffer).isNeedMoreData)
        buffer.writeBytes(bytes[60...])
        #expect(try #require(decoder.decode(&buffer).request).payload?.readableBytes == 100)
    }

    @Test("WRITE without PAYLOAD_LEN (as qemu 10's client sends it): the data follows all the same and is taken")
    func writeWithoutPayloadLength() throws {
        var decoder = NBDRequestDecoder(framing: .extended)
        let next = ExtendedWire.request(type: Wire.cmdFlush, cookie: 2)
        let data = [UInt8](repeating: 0xAA, count: 4096)
        var buffer = ByteBuffer(bytes: ExtendedWire.request(type: Wire.cmdWrite, cookie: 1, length: 4096, payload: data) + next)
        #expect(decoder.bytesNeeded(in: buffer) == 32 + 4096)
        let request = try #require(decoder.decode(&buffer).request)
        #expect(request.defect == nil)
        #expect(request.payload?.readableBytesView.elementsEqual(data) == true)
        #expect(buffer.bytes == next)
    }

    @Test(
        "PAYLOAD_LEN on a command without a payload form: the payload is drained and the request marked",
        arguments: [Wire.cmdRead, Wire.cmdBlockStatus, Wire.cmdTrim, Wire.cmdFlush])
    func unexpectedPayload(type: UInt16) throws {
        var decoder = NBDRequestDecoder(framing: .extended)
        let next = ExtendedWire.request(type: Wire.cmdFlush, cookie: 2)
        let payload = [UInt8](repeating: 0xAB, count: 12)
        var buffer = ByteBuffer(
            bytes: ExtendedWire.request(type: type, flags: ExtendedWire.flagPayloadLength, cookie: 1, length: 12, payload: payload)
                + next)
        let request = try #require(decoder.decode(&buffer).request)
        #expect(request.defect == .unexpectedPayload(12))
        #expect(request.payload == nil)
        #expect(buffer.bytes == next)
    }

    @Test("a drained payload may arrive in pieces")
    func unexpectedPayloadInPieces() throws {
        var decoder = NBDRequestDecoder(framing: .extended)
        var buffer = ByteBuffer(
            bytes: ExtendedWire.request(type: Wire.cmdRead, flags: ExtendedWire.flagPayloadLength, cookie: 1, length: 1000))
        #expect(decoder.decode(&buffer).isNeedMoreData)
        buffer.writeBytes([UInt8](repeating: 1, count: 600))
        #expect(decoder.decode(&buffer).isNeedMoreData)
        buffer.writeBytes([UInt8](repeating: 1, count: 400))
        #expect(try #require(decoder.decode(&buffer).request).defect == .unexpectedPayload(1000))
        #expect(buffer.readableBytes == 0)
    }

    @Test("effect lengths past 2^63 - 1 are marked; 2^63 - 1 itself is not", arguments: [
        (UInt64(Int64.max), false), (UInt64(Int64.max) + 1, true), (UInt64.max, true),
    ])
    func lengthPastLimit(length: UInt64, refused: Bool) throws {
        var decoder = NBDRequestDecoder(framing: .extended)
        var buffer = ByteBuffer(bytes: ExtendedWire.request(type: Wire.cmdWriteZeroes, length: length))
        let request = try #require(decoder.decode(&buffer).request)
        #expect(request.length == length)
        #expect(request.defect == (refused ? .lengthTooLarge(length) : nil))
        #expect(buffer.readableBytes == 0)
    }

    @Test("a payload past 64 MiB, or past 2^63, ends the connection", arguments: [UInt64(64 << 20) + 1, 1 << 40, UInt64.max])
    func payloadTooLarge(length: UInt64) {
        var decoder = NBDRequestDecoder(framing: .extended)
        var buffer = ByteBuffer(
            bytes: ExtendedWire.request(type: Wire.cmdWrite, flags: ExtendedWire.flagPayloadLength, length: length))
        #expect(decoder.decode(&buffer).violation == .payloadTooLarge(length))
        #expect(decoder.bytesNeeded(in: buffer) == nil)
    }

    @Test("the compact magic under extended headers, and the extended magic under compact ones, end the connection")
    func wrongMagic() {
        var extended = NBDRequestDecoder(framing: .extended)
        var compactBytes = ByteBuffer(bytes: ExtendedWire.request(type: Wire.cmdRead, length: 512, magic: Wire.requestMagic))
        #expect(extended.decode(&compactBytes).violation == .badMagic(Wire.requestMagic))
        #expect(extended.bytesNeeded(in: compactBytes) == nil)

        var compact = NBDRequestDecoder()
        var extendedBytes = ByteBuffer(bytes: ExtendedWire.request(type: Wire.cmdRead, length: 512))
        #expect(compact.decode(&extendedBytes).violation == .badMagic(ExtendedWire.requestMagic))
    }

    @Test("compact decoding ignores PAYLOAD_LEN: only WRITE has a payload there, as before")
    func compactUnchanged() throws {
        var decoder = NBDRequestDecoder()
        let next = Client.request(type: Wire.cmdFlush, cookie: 2)
        var buffer = ByteBuffer(
            bytes: Client.request(type: Wire.cmdRead, flags: ExtendedWire.flagPayloadLength, cookie: 1, length: 8) + next)
        let request = try #require(decoder.decode(&buffer).request)
        #expect(request.defect == nil)
        #expect(request.length == 8)
        #expect(buffer.bytes == next)
    }
}

@Suite("Extended headers: reply encoding")
struct ExtendedReplyEncoderTests {
    @Test("compact status replies are the 16-byte simple reply, byte for byte")
    func compactStatusIsSimple() {
        var status = ByteBuffer()
        NBDReplyEncoder.writeStatusReply(cookie: 0xAA, error: 22, framing: .compact, requestOffset: 99, into: &status)
        var simple = Bytes()
        simple.u32(Wire.simpleReplyMagic)
        simple.u32(22)
        simple.u64(0xAA)
        #expect(status.bytes == simple.bytes)
    }

    @Test("extended success is a 32-byte NONE chunk with DONE, echoing cookie and request offset")
    func extendedNone() throws {
        var buffer = ByteBuffer()
        NBDReplyEncoder.writeStatusReply(cookie: 0xC0, error: 0, framing: .extended, requestOffset: 1 << 33, into: &buffer)
        var expected = Bytes()
        expected.u32(ExtendedWire.replyMagic)
        expected.u16(1)
        expected.u16(ExtendedWire.chunkNone)
        expected.u64(0xC0)
        expected.u64(1 << 33)
        expected.u64(0)
        #expect(buffer.bytes == expected.bytes)
        #expect(!NBDReplyEncoder.isErrorReply(buffer, at: 0))
    }

    @Test("extended errors are ERROR chunks for every command, never simple replies")
    func extendedErrors() throws {
        for command in [Wire.cmdWrite, Wire.cmdFlush, Wire.cmdRead, Wire.cmdBlockStatus, 99] {
            var buffer = ByteBuffer()
            NBDReplyEncoder.writeError(
                cookie: 5, command: command, error: .invalid, message: "no", structured: true, framing: .extended,
                requestOffset: 4096, into: &buffer)
            let chunks = try ExtendedWire.chunks(buffer.bytes)
            #expect(chunks.count == 1)
            #expect(chunks.first?.type == ExtendedWire.chunkError)
            #expect(chunks.first?.flags == 1)
            #expect(chunks.first?.offset == 4096)
            #expect(chunks.first?.payload == [0, 0, 0, 22, 0, 2] + Array("no".utf8))
            #expect(NBDReplyEncoder.isErrorReply(buffer, at: 0))
        }
    }

    @Test("compact error replies stay as they were: simple for WRITE, a chunk for READ under structured replies")
    func compactErrorsUnchanged() {
        var write = ByteBuffer()
        NBDReplyEncoder.writeError(cookie: 5, command: Wire.cmdWrite, error: .noSpace, message: "x", structured: true, into: &write)
        #expect(write.readableBytes == 16)
        var read = ByteBuffer()
        NBDReplyEncoder.writeError(cookie: 5, command: Wire.cmdRead, error: .invalid, message: "x", structured: true, into: &read)
        #expect(read.getInteger(at: 0, as: UInt32.self) == Wire.structuredReplyMagic)
        #expect(read.readableBytes == 20 + 6 + 1)
    }

    @Test("an extended READ reply: OFFSET_HOLE and OFFSET_DATA chunks, each header carrying the request offset")
    func extendedRead() throws {
        let reply = NBDReadReply(cookie: 3, offset: 8192, length: 8192, structured: true, framing: .extended)
        var buffer = ByteBuffer()
        let runs: [(length: UInt64, isHole: Bool)] = [(4096, true), (4096, false)]
        let complete = reply.write(runs: runs, into: &buffer) { buffer, count, _ in
            buffer.writeRepeatingByte(0x5A, count: count)
            return true
        }
        #expect(complete)
        let chunks = try ExtendedWire.chunks(buffer.bytes)
        #expect(chunks.map(\.type) == [ExtendedWire.chunkOffsetHole, ExtendedWire.chunkOffsetData])
        #expect(chunks.map(\.offset) == [8192, 8192])
        #expect(chunks.map(\.flags) == [0, 1])
        var hole = ByteReader(chunks[0].payload)
        #expect(hole.u64() == 8192)
        #expect(hole.u32() == 4096)
        var data = ByteReader(chunks[1].payload)
        #expect(data.u64() == 12288)
        #expect(data.rest() == [UInt8](repeating: 0x5A, count: 4096))
        #expect(reply.capacity(runs: 2) == 8192 + 40 * 3)
    }

    @Test("a zero-length extended READ is one NONE chunk")
    func extendedEmptyRead() throws {
        let reply = NBDReadReply(cookie: 3, offset: 512, length: 0, structured: false, framing: .extended)
        var buffer = ByteBuffer()
        _ = reply.write(runs: [(length: UInt64, isHole: Bool)]?.none, into: &buffer) { _, _, _ in true }
        let chunks = try ExtendedWire.chunks(buffer.bytes)
        #expect(chunks == [ExtendedWire.Chunk(flags: 1, type: ExtendedWire.chunkNone, cookie: 3, offset: 512, payload: [])])
    }
}

@Suite("Extended headers: block status")
struct ExtendedBlockStatusTests {
    @Test("BLOCK_STATUS_EXT: context id, count, 64-bit extents and status; a 5 GiB run is one extent")
    func extendedChunk() throws {
        var builder = BlockStatusBuilder(contextID: 2, offset: 1 << 20, length: 6 << 30, requestOne: false, framing: .extended)
        builder.append(length: 5 << 30, flags: 3)
        builder.append(length: 1 << 30, flags: 0)
        var buffer = ByteBuffer()
        builder.write(cookie: 9, done: true, fallbackFlags: 1, into: &buffer)
        let chunks = try ExtendedWire.chunks(buffer.bytes)
        let chunk = try #require(chunks.first)
        #expect(chunks.count == 1)
        #expect(chunk.type == ExtendedWire.chunkBlockStatusExt)
        #expect(chunk.offset == 1 << 20)
        #expect(chunk.payload.count == 8 + 16 * 2)
        var reader = ByteReader(chunk.payload)
        #expect(reader.u32() == 2)
        #expect(reader.u32() == 2)
        #expect(reader.u64() == 5 << 30)
        #expect(reader.u64() == 3)
        #expect(reader.u64() == 1 << 30)
        #expect(reader.u64() == 0)
    }

    @Test("the same run in compact framing: type 5, one u32 extent clipped to the (32-bit) request")
    func compactChunk() throws {
        var builder = BlockStatusBuilder(contextID: 2, offset: 0, length: UInt32.max, requestOne: false)
        builder.append(length: 5 << 30, flags: 3)
        var buffer = ByteBuffer()
        builder.write(cookie: 9, done: true, fallbackFlags: 1, into: &buffer)
        var expected = Bytes()
        expected.u32(Wire.structuredReplyMagic)
        expected.u16(1)
        expected.u16(ExtendedWire.chunkBlockStatus)
        expected.u64(9)
        expected.u32(4 + 8)
        expected.u32(2)
        expected.u32(UInt32.max)
        expected.u32(3)
        #expect(buffer.bytes == expected.bytes)
    }

    @Test("REQ_ONE under extended headers: one extent, clipped to the request")
    func requestOne() throws {
        var builder = BlockStatusBuilder(contextID: 1, offset: 0, length: 1 << 20, requestOne: true, framing: .extended)
        builder.append(length: 1 << 30, flags: 0)
        builder.append(length: 1 << 30, flags: 3)
        var buffer = ByteBuffer()
        builder.write(cookie: 1, done: false, fallbackFlags: 0, into: &buffer)
        let chunk = try #require(try ExtendedWire.chunks(buffer.bytes).first)
        #expect(chunk.flags == 0)
        #expect(chunk.payload == [0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    }

    @Test("nothing fed: one fallback extent covering a request longer than 4 GiB")
    func fallback() throws {
        var builder = BlockStatusBuilder(contextID: 1, offset: 0, length: 6 << 40, requestOne: false, framing: .extended)
        var buffer = ByteBuffer()
        builder.write(cookie: 1, done: true, fallbackFlags: 1, into: &buffer)
        let chunk = try #require(try ExtendedWire.chunks(buffer.bytes).first)
        var reader = ByteReader(chunk.payload)
        _ = reader.u32()
        #expect(reader.u32() == 1)
        #expect(reader.u64() == 6 << 40)
        #expect(reader.u64() == 1)
    }
}

@Suite("Extended headers: negotiation")
struct ExtendedNegotiationTests {
    static func driver(offersExtendedHeaders: Bool = true) -> HandshakeDriver {
        var driver = HandshakeDriver()
        driver.machine = HandshakeStateMachine(offersExtendedHeaders: offersExtendedHeaders)
        _ = driver.feed(Client.flags(3))
        return driver
    }

    @Test("EXTENDED_HEADERS is acknowledged; GO then enters transmission with extended framing and structured replies")
    func acknowledged() throws {
        var driver = Self.driver()
        let replies = try driver.send(Client.option(Wire.optExtendedHeaders))
        #expect(replies == [OptionReply(option: Wire.optExtendedHeaders, type: Wire.repAck, data: [])])
        // Contexts may be set with extended headers alone (they imply structured replies).
        let meta = try driver.send(Client.setMeta("disk", ["base:allocation"]))
        #expect(meta.last?.type == Wire.repAck)
        #expect(meta.count == 2)
        _ = try driver.send(Client.go("disk", [Wire.infoBlockSize]))
        let session = try #require(driver.session)
        #expect(session.framing == .extended)
        #expect(session.structuredReplies)
        #expect(session.metaContexts.map(\.name) == ["base:allocation"])
        #expect(session.transmissionFlags.contains(.sendDF))
        #expect(!session.transmissionFlags.contains(.blockStatusPayload))
    }

    @Test("a repeat is invalid, data is invalid; STRUCTURED_REPLY after it is EXT_HEADER_REQD; negotiation goes on")
    func orderingRules() throws {
        var driver = Self.driver()
        #expect(try driver.send(Client.option(Wire.optExtendedHeaders, [1])).first?.type == Wire.errInvalid)
        #expect(try driver.send(Client.option(Wire.optExtendedHeaders)).first?.type == Wire.repAck)
        #expect(try driver.send(Client.option(Wire.optExtendedHeaders)).first?.type == Wire.errInvalid)
        #expect(try driver.send(Client.structuredReply).first?.type == ExtendedWire.errExtHeaderReqd)
        _ = try driver.send(Client.go("disk"))
        #expect(driver.session?.framing == .extended)
    }

    @Test("STRUCTURED_REPLY first, then EXTENDED_HEADERS: extended framing wins")
    func structuredFirst() throws {
        var driver = Self.driver()
        #expect(try driver.send(Client.structuredReply).first?.type == Wire.repAck)
        #expect(try driver.send(Client.option(Wire.optExtendedHeaders)).first?.type == Wire.repAck)
        _ = try driver.send(Client.go("disk"))
        #expect(driver.session?.framing == .extended)
    }

    @Test("EXPORT_NAME after EXTENDED_HEADERS is a hard disconnect, as the spec forbids it")
    func exportNameForbidden() throws {
        var driver = Self.driver()
        _ = try driver.send(Client.option(Wire.optExtendedHeaders))
        let output = driver.feed(Client.option(Wire.optExportName, Array("disk".utf8)))
        #expect(output.isEmpty)
        #expect(driver.outcome == .close(.exportNameAfterExtendedHeaders))
    }

    @Test("without the offer (--no-extended-headers): ERR_UNSUP, then compact framing as before")
    func refused() throws {
        var driver = Self.driver(offersExtendedHeaders: false)
        #expect(try driver.send(Client.option(Wire.optExtendedHeaders)).first?.type == Wire.errUnsup)
        #expect(try driver.send(Client.structuredReply).first?.type == Wire.repAck)
        _ = try driver.send(Client.go("disk"))
        #expect(driver.session?.framing == .compact)
    }

    @Test("without structured replies on offer there are no extended headers either")
    func refusedWithoutStructuredReplies() throws {
        var driver = HandshakeDriver()
        driver.machine = HandshakeStateMachine(offersStructuredReplies: false)
        _ = driver.feed(Client.flags(3))
        #expect(try driver.send(Client.option(Wire.optExtendedHeaders)).first?.type == Wire.errUnsup)
    }
}

@Suite("Extended headers: transmission")
struct ExtendedTransmissionTests {
    static func inTransmission(readOnly: Bool = false) -> ConnectionDriver {
        var driver = ConnectionDriver()
        _ = driver.feed(
            Client.flags(3) + Client.option(Wire.optExtendedHeaders)
                + Client.setMeta("disk", ["base:allocation", "qemu:dirty-bitmap:b0"]) + Client.go("disk"))
        driver.output.clear()
        return driver
    }

    @Test("TRIM, WRITE_ZEROES, CACHE and BLOCK_STATUS as extended requests execute with the whole range")
    func sixtyFourBitLengths() {
        var driver = Self.inTransmission()
        #expect(driver.connection.session?.framing == .extended)
        let actions = driver.feed(
            ExtendedWire.request(type: Wire.cmdTrim, cookie: 1, length: 1 << 30)
                + ExtendedWire.request(type: Wire.cmdWriteZeroes, cookie: 2, offset: 512, length: (1 << 30) - 512)
                + ExtendedWire.request(type: Wire.cmdCache, cookie: 3, length: 1 << 30)
                + ExtendedWire.request(type: Wire.cmdBlockStatus, cookie: 4, length: 1 << 30))
        guard case .execute(1, .trim(0, 1 << 30, false), _) = actions[0] else { Issue.record("\(actions[0])"); return }
        guard case .execute(2, .writeZeroes(512, (1 << 30) - 512, false, false, false), _) = actions[1] else {
            Issue.record("\(actions[1])"); return
        }
        guard case .execute(3, .cache(0, 1 << 30), _) = actions[2] else { Issue.record("\(actions[2])"); return }
        guard case .execute(4, .blockStatus(0, 1 << 30, false), _) = actions[3] else { Issue.record("\(actions[3])"); return }
        #expect(driver.output.readableBytes == 0)
    }

    @Test("on a 6 TiB export one request covers 5 GiB past 4 GiB, or the whole disk; past the end is refused")
    func multiTebibyte() {
        let size: UInt64 = 6 << 40
        let session = NBDSession(
            exportName: "big", size: size, transmissionFlags: [.hasFlags, .sendTrim, .sendWriteZeroes],
            structuredReplies: true, metaContexts: [NBDSelectedContext(id: 1, name: "qemu:dirty-bitmap:b0")],
            minimumBlockSize: 512, enforcesBlockSize: true, framing: .extended)
        var machine = TransmissionStateMachine(session: session)
        func request(_ type: UInt16, offset: UInt64, length: UInt64) -> NBDRequest {
            NBDRequest(type: type, flags: [], cookie: 1, offset: offset, length: length)
        }
        guard case .execute(_, .writeZeroes(4 << 30, 5 << 30, false, false, false)) = machine.received(
            request(Wire.cmdWriteZeroes, offset: 4 << 30, length: 5 << 30))
        else { Issue.record("WRITE_ZEROES of 5 GiB not executed"); return }
        guard case .execute(_, .trim(0, size, false)) = machine.received(request(Wire.cmdTrim, offset: 0, length: size))
        else { Issue.record("TRIM of the whole disk not executed"); return }
        guard case .execute(_, .blockStatus(0, size, false)) = machine.received(request(Wire.cmdBlockStatus, offset: 0, length: size))
        else { Issue.record("BLOCK_STATUS of the whole disk not executed"); return }
        guard case .reject(_, _, .noSpace, _) = machine.received(request(Wire.cmdWriteZeroes, offset: 512, length: size))
        else { Issue.record("WRITE_ZEROES past the end not refused with ENOSPC"); return }
        // READ stays bounded by the maximum payload.
        guard case .reject(_, _, .invalid, _) = machine.received(request(Wire.cmdRead, offset: 0, length: 64 << 20))
        else { Issue.record("READ of 64 MiB not refused"); return }
    }

    @Test("a WRITE without PAYLOAD_LEN executes too (qemu 10's client form)")
    func writeWithoutFlag() {
        var driver = Self.inTransmission()
        let actions = driver.feed(
            ExtendedWire.request(type: Wire.cmdWrite, cookie: 1, offset: 4096, length: 512, payload: [UInt8](repeating: 1, count: 512)))
        guard case .execute(1, .write(4096, let payload, false), 512) = actions[0] else { Issue.record("\(actions[0])"); return }
        #expect(payload.readableBytes == 512)
    }

    @Test("a WRITE with PAYLOAD_LEN executes; FUA and PAYLOAD_LEN together are fine")
    func write() {
        var driver = Self.inTransmission()
        let actions = driver.feed(
            ExtendedWire.request(
                type: Wire.cmdWrite, flags: ExtendedWire.flagPayloadLength | Wire.flagFUA, cookie: 1, offset: 4096,
                length: 512, payload: [UInt8](repeating: 1, count: 512)))
        guard case .execute(1, .write(4096, let payload, true), 512) = actions[0] else { Issue.record("\(actions[0])"); return }
        #expect(payload.readableBytes == 512)
    }

    /// Feeds one request and returns the single extended reply chunk the machine wrote.
    static func refusal(_ request: [UInt8]) throws -> (ExtendedWire.Chunk, ConnectionAction) {
        var driver = Self.inTransmission()
        let actions = driver.feed(request + ExtendedWire.request(type: Wire.cmdFlush, cookie: 77))
        let chunks = try ExtendedWire.chunks(driver.output.bytes)
        #expect(chunks.count == 1)
        // The next request is decoded normally: the stream stayed in sync.
        guard actions.count >= 2, case .execute(77, .flush, _) = actions[1] else {
            Issue.record("after the refusal: \(actions)")
            return (try #require(chunks.first), actions[0])
        }
        return (try #require(chunks.first), actions[0])
    }

    @Test(
        "each defect is an EINVAL error chunk echoing cookie and offset, and the next request is served",
        arguments: [
            ExtendedWire.request(
                type: Wire.cmdRead, flags: ExtendedWire.flagPayloadLength, cookie: 5, offset: 8192, length: 4,
                payload: [1, 2, 3, 4]),
            ExtendedWire.request(
                type: Wire.cmdBlockStatus, flags: ExtendedWire.flagPayloadLength, cookie: 5, offset: 8192, length: 12,
                payload: [0, 0, 0, 0, 0, 0, 16, 0, 0, 0, 0, 1]),
            ExtendedWire.request(type: Wire.cmdTrim, cookie: 5, offset: 8192, length: UInt64(Int64.max) + 1),
            ExtendedWire.request(type: Wire.cmdWriteZeroes, cookie: 5, offset: 8192, length: 1 << 31),
        ])
    func defects(request: [UInt8]) throws {
        let (chunk, action) = try Self.refusal(request)
        #expect(chunk.type == ExtendedWire.chunkError)
        #expect(chunk.flags == 1)
        #expect(chunk.cookie == 5)
        #expect(chunk.offset == 8192)
        var reader = ByteReader(chunk.payload)
        let error = reader.u32()
        // 2 GiB of zeroes from 8 KiB pass the end of the 1 GiB disk: ENOSPC, as in compact framing.
        #expect(error == Wire.EINVAL || error == Wire.ENOSPC)
        guard case .refused(5, _, _, _) = action else { Issue.record("\(action)"); return }
    }

    /// FuzzRequests (Fuzz/corpus/requests/regress-payload-len-zero): PAYLOAD_LEN with length 0
    /// on a command without a payload form leaves nothing to drain; the flag alone is refused.
    @Test(
        "PAYLOAD_LEN with length 0 on a non-WRITE (or an unknown command): EINVAL, nothing drained, the next request served",
        arguments: [Wire.cmdTrim, Wire.cmdCache, Wire.cmdBlockStatus, UInt16(0x9513)])
    func payloadLengthZero(type: UInt16) throws {
        let (chunk, action) = try Self.refusal(
            ExtendedWire.request(type: type, flags: ExtendedWire.flagPayloadLength, cookie: 5, offset: 8192, length: 0))
        #expect(chunk.type == ExtendedWire.chunkError)
        #expect(chunk.cookie == 5)
        var reader = ByteReader(chunk.payload)
        #expect(reader.u32() == Wire.EINVAL)
        guard case .refused(5, type, _, _) = action else { Issue.record("\(action)"); return }
    }
}
