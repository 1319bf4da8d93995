import NBDProtocol
import NIOCore
import Testing

/// One structured reply chunk parsed from bytes.
struct Chunk: Equatable {
    var flags: UInt16
    var type: UInt16
    var cookie: UInt64
    var payload: [UInt8]

    /// Parses exactly one chunk; nil if the bytes are not one well-formed chunk.
    static func parse(_ bytes: [UInt8]) -> Chunk? {
        var reader = ByteReader(bytes)
        guard reader.u32() == Wire.structuredReplyMagic, let flags = reader.u16(), let type = reader.u16(),
            let cookie = reader.u64(), let length = reader.u32(), reader.remaining == Int(length)
        else { return nil }
        return Chunk(flags: flags, type: type, cookie: cookie, payload: reader.rest())
    }

    /// BLOCK_STATUS payload: context id and extents.
    var blockStatus: (context: UInt32, extents: [(length: UInt32, flags: UInt32)])? {
        var reader = ByteReader(payload)
        guard type == 5, let id = reader.u32(), reader.remaining % 8 == 0 else { return nil }
        var extents: [(UInt32, UInt32)] = []
        while reader.remaining > 0, let length = reader.u32(), let flags = reader.u32() {
            extents.append((length, flags))
        }
        return (id, extents)
    }
}

@Suite("NBDReplyEncoder")
struct ReplyEncoderTests {
    @Test("a simple reply is magic, error, cookie: 16 bytes")
    func simpleReply() {
        var buffer = ByteBuffer()
        NBDReplyEncoder.writeSimpleReply(cookie: 0x0102_0304_0506_0708, error: 22, into: &buffer)
        #expect(
            buffer.bytes == [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 1, 2, 3, 4, 5, 6, 7, 8])
        #expect(NBDReplyEncoder.simpleHeaderSize == 16)
    }

    @Test("a chunk header is magic, flags, type, cookie, length: 20 bytes")
    func chunkHeader() {
        var buffer = ByteBuffer()
        NBDReplyEncoder.writeChunkHeader(cookie: 0xFFEE, type: 0, done: true, length: 0, into: &buffer)
        #expect(
            buffer.bytes == [0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xEE, 0, 0, 0, 0])
        var notDone = ByteBuffer()
        NBDReplyEncoder.writeChunkHeader(cookie: 1, type: 5, done: false, length: 12, into: &notDone)
        #expect(Chunk.parse(notDone.bytes + [UInt8](repeating: 0, count: 12))?.flags == 0)
    }

    @Test("OFFSET_DATA header: length = data + 8, then the offset; 28 bytes before the data")
    func offsetData() throws {
        var buffer = ByteBuffer()
        NBDReplyEncoder.writeOffsetDataHeader(cookie: 7, offset: 1 << 40, length: 4, done: true, into: &buffer)
        #expect(buffer.readableBytes == NBDReplyEncoder.offsetDataHeaderSize)
        buffer.writeBytes([9, 8, 7, 6])
        let chunk = try #require(Chunk.parse(buffer.bytes))
        #expect(chunk.type == 1)
        #expect(chunk.flags == 1)
        #expect(chunk.cookie == 7)
        #expect(chunk.payload == [0, 0, 1, 0, 0, 0, 0, 0, 9, 8, 7, 6])
    }

    @Test("OFFSET_HOLE: 12-byte payload of offset and hole size")
    func offsetHole() throws {
        var buffer = ByteBuffer()
        NBDReplyEncoder.writeOffsetHole(cookie: 3, offset: 0x1000, length: 0x2000, done: false, into: &buffer)
        let chunk = try #require(Chunk.parse(buffer.bytes))
        #expect(chunk == Chunk(flags: 0, type: 2, cookie: 3, payload: [0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0x20, 0]))
    }

    @Test("an ERROR chunk: DONE, type 0x8001, error, message length, message")
    func errorChunk() throws {
        var buffer = ByteBuffer()
        NBDReplyEncoder.writeErrorChunk(cookie: 5, error: 22, message: "bad", into: &buffer)
        let chunk = try #require(Chunk.parse(buffer.bytes))
        #expect(chunk == Chunk(flags: 1, type: 0x8001, cookie: 5, payload: [0, 0, 0, 22, 0, 3] + Array("bad".utf8)))
    }

    @Test("long error messages are trimmed on a character boundary and stay far below qemu's 1000-byte limit")
    func errorChunkLongMessage() throws {
        for message in [String(repeating: "x", count: 5000), String(repeating: "é", count: 600), String(repeating: "🙂", count: 300)] {
            var buffer = ByteBuffer()
            NBDReplyEncoder.writeErrorChunk(cookie: 5, error: 5, message: message, into: &buffer)
            let chunk = try #require(Chunk.parse(buffer.bytes))
            #expect(chunk.payload.count <= 1000)
            var reader = ByteReader(chunk.payload)
            let error = reader.u32()
            let messageLength = reader.u16()
            #expect(error == 5)
            let length = try #require(messageLength)
            #expect(Int(length) == reader.remaining)
            let text = try #require(String(validating: reader.rest(), as: UTF8.self))
            #expect(!text.isEmpty)
            #expect(message.hasPrefix(text))
        }
    }

    @Test(
        "errors are ERROR chunks for READ and BLOCK_STATUS under structured replies, simple replies otherwise",
        arguments: [Wire.cmdRead, Wire.cmdWrite, Wire.cmdFlush, Wire.cmdTrim, Wire.cmdCache, Wire.cmdWriteZeroes, Wire.cmdBlockStatus, 77],
        [false, true])
    func errorForm(command: UInt16, structured: Bool) throws {
        var buffer = ByteBuffer()
        NBDReplyEncoder.writeError(
            cookie: 0xAA, command: command, error: .noSpace, message: "no room", structured: structured, into: &buffer)
        if structured && (command == Wire.cmdRead || command == Wire.cmdBlockStatus) {
            let chunk = try #require(Chunk.parse(buffer.bytes))
            #expect(chunk.type == 0x8001)
            #expect(chunk.flags == 1)
            #expect(chunk.cookie == 0xAA)
            #expect(Array(chunk.payload.prefix(4)) == [0, 0, 0, 28])
        } else {
            #expect(buffer.bytes == [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 28, 0, 0, 0, 0, 0, 0, 0, 0xAA])
        }
    }
}

@Suite("BlockStatusBuilder")
struct BlockStatusBuilderTests {
    /// Feeds extents and returns the chunk's (context, extents), checking the framing.
    private func build(
        offset: UInt64 = 0, length: UInt32, requestOne: Bool = false, fallback: UInt32 = 0, context: UInt32 = 7,
        _ runs: [(UInt64, UInt32)]
    ) throws -> [(length: UInt32, flags: UInt32)] {
        var builder = BlockStatusBuilder(contextID: context, offset: offset, length: length, requestOne: requestOne)
        for (runLength, flags) in runs where builder.wantsMore {
            builder.append(length: runLength, flags: flags)
        }
        var buffer = ByteBuffer()
        builder.write(cookie: 0x5151, done: true, fallbackFlags: fallback, into: &buffer)
        let chunk = try #require(Chunk.parse(buffer.bytes))
        #expect(chunk.type == 5)
        #expect(chunk.flags == 1)
        #expect(chunk.cookie == 0x5151)
        let status = try #require(chunk.blockStatus)
        #expect(status.context == context)
        #expect(chunk.payload.count == 4 + 8 * status.extents.count)
        #expect(!status.extents.isEmpty)
        #expect(status.extents.allSatisfy { $0.length > 0 })
        // Never past the request end.
        #expect(status.extents.reduce(UInt64(0)) { $0 + UInt64($1.length) } <= UInt64(length))
        if requestOne { #expect(status.extents.count == 1) }
        return status.extents
    }

    private func pairs(_ extents: [(length: UInt32, flags: UInt32)]) -> [[UInt32]] {
        extents.map { [$0.length, $0.flags] }
    }

    @Test("equal neighbours are merged; different ones kept apart")
    func merges() throws {
        let extents = try build(length: 8192, [(512, 0), (512, 0), (1024, 3), (1024, 3), (2048, 0), (4096, 0)])
        #expect(pairs(extents) == [[1024, 0], [2048, 3], [6144 - 1024, 0]])
    }

    @Test("the last extent is clipped to the request end")
    func clipsToRequestEnd() throws {
        #expect(pairs(try build(offset: 4096, length: 4096, [(1 << 20, 1)])) == [[4096, 1]])
        #expect(pairs(try build(length: 3000, [(1000, 0), (5000, 3)])) == [[1000, 0], [2000, 3]])
    }

    @Test("REQ_ONE gives exactly one extent no longer than the request")
    func requestOne() throws {
        #expect(pairs(try build(length: 4096, requestOne: true, [(512, 0), (512, 1)])) == [[512, 0]])
        #expect(pairs(try build(length: 4096, requestOne: true, [(512, 2), (512, 2), (1024, 1)])) == [[1024, 2]])
        #expect(pairs(try build(length: 4096, requestOne: true, [(1 << 30, 3)])) == [[4096, 3]])
        #expect(pairs(try build(length: 4096, requestOne: true, [(4096, 0), (4096, 1)])) == [[4096, 0]])
    }

    @Test("zero-length extents are never emitted")
    func noZeroLength() throws {
        #expect(pairs(try build(length: 4096, [(0, 1), (512, 0), (0, 2), (0, 0), (512, 2)])) == [[512, 0], [512, 2]])
    }

    @Test("with nothing fed, one extent with the fallback flags covers the request")
    func fallback() throws {
        #expect(pairs(try build(length: 4096, fallback: 1, [])) == [[4096, 1]])
        #expect(pairs(try build(length: 4096, fallback: 1, [(0, 3)])) == [[4096, 1]])
        #expect(pairs(try build(offset: 1 << 40, length: 1, fallback: 0, [])) == [[1, 0]])
        // A huge request still gets a u32 extent that is not longer than the request.
        let huge = try build(length: 0xFFFF_FFFF, fallback: 1, [])
        #expect(huge.count == 1)
        #expect(huge[0].flags == 1)
    }

    @Test("extents longer than 4 GiB become u32 pieces that never exceed the request")
    func hugeExtents() throws {
        let full = try build(length: 0xFFFF_FFFF, [(8 << 30, 0)])
        #expect(full.reduce(UInt64(0)) { $0 + UInt64($1.length) } == 0xFFFF_FFFF)
        #expect(full.allSatisfy { $0.flags == 0 })

        let mixed = try build(offset: 1 << 33, length: 0xFFFF_FFFF, [(3 << 30, 1), (3 << 30, 1), (6 << 30, 2)])
        #expect(mixed.reduce(UInt64(0)) { $0 + UInt64($1.length) } == 0xFFFF_FFFF)
        #expect(mixed.allSatisfy { $0.flags == 1 })

        let split = try build(length: 0xFFFF_FFFF, [(1 << 30, 0), (5 << 30, 1)])
        #expect(pairs(split) == [[1 << 30, 0], [0xFFFF_FFFF - (1 << 30), 1]])
    }

    @Test("wantsMore and nextOffset track the fed extents")
    func progress() {
        var builder = BlockStatusBuilder(contextID: 1, offset: 1000, length: 3000, requestOne: false)
        #expect(builder.wantsMore)
        #expect(builder.nextOffset == 1000)
        builder.append(length: 1000, flags: 0)
        #expect(builder.nextOffset == 2000)
        builder.append(length: 1000, flags: 1)
        #expect(builder.nextOffset == 3000)
        #expect(builder.wantsMore)
        builder.append(length: 5000, flags: 0)
        #expect(builder.nextOffset == 4000)
        #expect(!builder.wantsMore)
        #expect(builder.requestEnd == 4000)
    }

    @Test("the chunk is capped at maximumExtents extents; the client asks again for the rest")
    func capsExtentCount() throws {
        let maximum = BlockStatusBuilder.maximumExtents
        let count = maximum + 100
        var builder = BlockStatusBuilder(contextID: 2, offset: 0, length: UInt32(count * 512), requestOne: false)
        var fed = 0
        while builder.wantsMore && fed < count {
            builder.append(length: 512, flags: UInt32(fed % 2))
            fed += 1
        }
        var buffer = ByteBuffer()
        builder.write(cookie: 1, done: false, fallbackFlags: 0, into: &buffer)
        let chunk = try #require(Chunk.parse(buffer.bytes))
        #expect(chunk.flags == 0)
        let status = try #require(chunk.blockStatus)
        #expect(status.extents.count == maximum)
        #expect(chunk.payload.count == 4 + 8 * maximum)
        #expect(status.extents.allSatisfy { $0.length == 512 })
        #expect(status.extents.enumerated().allSatisfy { $0.element.flags == UInt32($0.offset % 2) })
    }

    @Test("chunk length is 4 + 8n for every n", arguments: [1, 2, 3, 10, 124])
    func chunkLength(n: Int) throws {
        var builder = BlockStatusBuilder(contextID: 9, offset: 0, length: UInt32(n * 4096), requestOne: false)
        for index in 0..<n { builder.append(length: 4096, flags: UInt32(index % 2)) }
        var buffer = ByteBuffer()
        builder.write(cookie: 2, done: true, fallbackFlags: 0, into: &buffer)
        var reader = ByteReader(buffer.bytes)
        _ = reader.bytes(16)
        let length = reader.u32()
        #expect(length == UInt32(4 + 8 * n))
        #expect(buffer.readableBytes == 20 + 4 + 8 * n)
    }
}
