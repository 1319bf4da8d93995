import Foundation
import NBDClient
import Testing

/// Requests reach the server in whatever pieces the socket delivers: a header or a WRITE
/// payload split across reads must come out exactly as sent.
@Suite("Request framing", .serialized)
struct RequestFramingTests {
    @Test("requests split across socket reads at every kind of boundary are all carried out")
    func splitRequests() throws {
        let fixture = try ServerFixture(filled: true)
        let raw = try RawNBDSocket(unixSocket: fixture.directory.socketPath)
        try raw.handshake()
        try raw.go(export: "disk")

        // WRITEs of awkward lengths, each followed by a READ of untouched data.
        let writeLengths = [1, 27, 28, 29, 4096, 5000, 65_536 + 3, 300_000]
        var stream: [UInt8] = []
        var writes: [(offset: Int, bytes: [UInt8])] = []
        var readOffsets: [UInt64: Int] = [:]
        for (index, length) in writeLengths.enumerated() {
            let offset = (index + 1) << 20
            let bytes = ImageFile.constant(UInt8(0x40 + index), count: length)
            writes.append((offset, bytes))
            stream += Self.request(type: 1, cookie: UInt64(100 + index), offset: UInt64(offset), length: UInt32(length)) + bytes
            let readOffset = UInt64(offset + (512 << 10))
            readOffsets[UInt64(200 + index)] = Int(readOffset)
            stream += Self.request(type: 0, cookie: UInt64(200 + index), offset: readOffset, length: 4096)
        }
        stream += Self.request(type: 3, cookie: 999)  // FLUSH

        // Uneven pieces, each sent on its own so the server reads them separately.
        let pieces = [1, 7, 20, 28, 29, 100, 3000, 4124, 9000, 70_000]
        var position = 0
        var turn = 0
        while position < stream.count {
            let size = min(pieces[turn % pieces.count], stream.count - position)
            try raw.send(Array(stream[position..<(position + size)]))
            position += size
            turn += 1
            usleep(1000)
        }

        // Replies come in any order: collect them by cookie.
        var seen: Set<UInt64> = []
        for _ in 0..<(writeLengths.count * 2 + 1) {
            let header = try raw.receive(16)
            #expect(RawNBDSocket.u32(header, 0) == RawNBDSocket.simpleReplyMagic)
            #expect(RawNBDSocket.u32(header, 4) == 0)
            let cookie = RawNBDSocket.u64(header, 8)
            seen.insert(cookie)
            if let offset = readOffsets[cookie] {
                #expect(try raw.receive(4096) == ImageFile.pattern(count: 4096, offset: offset), "READ \(cookie)")
            }
        }
        var expected: Set<UInt64> = [999]
        for index in writeLengths.indices {
            expected.insert(UInt64(100 + index))
            expected.insert(UInt64(200 + index))
        }
        #expect(seen == expected)

        for write in writes {
            #expect(try ImageFile.read(fixture.image, offset: write.offset, count: write.bytes.count) == write.bytes)
            // The byte after each WRITE is untouched.
            let after = write.offset + write.bytes.count
            #expect(try ImageFile.read(fixture.image, offset: after, count: 1) == ImageFile.pattern(count: 1, offset: after))
        }
    }

    static func request(type: UInt16, cookie: UInt64, offset: UInt64 = 0, length: UInt32 = 0) -> [UInt8] {
        var bytes = RawNBDSocket.be(RawNBDSocket.requestMagic)
        bytes += RawNBDSocket.be(UInt16(0))
        bytes += RawNBDSocket.be(type)
        bytes += RawNBDSocket.be(cookie)
        bytes += RawNBDSocket.be(offset)
        bytes += RawNBDSocket.be(length)
        return bytes
    }
}
