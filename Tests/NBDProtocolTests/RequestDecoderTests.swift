import NBDProtocol
import NIOCore
import Testing

extension NBDRequestDecoder.Result {
    var request: NBDRequest? {
        if case .request(let request) = self { return request }
        return nil
    }

    var isNeedMoreData: Bool {
        if case .needMoreData = self { return true }
        return false
    }

    var violation: RequestFramingError? {
        if case .protocolViolation(let error) = self { return error }
        return nil
    }
}

@Suite("NBDRequestDecoder")
struct RequestDecoderTests {
    @Test("a header is decoded field by field and exactly 28 bytes are consumed")
    func headerFields() throws {
        var decoder = NBDRequestDecoder()
        var buffer = ByteBuffer(bytes: [
            0x25, 0x60, 0x95, 0x13,  // magic
            0x00, 0x09,  // flags: FUA | REQ_ONE
            0x00, 0x07,  // BLOCK_STATUS
            0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08,  // cookie
            0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00,  // offset 2^32
            0x80, 0x00, 0x00, 0x01,  // length
            0xEE,  // next byte, not part of the request
        ])
        let request = try #require(decoder.decode(&buffer).request)
        #expect(request.type == 7)
        #expect(request.flags == [.fua, .requestOne])
        #expect(request.cookie == 0x0102_0304_0506_0708)
        #expect(request.offset == 1 << 32)
        #expect(request.length == 0x8000_0001)
        #expect(request.payload == nil)
        #expect(request.payloadDiscarded == false)
        #expect(buffer.bytes == [0xEE])
    }

    @Test(
        "non-WRITE commands never consume a payload, whatever their length",
        arguments: [Wire.cmdRead, Wire.cmdDisc, Wire.cmdFlush, Wire.cmdTrim, Wire.cmdCache, Wire.cmdWriteZeroes, 9, 0xFFFF])
    func noPayload(type: UInt16) throws {
        var decoder = NBDRequestDecoder()
        let next = Client.request(type: Wire.cmdFlush, cookie: 2)
        var buffer = ByteBuffer(bytes: Client.request(type: type, cookie: 1, length: 0xFFFF_FFFF) + next)
        let request = try #require(decoder.decode(&buffer).request)
        #expect(request.type == type)
        #expect(request.length == 0xFFFF_FFFF)
        #expect(request.payload == nil)
        #expect(buffer.bytes == next)
    }

    @Test("a WRITE carries its payload as a slice of exactly length bytes")
    func writePayload() throws {
        var decoder = NBDRequestDecoder()
        let payload = (0..<4096).map { UInt8(truncatingIfNeeded: $0 * 7) }
        let next = Client.request(type: Wire.cmdRead, cookie: 2, length: 512)
        var buffer = ByteBuffer(
            bytes: Client.request(type: Wire.cmdWrite, flags: Wire.flagFUA, cookie: 1, offset: 8192, length: 4096, payload: payload)
                + next)
        let request = try #require(decoder.decode(&buffer).request)
        #expect(request.type == Wire.cmdWrite)
        #expect(request.flags == .fua)
        #expect(request.offset == 8192)
        #expect(request.payload?.bytes == payload)
        #expect(request.payloadDiscarded == false)
        #expect(buffer.bytes == next)
        let second = try #require(decoder.decode(&buffer).request)
        #expect(second.cookie == 2)
        #expect(buffer.readableBytes == 0)
        #expect(decoder.decode(&buffer).isNeedMoreData)
    }

    @Test("a zero-length WRITE is a 28-byte request with no payload")
    func zeroLengthWrite() throws {
        var decoder = NBDRequestDecoder()
        var buffer = ByteBuffer(bytes: Client.request(type: Wire.cmdWrite, length: 0) + [1])
        let request = try #require(decoder.decode(&buffer).request)
        #expect(request.length == 0)
        #expect(request.payload == nil || request.payload?.readableBytes == 0)
        #expect(buffer.bytes == [1])
    }

    @Test("every strict prefix of a request needs more data; only a whole WRITE header is consumed before the rest")
    func partialInput() throws {
        let payload = [UInt8](repeating: 0xAB, count: 100)
        for message in [
            Client.request(type: Wire.cmdRead, length: 4096),
            Client.request(type: Wire.cmdWrite, length: 100, payload: payload),
        ] {
            let isWrite = message.count > 28
            for prefix in 0..<message.count {
                var decoder = NBDRequestDecoder()
                var buffer = ByteBuffer(bytes: message[0..<prefix])
                #expect(decoder.decode(&buffer).isNeedMoreData, "prefix \(prefix)")
                let headerTaken = isWrite && prefix >= 28
                #expect(buffer.readableBytes == (headerTaken ? prefix - 28 : prefix), "prefix \(prefix)")
                #expect(decoder.isWithinRequest == headerTaken, "prefix \(prefix)")
                #expect(decoder.bytesMissing(in: buffer) == (prefix < 28 ? 28 - prefix : message.count - prefix), "prefix \(prefix)")
                // Completing the message then yields the request.
                buffer.writeBytes(message[prefix...])
                let request = try #require(decoder.decode(&buffer).request, "prefix \(prefix)")
                if request.type == Wire.cmdWrite {
                    #expect(request.payload?.bytes == payload)
                } else {
                    #expect(request.length == 4096)
                }
                #expect(buffer.readableBytes == 0)
            }
        }
    }

    @Test("a WRITE header read alone: its payload is then sliced from the next read in place, not copied")
    func payloadAfterHeaderIsNotCopied() throws {
        var decoder = NBDRequestDecoder()
        let payload = (0..<4096).map { UInt8(truncatingIfNeeded: $0 * 3) }
        var header = ByteBuffer(bytes: Client.request(type: Wire.cmdWrite, cookie: 9, offset: 4096, length: 4096))
        #expect(decoder.decode(&header).isNeedMoreData)
        #expect(header.readableBytes == 0)
        #expect(decoder.bytesNeeded(in: header) == 4096)
        let next = Client.request(type: Wire.cmdFlush, cookie: 10)
        var second = ByteBuffer(bytes: payload + next)
        let request = try #require(decoder.decode(&second).request)
        #expect(request.cookie == 9 && request.offset == 4096)
        let slice = try #require(request.payload)
        #expect(slice.bytes == payload)
        let sliceStart = slice.withUnsafeReadableBytes { $0.baseAddress }
        let inputStart = second.withUnsafeReadableBytes { $0.baseAddress.map { $0 - 4096 } }
        #expect(sliceStart == inputStart, "the payload is the input's own storage")
        #expect(!decoder.isWithinRequest)
        #expect(try #require(decoder.decode(&second).request).cookie == 10)
    }

    @Test("a bad magic is a protocol violation", arguments: [UInt32(0), 0x2560_9514, 0x21e4_1c71, 0x6744_6698, 0x1325_6025])
    func badMagic(magic: UInt32) {
        var decoder = NBDRequestDecoder()
        var buffer = ByteBuffer(bytes: Client.request(type: Wire.cmdRead, length: 512, magic: magic))
        #expect(decoder.decode(&buffer).violation == .badMagic(magic))
    }

    @Test("several requests in one buffer come out one per call, in order")
    func severalRequests() throws {
        var decoder = NBDRequestDecoder()
        var bytes: [UInt8] = []
        for cookie in UInt64(1)...5 {
            if cookie % 2 == 0 {
                bytes += Client.request(
                    type: Wire.cmdWrite, cookie: cookie, offset: cookie * 512, length: 3,
                    payload: [UInt8(cookie), 0, UInt8(cookie)])
            } else {
                bytes += Client.request(type: Wire.cmdRead, cookie: cookie, offset: cookie * 512, length: 512)
            }
        }
        var buffer = ByteBuffer(bytes: bytes)
        var cookies: [UInt64] = []
        while let request = decoder.decode(&buffer).request {
            cookies.append(request.cookie)
            #expect(request.offset == request.cookie * 512)
            if request.type == Wire.cmdWrite {
                #expect(request.payload?.bytes == [UInt8(request.cookie), 0, UInt8(request.cookie)])
            }
        }
        #expect(cookies == [1, 2, 3, 4, 5])
        #expect(buffer.readableBytes == 0)
    }

    @Test("a WRITE over 32 MiB (up to 64 MiB) is drained across feeds and emitted with payloadDiscarded", arguments: [UInt32(32 << 20) + 1, 48 << 20, 64 << 20])
    func drainedWrite(length: UInt32) throws {
        var decoder = NBDRequestDecoder()
        let header = Client.request(type: Wire.cmdWrite, cookie: 77, offset: 4096, length: length)
        var buffer = ByteBuffer(bytes: header)
        #expect(decoder.decode(&buffer).isNeedMoreData)
        #expect(buffer.readableBytes == 0)
        // Feed the payload in uneven pieces; the decoder never holds on to it.
        let chunk = [UInt8](repeating: 0x11, count: 3 << 20)
        var remaining = Int(length)
        var feeds = 0
        while remaining > 0 {
            let piece = min(remaining, chunk.count - feeds % 3)
            remaining -= piece
            feeds += 1
            buffer.discardReadBytes()
            buffer.writeBytes(chunk[0..<piece])
            if remaining > 0 {
                #expect(decoder.bytesNeeded(in: buffer) == nil)
                let result = decoder.decode(&buffer)
                #expect(result.isNeedMoreData)
                #expect(buffer.readableBytes == 0)
                guard result.isNeedMoreData else { return }
            }
        }
        // The last piece arrives together with the next request.
        let next = Client.request(type: Wire.cmdFlush, cookie: 78)
        buffer.writeBytes(next)
        let request = try #require(decoder.decode(&buffer).request)
        #expect(request.cookie == 77)
        #expect(request.type == Wire.cmdWrite)
        #expect(request.length == length)
        #expect(request.offset == 4096)
        #expect(request.payloadDiscarded)
        #expect(request.payload == nil)
        #expect(feeds > 5)
        #expect(buffer.bytes == next)
        #expect(decoder.decode(&buffer).request?.cookie == 78)
    }

    @Test("a WRITE of exactly 32 MiB is kept, not discarded")
    func maximumWriteKept() throws {
        var decoder = NBDRequestDecoder()
        let length = 32 << 20
        var buffer = ByteBuffer(bytes: Client.request(type: Wire.cmdWrite, length: UInt32(length)))
        #expect(decoder.decode(&buffer).isNeedMoreData)
        #expect(buffer.readableBytes == 0, "the header is taken; the payload is awaited")
        #expect(decoder.bytesNeeded(in: buffer) == length)
        buffer.writeRepeatingByte(0x42, count: length)
        let request = try #require(decoder.decode(&buffer).request)
        #expect(request.payloadDiscarded == false)
        #expect(request.payload?.readableBytes == length)
    }

    @Test("a WRITE over 64 MiB is a protocol violation", arguments: [UInt32(64 << 20) + 1, 128 << 20, 0xFFFF_FFFF])
    func writeTooLarge(length: UInt32) {
        var decoder = NBDRequestDecoder()
        var buffer = ByteBuffer(bytes: Client.request(type: Wire.cmdWrite, length: length))
        #expect(decoder.decode(&buffer).violation == .payloadTooLarge(UInt64(length)))
    }

    @Test("bytesNeeded reports header plus payload for WRITEs up to 32 MiB, nil otherwise")
    func bytesNeeded() {
        let decoder = NBDRequestDecoder()
        #expect(decoder.bytesNeeded(in: ByteBuffer(bytes: Client.request(type: Wire.cmdWrite, length: 4096))) == 28 + 4096)
        #expect(
            decoder.bytesNeeded(in: ByteBuffer(bytes: Client.request(type: Wire.cmdWrite, length: 32 << 20)))
                == 28 + (32 << 20))
        #expect(decoder.bytesNeeded(in: ByteBuffer(bytes: Client.request(type: Wire.cmdWrite, length: 0))) == 28)
        #expect(decoder.bytesNeeded(in: ByteBuffer(bytes: Client.request(type: Wire.cmdWrite, length: (32 << 20) + 1))) == nil)
        #expect(decoder.bytesNeeded(in: ByteBuffer(bytes: Client.request(type: Wire.cmdRead, length: 4096))) == nil)
        #expect(decoder.bytesNeeded(in: ByteBuffer(bytes: Array(Client.request(type: Wire.cmdWrite, length: 8)[0..<27]))) == nil)
        #expect(decoder.bytesNeeded(in: ByteBuffer()) == nil)
        // Relative to the reader index, not the start of the storage.
        var buffer = ByteBuffer(bytes: [9, 9, 9] + Client.request(type: Wire.cmdWrite, length: 10))
        buffer.moveReaderIndex(forwardBy: 3)
        #expect(decoder.bytesNeeded(in: buffer) == 38)
    }

    @Test("bytesMissing counts what completes the header, then a WRITE's payload")
    func bytesMissing() {
        let decoder = NBDRequestDecoder()
        let write = Client.request(type: Wire.cmdWrite, length: 100) + [UInt8](repeating: 7, count: 100)
        #expect(decoder.bytesMissing(in: ByteBuffer()) == 28)
        #expect(decoder.bytesMissing(in: ByteBuffer(bytes: write[0..<1])) == 27)
        #expect(decoder.bytesMissing(in: ByteBuffer(bytes: write[0..<28])) == 100)
        #expect(decoder.bytesMissing(in: ByteBuffer(bytes: write[0..<60])) == 68)
        #expect(decoder.bytesMissing(in: ByteBuffer(bytes: write)) == 0)
        #expect(decoder.bytesMissing(in: ByteBuffer(bytes: write + [1, 2, 3])) == 0)
        #expect(decoder.bytesMissing(in: ByteBuffer(bytes: Client.request(type: Wire.cmdRead, length: 4096))) == 0)
        // A WRITE too large to keep is drained, not buffered: nothing to top up.
        #expect(decoder.bytesMissing(in: ByteBuffer(bytes: Client.request(type: Wire.cmdWrite, length: (32 << 20) + 1))) == 0)
    }

    @Test("bytesMissing is nil while an oversized payload is drained")
    func bytesMissingWhileDraining() {
        var decoder = NBDRequestDecoder()
        var buffer = ByteBuffer(bytes: Client.request(type: Wire.cmdWrite, length: (32 << 20) + 1))
        #expect(decoder.decode(&buffer).isNeedMoreData)
        #expect(decoder.bytesMissing(in: buffer) == nil)
    }
}
