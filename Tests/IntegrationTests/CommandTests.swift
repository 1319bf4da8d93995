import Foundation
import NBDClient
import Testing

/// Every transmission command and flag, through libnbd, against a writable export.
@Suite("Commands and flags", .serialized)
struct CommandTests {
    @Test("advertises the writable-export flags, structured replies, base:allocation and block sizes")
    func advertisedFlags() throws {
        let fixture = try ServerFixture()
        let connection = try fixture.connect()
        #expect(try connection.size == UInt64(ServerFixture.defaultSize))
        #expect(connection.protocolName == "newstyle-fixed")
        #expect(try connection.structuredRepliesNegotiated)
        #expect(try !connection.isReadOnly)
        #expect(try connection.canFlush)
        #expect(try connection.canFUA)
        #expect(try connection.canTrim)
        #expect(try connection.canZero)
        #expect(try connection.canFastZero)
        #expect(try connection.canDF)
        #expect(try connection.canMultiConn)
        #expect(try connection.canCache)
        #expect(try !connection.isRotational)
        #expect(try connection.canMetaContext("base:allocation"))
        #expect(try connection.blockSizes == NBDBlockSizes(minimum: 512, preferred: 4096, maximum: 32 << 20))
    }

    @Test("minimum block size is 1 when the image size is not a multiple of 512")
    func byteGranularMinimum() throws {
        let fixture = try ServerFixture(size: 1_000_000 + 3)
        let connection = try fixture.connect()
        #expect(try connection.size == 1_000_003)
        #expect(try connection.blockSizes == NBDBlockSizes(minimum: 1, preferred: 4096, maximum: 32 << 20))
        // Byte-granular: an odd-sized write at the very end works and lands in the file.
        try connection.pwrite([1, 2, 3, 4, 5], offset: 999_998)
        #expect(try connection.pread(count: 5, offset: 999_998) == [1, 2, 3, 4, 5])
        #expect(try ImageFile.read(fixture.image, offset: 999_998, count: 5) == [1, 2, 3, 4, 5])
    }

    @Test(
        "without structured replies (the client does not ask, or the server refuses with --no-structured-replies): simple replies, no DF, no metadata contexts; reads, writes, zeroes and errors work",
        arguments: [false, true])
    func withoutStructuredReplies(serverRefuses: Bool) throws {
        let fixture = try ServerFixture(filled: true, extraArguments: serverRefuses ? ["--no-structured-replies"] : [])
        let connection = try fixture.connect { configuration in
            configuration.requestStructuredReplies = serverRefuses
            configuration.strictMode = []
        }
        #expect(try !connection.structuredRepliesNegotiated)
        #expect(try !connection.canDF)
        #expect(try !connection.canMetaContext("base:allocation"))
        #expect(try connection.pread(count: 65536, offset: 8192) == ImageFile.pattern(count: 65536, offset: 8192))
        let data = ImageFile.pattern(count: 4096, offset: 0, seed: 3)
        try connection.pwrite(data, offset: 1 << 20)
        try connection.zero(count: 4096, offset: 2 << 20)
        #expect(try connection.pread(count: 4096, offset: 1 << 20) == data)
        #expect(try connection.pread(count: 4096, offset: 2 << 20) == ImageFile.constant(0, count: 4096))
        // A read past the end (libnbd's own bounds check off) gets a simple error reply
        // with no data; the connection goes on.
        expectErrno(EINVAL, "READ past the end") {
            _ = try connection.pread(count: 4096, offset: UInt64(ServerFixture.defaultSize))
        }
        #expect(try connection.pread(count: 512, offset: 0) == ImageFile.pattern(count: 512, offset: 0))
    }

    @Test("WRITE then READ round-trips, on the wire and in the file", arguments: [
        (offset: 0, count: 512),
        (offset: 4096, count: 4096),
        (offset: 1 << 20, count: 1 << 20),
        (offset: (16 << 20) - 512, count: 512),
        (offset: 3 * 512, count: 8 * 512),
    ])
    func writeRead(offset: Int, count: Int) throws {
        let fixture = try ServerFixture()
        let connection = try fixture.connect()
        let data = ImageFile.pattern(count: count, offset: offset, seed: 7)
        try connection.pwrite(data, offset: UInt64(offset))
        #expect(try connection.pread(count: count, offset: UInt64(offset)) == data)
        try connection.flush()
        #expect(try ImageFile.read(fixture.image, offset: offset, count: count) == data)
        // Neighbours are untouched (still zero).
        if offset >= 512 {
            #expect(try connection.pread(count: 512, offset: UInt64(offset - 512)) == ImageFile.constant(0, count: 512))
        }
    }

    @Test("a 32 MiB READ and WRITE (the advertised maximum) succeed")
    func maximumPayload() throws {
        let fixture = try ServerFixture(size: 40 << 20)
        let connection = try fixture.connect()
        let data = ImageFile.pattern(count: 32 << 20, offset: 4096, seed: 3)
        try connection.pwrite(data, offset: 4096)
        #expect(try connection.pread(count: 32 << 20, offset: 4096) == data)
    }

    @Test("WRITE with FUA is durable in the file when acknowledged")
    func writeFUA() throws {
        let fixture = try ServerFixture()
        let connection = try fixture.connect()
        let data = ImageFile.constant(0xA5, count: 65536)
        try connection.pwrite(data, offset: 131072, flags: [.fua])
        #expect(try ImageFile.read(fixture.image, offset: 131072, count: 65536) == data)
        #expect(try connection.pread(count: 65536, offset: 131072) == data)
    }

    @Test("READ with DF returns the data in a single data chunk, across data and holes")
    func readDF() throws {
        let fixture = try ServerFixture()
        let connection = try fixture.connect()
        let data = ImageFile.constant(0x5A, count: 4096)
        try connection.pwrite(data, offset: 65536)
        let read = try connection.preadChunks(count: 65536, offset: 32768, flags: [.df])
        var expected = ImageFile.constant(0, count: 65536)
        expected.replaceSubrange(32768..<(32768 + 4096), with: data)
        #expect(read.data == expected)
        #expect(read.chunks == [NBDReadChunk(offset: 32768, count: 65536, kind: .data)])
    }

    @Test("structured READ chunks tile the request exactly, whatever mix of data and holes")
    func structuredReadChunks() throws {
        let fixture = try ServerFixture()
        let connection = try fixture.connect()
        try connection.pwrite(ImageFile.constant(0x11, count: 8192), offset: 1 << 20)
        let offset: UInt64 = (1 << 20) - 65536
        let read = try connection.preadChunks(count: 4 << 20, offset: offset)
        var expected = ImageFile.constant(0, count: 4 << 20)
        expected.replaceSubrange(65536..<(65536 + 8192), with: ImageFile.constant(0x11, count: 8192))
        #expect(read.data == expected)
        let chunks = read.chunks.sorted { $0.offset < $1.offset }
        #expect(!chunks.contains { $0.kind != .data && $0.kind != .hole }, "\(chunks)")
        var position = offset
        for chunk in chunks {
            #expect(chunk.offset == position, "chunks must not overlap or leave gaps: \(chunks)")
            #expect(chunk.count > 0)
            position = chunk.offset + UInt64(chunk.count)
        }
        #expect(position == offset + (4 << 20))
    }

    @Test("FLUSH succeeds after writes and with nothing to flush")
    func flush() throws {
        let fixture = try ServerFixture()
        let connection = try fixture.connect()
        try connection.flush()
        try connection.pwrite(ImageFile.constant(1, count: 4096), offset: 0)
        try connection.flush()
        #expect(try ImageFile.read(fixture.image, offset: 0, count: 4096) == ImageFile.constant(1, count: 4096))
    }

    @Test("TRIM (with and without FUA) succeeds and the range reads back as zeroes")
    func trim() throws {
        let fixture = try ServerFixture(filled: true)
        let connection = try fixture.connect()
        try connection.trim(count: 1 << 20, offset: 1 << 20)
        try connection.trim(count: 1 << 20, offset: 4 << 20, flags: [.fua])
        // TRIM is advisory, but on a raw file the server punches holes, which read as zero.
        for offset in [1 << 20, 4 << 20] {
            #expect(try connection.pread(count: 1 << 20, offset: UInt64(offset)) == ImageFile.constant(0, count: 1 << 20))
        }
        // Data around the trimmed ranges is intact.
        #expect(try connection.pread(count: 4096, offset: (1 << 20) - 4096) == ImageFile.pattern(count: 4096, offset: (1 << 20) - 4096))
        #expect(try connection.pread(count: 4096, offset: 2 << 20) == ImageFile.pattern(count: 4096, offset: 2 << 20))
    }

    @Test("WRITE_ZEROES with no flag, NO_HOLE, FUA and NO_HOLE|FUA zeroes exactly the range", arguments: [
        NBDCommandFlags(), [.noHole], [.fua], [.noHole, .fua],
    ])
    func writeZeroes(flags: NBDCommandFlags) throws {
        let fixture = try ServerFixture(filled: true)
        let connection = try fixture.connect()
        let offset = 3 << 20
        let count = (1 << 20) + 8192
        try connection.zero(count: UInt64(count), offset: UInt64(offset), flags: flags)
        #expect(try connection.pread(count: count, offset: UInt64(offset)) == ImageFile.constant(0, count: count))
        if flags.contains(.fua) {
            #expect(try ImageFile.read(fixture.image, offset: offset, count: count) == ImageFile.constant(0, count: count))
        }
        #expect(try connection.pread(count: 4096, offset: UInt64(offset - 4096)) == ImageFile.pattern(count: 4096, offset: offset - 4096))
        #expect(try connection.pread(count: 4096, offset: UInt64(offset + count)) == ImageFile.pattern(count: 4096, offset: offset + count))
    }

    @Test("WRITE_ZEROES with FAST_ZERO either zeroes or fails with ENOTSUP leaving data untouched", arguments: [
        NBDCommandFlags([.fastZero]), [.fastZero, .noHole],
    ])
    func fastZero(flags: NBDCommandFlags) throws {
        let fixture = try ServerFixture(filled: true)
        let connection = try fixture.connect()
        let offset = 2 << 20
        let count = 1 << 20
        if let error = nbdError({ try connection.zero(count: UInt64(count), offset: UInt64(offset), flags: flags) }) {
            #expect(error.errno == EOPNOTSUPP, "FAST_ZERO may only fail with ENOTSUP, got \(error)")
            #expect(try connection.pread(count: count, offset: UInt64(offset)) == ImageFile.pattern(count: count, offset: offset))
            expectUsable(connection, "after FAST_ZERO ENOTSUP")
        } else {
            #expect(try connection.pread(count: count, offset: UInt64(offset)) == ImageFile.constant(0, count: count))
        }
        // Either way the neighbours keep their data.
        #expect(try connection.pread(count: 512, offset: UInt64(offset + count)) == ImageFile.pattern(count: 512, offset: offset + count))
    }

    @Test("FAST_ZERO on a range that is already a hole succeeds")
    func fastZeroOnHole() throws {
        let fixture = try ServerFixture()
        let connection = try fixture.connect()
        // Punching a hole into a hole is the cheapest possible zeroing; accept ENOTSUP only
        // if the server never zeroes fast, but then the range must still read as zero.
        if let error = nbdError({ try connection.zero(count: 1 << 20, offset: 0, flags: [.fastZero]) }) {
            #expect(error.errno == EOPNOTSUPP)
        }
        #expect(try connection.pread(count: 1 << 20, offset: 0) == ImageFile.constant(0, count: 1 << 20))
    }

    @Test("CACHE succeeds and changes nothing")
    func cache() throws {
        let fixture = try ServerFixture(filled: true)
        let connection = try fixture.connect()
        try connection.cache(count: 4 << 20, offset: 0)
        try connection.cache(count: UInt64(ServerFixture.defaultSize), offset: 0)
        #expect(try connection.pread(count: 1 << 20, offset: 0) == ImageFile.pattern(count: 1 << 20, offset: 0))
    }

    @Test("BLOCK_STATUS reports base:allocation: hole|zero for holes, data for written blocks")
    func blockStatus() throws {
        let fixture = try ServerFixture()
        let connection = try fixture.connect()
        let dataOffset: UInt64 = 1 << 20
        try connection.pwrite(ImageFile.constant(0x42, count: 65536), offset: dataOffset)
        try connection.flush()

        let status = try connection.blockStatus(count: UInt64(ServerFixture.defaultSize), offset: 0)
        #expect(Array(status.keys) == ["base:allocation"])
        let extents = try #require(status["base:allocation"])
        #expect(!extents.isEmpty)
        #expect(extents.allSatisfy { $0.length > 0 && $0.length % 512 == 0 })
        // Never past the export end.
        #expect(extents.reduce(UInt64(0)) { $0 + UInt64($1.length) } <= UInt64(ServerFixture.defaultSize))
        // Neighbouring extents differ (merged).
        for (left, right) in zip(extents, extents.dropFirst()) {
            #expect(left.flags != right.flags, "adjacent extents with equal flags \(left.flags)")
        }
        #expect(allocationFlags(at: 0, in: extents, from: 0) == [.hole, .zero])
        #expect(allocationFlags(at: dataOffset, in: extents, from: 0) == [])
        #expect(allocationFlags(at: dataOffset + 65535, in: extents, from: 0) == [])
        #expect(allocationFlags(at: 8 << 20, in: extents, from: 0) == [.hole, .zero])

        // From an offset inside the data: the first extent starts there and is data.
        let inner = try connection.blockStatus(count: 1 << 20, offset: dataOffset + 4096)
        let first = try #require(inner["base:allocation"]?.first)
        #expect(first.flags == 0)
        #expect(first.length >= 4096 && first.length <= 65536 - 4096)
    }

    @Test("BLOCK_STATUS with REQ_ONE returns one extent no longer than the request")
    func blockStatusReqOne() throws {
        let fixture = try ServerFixture()
        let connection = try fixture.connect()
        try connection.pwrite(ImageFile.constant(0x42, count: 1 << 20), offset: 2 << 20)

        let hole = try connection.blockStatus(count: 8 << 20, offset: 0, flags: [.reqOne])
        let holeExtents = try #require(hole["base:allocation"])
        #expect(holeExtents.count == 1)
        #expect(holeExtents.first?.length == 2 << 20)
        #expect(holeExtents.first?.flags == NBDAllocationFlags([.hole, .zero]).rawValue)

        let data = try connection.blockStatus(count: 4096, offset: 2 << 20, flags: [.reqOne])
        let dataExtents = try #require(data["base:allocation"])
        #expect(dataExtents.count == 1)
        #expect(dataExtents.first.map { $0.length <= 4096 && $0.length > 0 } == true)
        #expect(dataExtents.first?.flags == 0)
    }

    @Test("BLOCK_STATUS accepts requests far larger than the maximum payload")
    func blockStatusLargeRequest() throws {
        let fixture = try ServerFixture(size: 1 << 30)
        let connection = try fixture.connect()
        try connection.pwrite(ImageFile.constant(9, count: 4096), offset: 700 << 20)
        let map = try allocationMap(connection, length: 1 << 30)
        #expect(map.reduce(UInt64(0)) { $0 + $1.length } == 1 << 30)
        #expect(map.contains { $0.flags == 0 && $0.offset <= 700 << 20 && $0.offset + $0.length >= (700 << 20) + 4096 })
    }

    @Test("DISC ends the connection cleanly and the server keeps serving")
    func disconnect() throws {
        let fixture = try ServerFixture()
        let first = try fixture.connect()
        try first.pwrite(ImageFile.constant(7, count: 4096), offset: 0)
        try first.shutdown()
        #expect(!first.isReady)
        let second = try fixture.connect()
        #expect(try second.pread(count: 4096, offset: 0) == ImageFile.constant(7, count: 4096))
        #expect(fixture.server.isRunning)
    }

    @Test("64 pipelined writes, then 64 pipelined reads, on one connection")
    func pipelined() throws {
        let fixture = try ServerFixture()
        let connection = try fixture.connect()
        let count = 64
        let size = 128 * 1024
        // Interleaved order so replies for neighbouring offsets are not adjacent.
        let offsets = (0..<count).map { (($0 * 37) % count) * size }
        let writes = offsets.enumerated().map { index, offset in
            NBDConnection.PipelinedWrite(
                offset: UInt64(offset), data: ImageFile.pattern(count: size, offset: offset, seed: 13),
                flags: index % 8 == 0 ? [.fua] : [])
        }
        let errors = connection.pipelinedWrites(writes)
        #expect(errors.allSatisfy { $0 == nil }, "\(errors.compactMap { $0 })")
        let reads = connection.pipelinedReads(offsets.map { (offset: UInt64($0), count: size) })
        for (offset, result) in zip(offsets, reads) {
            #expect((try? result.get()) == ImageFile.pattern(count: size, offset: offset, seed: 13), "offset \(offset)")
        }
        try connection.flush()
        #expect(try ImageFile.read(fixture.image, offset: 0, count: count * size) == ImageFile.pattern(count: count * size, offset: 0, seed: 13))
    }

    @Test("pipelined requests mixing successes and errors each get their own reply")
    func pipelinedWithErrors() throws {
        let fixture = try ServerFixture()
        let connection = try fixture.connect { $0.strictMode = [] }
        let end = UInt64(ServerFixture.defaultSize)
        var writes: [NBDConnection.PipelinedWrite] = []
        for index in 0..<32 {
            let offset: UInt64 = index % 4 == 3 ? end + UInt64(index) * 4096 : UInt64(index) * 4096
            writes.append(NBDConnection.PipelinedWrite(offset: offset, data: ImageFile.constant(UInt8(index + 1), count: 4096)))
        }
        let errors = connection.pipelinedWrites(writes)
        for (index, error) in errors.enumerated() {
            if index % 4 == 3 {
                #expect(error?.errno == ENOSPC, "write \(index): \(String(describing: error))")
            } else {
                #expect(error == nil, "write \(index): \(String(describing: error))")
                #expect(try connection.pread(count: 4096, offset: UInt64(index) * 4096) == ImageFile.constant(UInt8(index + 1), count: 4096))
            }
        }
        expectUsable(connection, "after pipelined errors")
    }

    @Test("requests from concurrent threads on one connection")
    func concurrentRequests() throws {
        let fixture = try ServerFixture()
        let connection = try fixture.connect()
        let failures = Failures()
        DispatchQueue.concurrentPerform(iterations: 16) { index in
            let offset = index * 256 * 1024
            let data = ImageFile.pattern(count: 256 * 1024, offset: offset, seed: UInt8(index))
            do {
                try connection.pwrite(data, offset: UInt64(offset))
                if try connection.pread(count: data.count, offset: UInt64(offset)) != data {
                    failures.add("mismatch at \(offset)")
                }
            } catch {
                failures.add("\(offset): \(error)")
            }
        }
        #expect(failures.all.isEmpty, "\(failures.all)")
    }
}
