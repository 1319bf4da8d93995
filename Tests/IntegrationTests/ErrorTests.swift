import Foundation
import NBDClient
import Testing

/// The server's error answers, each followed by a check that the connection still works.
///
/// libnbd's strict mode would refuse most of these requests before they reach the wire,
/// so these connections switch it off: the errno then comes from the server's reply.
@Suite("Errors", .serialized)
struct ErrorTests {
    static let size = ServerFixture.defaultSize

    @Test("out-of-range READ, TRIM, CACHE and BLOCK_STATUS fail with EINVAL")
    func outOfRangeEINVAL() throws {
        let fixture = try ServerFixture(filled: true)
        let connection = try fixture.connect { $0.strictMode = [] }
        let end = UInt64(Self.size)
        for (offset, count) in [(end - 512, UInt64(1024)), (end, UInt64(512)), (end + (1 << 20), UInt64(4096))] {
            expectErrno(EINVAL, "READ \(count)@\(offset)") { _ = try connection.pread(count: Int(count), offset: offset) }
            expectUsable(connection, "after READ \(count)@\(offset)")
            expectErrno(EINVAL, "TRIM \(count)@\(offset)") { try connection.trim(count: count, offset: offset) }
            expectUsable(connection, "after TRIM \(count)@\(offset)")
            expectErrno(EINVAL, "CACHE \(count)@\(offset)") { try connection.cache(count: count, offset: offset) }
            expectUsable(connection, "after CACHE \(count)@\(offset)")
            expectErrno(EINVAL, "BLOCK_STATUS \(count)@\(offset)") { _ = try connection.blockStatus(count: count, offset: offset) }
            expectUsable(connection, "after BLOCK_STATUS \(count)@\(offset)")
        }
        // The trims that were refused did not touch the last block.
        #expect(try connection.pread(count: 512, offset: end - 512) == ImageFile.pattern(count: 512, offset: Int(end) - 512))
    }

    @Test("out-of-range WRITE and WRITE_ZEROES fail with ENOSPC and do not grow the file")
    func outOfRangeENOSPC() throws {
        let fixture = try ServerFixture(filled: true)
        let connection = try fixture.connect { $0.strictMode = [] }
        let end = UInt64(Self.size)
        for (offset, count) in [(end - 512, 1024), (end, 512), (end + (1 << 20), 4096)] {
            expectErrno(ENOSPC, "WRITE \(count)@\(offset)") {
                try connection.pwrite(ImageFile.constant(0xEE, count: count), offset: offset)
            }
            expectUsable(connection, "after WRITE \(count)@\(offset)")
            expectErrno(ENOSPC, "WRITE_ZEROES \(count)@\(offset)") { try connection.zero(count: UInt64(count), offset: offset) }
            expectUsable(connection, "after WRITE_ZEROES \(count)@\(offset)")
        }
        try connection.flush()
        #expect(try ImageFile.size(fixture.image) == Self.size)
        #expect(try connection.pread(count: 512, offset: end - 512) == ImageFile.pattern(count: 512, offset: Int(end) - 512))
    }

    @Test("offsets whose end overflows 64 bits are refused, not wrapped")
    func offsetOverflow() throws {
        let fixture = try ServerFixture(filled: true)
        let connection = try fixture.connect { $0.strictMode = [] }
        let offset = UInt64.max - 511
        expectErrno(EINVAL, "READ near 2^64") { _ = try connection.pread(count: 1024, offset: offset) }
        expectUsable(connection, "after READ near 2^64")
        expectErrno(ENOSPC, "WRITE near 2^64") { try connection.pwrite(ImageFile.constant(1, count: 1024), offset: offset) }
        expectUsable(connection, "after WRITE near 2^64")
        expectErrno(ENOSPC, "WRITE_ZEROES near 2^64") { try connection.zero(count: 1024, offset: offset) }
        expectUsable(connection, "after WRITE_ZEROES near 2^64")
        expectErrno(EINVAL, "TRIM near 2^64") { try connection.trim(count: 1024, offset: offset) }
        expectUsable(connection, "after TRIM near 2^64")
        #expect(try connection.pread(count: 4096, offset: 0) == ImageFile.pattern(count: 4096, offset: 0))
    }

    @Test("READ and WRITE over 32 MiB fail with EINVAL; the write payload is drained", arguments: [
        (32 << 20) + 512, 48 << 20, 64 << 20,
    ])
    func oversizedPayload(count: Int) throws {
        let fixture = try ServerFixture(size: 72 << 20)
        let connection = try fixture.connect { $0.strictMode = [] }
        expectErrno(EINVAL, "READ of \(count) bytes") { _ = try connection.pread(count: count, offset: 0) }
        expectUsable(connection, "after oversized READ")
        expectErrno(EINVAL, "WRITE of \(count) bytes") {
            try connection.pwrite(ImageFile.constant(0xCC, count: count), offset: 0)
        }
        // The payload was skipped rather than parsed as requests: the next commands work
        // and nothing was written.
        expectUsable(connection, "after oversized WRITE")
        try connection.pwrite(ImageFile.constant(0x33, count: 4096), offset: 8192)
        #expect(try connection.pread(count: 16384, offset: 0)
            == ImageFile.constant(0, count: 8192) + ImageFile.constant(0x33, count: 4096) + ImageFile.constant(0, count: 4096))
        try connection.flush()
        #expect(try ImageFile.allocatedBytes(fixture.image) < 1 << 20)
    }

    @Test("unaligned requests fail with EINVAL when the client asked for block sizes")
    func unalignedWithBlockSizes() throws {
        let fixture = try ServerFixture(filled: true)
        let connection = try fixture.connect { $0.strictMode = [] }
        #expect(try connection.blockSizes.minimum == 512)
        expectErrno(EINVAL, "READ at offset 1") { _ = try connection.pread(count: 512, offset: 1) }
        expectUsable(connection, "after unaligned READ offset")
        expectErrno(EINVAL, "READ of 100 bytes") { _ = try connection.pread(count: 100, offset: 512) }
        expectUsable(connection, "after unaligned READ length")
        expectErrno(EINVAL, "WRITE at offset 3") { try connection.pwrite(ImageFile.constant(1, count: 512), offset: 3) }
        expectUsable(connection, "after unaligned WRITE")
        expectErrno(EINVAL, "WRITE_ZEROES of 100 bytes") { try connection.zero(count: 100, offset: 4096) }
        expectUsable(connection, "after unaligned WRITE_ZEROES")
        expectErrno(EINVAL, "TRIM at offset 7") { try connection.trim(count: 4096, offset: 7) }
        expectUsable(connection, "after unaligned TRIM")
        // Nothing changed.
        #expect(try connection.pread(count: 8192, offset: 0) == ImageFile.pattern(count: 8192, offset: 0))
    }

    @Test("unaligned requests work when the client did not ask for block sizes")
    func unalignedWithoutBlockSizes() throws {
        let fixture = try ServerFixture(filled: true)
        let connection = try fixture.connect {
            $0.strictMode = []
            $0.requestBlockSize = false
        }
        try connection.pwrite([9, 8, 7, 6, 5], offset: 3)
        #expect(try connection.pread(count: 5, offset: 3) == [9, 8, 7, 6, 5])
        #expect(try connection.pread(count: 100, offset: 1) == Array([ImageFile.pattern(count: 3, offset: 0)[1...], [9, 8, 7, 6, 5], ImageFile.pattern(count: 93, offset: 8)[...]].joined()))
        try connection.zero(count: 10, offset: 1000)
        #expect(try connection.pread(count: 10, offset: 1000) == ImageFile.constant(0, count: 10))
        try connection.flush()
        #expect(try ImageFile.read(fixture.image, offset: 0, count: 8) == [ImageFile.pattern(count: 3, offset: 0), [9, 8, 7, 6, 5]].flatMap { $0 })
        #expect(try ImageFile.read(fixture.image, offset: 1010, count: 2) == ImageFile.pattern(count: 2, offset: 1010))
    }

    @Test("an unknown command fails with EINVAL and the connection carries on")
    func unknownCommand() throws {
        let fixture = try ServerFixture(filled: true)
        let raw = try RawNBDSocket(unixSocket: fixture.server.socketPath ?? "")
        try raw.handshake()
        try raw.go(export: fixture.exportName)
        try raw.sendRequest(type: 0x55, cookie: 0xC0FFEE, offset: 0, length: 512)
        let reply = try raw.readReply()
        #expect(reply.cookie == 0xC0FFEE)
        #expect(reply.error == 22, "NBD_EINVAL")
        // The next READ works (simple replies: no structured reply was negotiated).
        try raw.sendRequest(type: 0, cookie: 2, offset: 0, length: 512)
        let header = try raw.readSimpleReply()
        #expect(header.error == 0)
        #expect(header.cookie == 2)
        #expect(try raw.receive(512) == ImageFile.pattern(count: 512, offset: 0))
    }

    @Test("unknown command flags fail with EINVAL", arguments: [UInt16(0x0040), 0x8000, 0x0008])
    func unknownFlags(flags: UInt16) throws {
        let fixture = try ServerFixture(filled: true)
        let raw = try RawNBDSocket(unixSocket: fixture.server.socketPath ?? "")
        try raw.handshake()
        try raw.go(export: fixture.exportName)
        // 0x0008 (REQ_ONE) is a known flag, but not valid on READ.
        try raw.sendRequest(type: 0, flags: flags, cookie: 7, offset: 0, length: 512)
        let reply = try raw.readReply(readLength: 512)
        #expect(reply.error == 22, "READ with flags 0x\(String(flags, radix: 16)) should be NBD_EINVAL")
        try raw.sendRequest(type: 0, cookie: 8, offset: 0, length: 512)
        let next = try raw.readReply(readLength: 512)
        #expect(next.error == 0 && next.cookie == 8)
    }

    @Test("BLOCK_STATUS without a negotiated metadata context fails with EINVAL")
    func blockStatusWithoutContext() throws {
        let fixture = try ServerFixture()
        let raw = try RawNBDSocket(unixSocket: fixture.server.socketPath ?? "")
        try raw.handshake()
        try raw.sendOption(.structuredReply)
        #expect(try raw.readOptionReply().type == RawNBDSocket.Reply.ack.rawValue)
        try raw.go(export: fixture.exportName)
        try raw.sendRequest(type: 7, cookie: 9, offset: 0, length: 4096)
        let reply = try raw.readReply()
        #expect(reply.cookie == 9)
        #expect(reply.error == 22, "NBD_EINVAL, got \(reply)")
        try raw.sendRequest(type: 3, cookie: 10)  // FLUSH still works
        #expect(try raw.readReply().error == 0)
    }

    @Test("every error reply leaves a libnbd connection READY")
    func errorsInSequence() throws {
        let fixture = try ServerFixture(size: 40 << 20)
        let connection = try fixture.connect { $0.strictMode = [] }
        let end = UInt64(40 << 20)
        for _ in 0..<3 {
            _ = nbdError { _ = try connection.pread(count: 512, offset: end) }
            _ = nbdError { try connection.pwrite(ImageFile.constant(1, count: 512), offset: end) }
            _ = nbdError { _ = try connection.pread(count: 33 << 20, offset: 0) }
            _ = nbdError { try connection.pwrite(ImageFile.constant(1, count: 33 << 20), offset: 0) }
            _ = nbdError { _ = try connection.pread(count: 512, offset: 1) }
        }
        expectUsable(connection, "after a series of errors")
        try connection.pwrite(ImageFile.constant(4, count: 4096), offset: 4096)
        #expect(try connection.pread(count: 4096, offset: 4096) == ImageFile.constant(4, count: 4096))
    }
}
