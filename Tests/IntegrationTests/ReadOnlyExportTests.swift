import Foundation
import NBDClient
import Testing

/// A `--read-only` export: advertised as such, readable, and refusing every change with
/// EPERM without losing the connection.
@Suite("Read-only export", .serialized)
struct ReadOnlyExportTests {
    @Test("advertises READ_ONLY and no TRIM, WRITE_ZEROES or FAST_ZERO")
    func flags() throws {
        let fixture = try ServerFixture(filled: true, extraArguments: ["--read-only"])
        let connection = try fixture.connect()
        #expect(try connection.isReadOnly)
        #expect(try !connection.canTrim)
        #expect(try !connection.canZero)
        #expect(try !connection.canFastZero)
        #expect(try connection.canFlush)
        #expect(try connection.canFUA)
        #expect(try connection.canCache)
        #expect(try connection.canMultiConn)
        #expect(try connection.canDF)
        #expect(try connection.canMetaContext("base:allocation"))
        #expect(try connection.size == UInt64(ServerFixture.defaultSize))
    }

    @Test("reads, CACHE, FLUSH and BLOCK_STATUS work")
    func reads() throws {
        let fixture = try ServerFixture(filled: true, extraArguments: ["--read-only"])
        let connection = try fixture.connect()
        #expect(try connection.pread(count: 1 << 20, offset: 3 << 20) == ImageFile.pattern(count: 1 << 20, offset: 3 << 20))
        #expect(try connection.pread(count: 65536, offset: 0, flags: [.df]) == ImageFile.pattern(count: 65536, offset: 0))
        try connection.cache(count: 1 << 20, offset: 0)
        try connection.flush()
        let map = try allocationMap(connection, length: UInt64(ServerFixture.defaultSize))
        #expect(map.allSatisfy { !NBDAllocationFlags(rawValue: $0.flags).contains(.hole) })
    }

    @Test("WRITE, WRITE_ZEROES and TRIM fail with EPERM, change nothing, and the connection survives")
    func writesRefused() throws {
        let fixture = try ServerFixture(filled: true, extraArguments: ["--read-only"])
        let before = try ImageFile.read(fixture.image)
        let connection = try fixture.connect { $0.strictMode = [] }
        expectErrno(EPERM, "WRITE") { try connection.pwrite(ImageFile.constant(0xFF, count: 65536), offset: 0) }
        expectUsable(connection, "after WRITE")
        expectErrno(EPERM, "WRITE with FUA") { try connection.pwrite(ImageFile.constant(0xFF, count: 4096), offset: 4096, flags: [.fua]) }
        expectUsable(connection, "after WRITE+FUA")
        expectErrno(EPERM, "WRITE_ZEROES") { try connection.zero(count: 1 << 20, offset: 0) }
        expectUsable(connection, "after WRITE_ZEROES")
        expectErrno(EPERM, "TRIM") { try connection.trim(count: 1 << 20, offset: 1 << 20) }
        expectUsable(connection, "after TRIM")
        // A refused 1 MiB write: its payload must have been skipped, not parsed.
        expectErrno(EPERM, "1 MiB WRITE") { try connection.pwrite(ImageFile.constant(0x25, count: 1 << 20), offset: 2 << 20) }
        expectUsable(connection, "after 1 MiB WRITE")
        #expect(try connection.pread(count: 65536, offset: 0) == Array(before[0..<65536]))
        try connection.flush()
        #expect(try ImageFile.read(fixture.image) == before)
    }

    @Test("libnbd's own strict mode also refuses writes on a read-only export")
    func clientSideRefusal() throws {
        let fixture = try ServerFixture(filled: true, extraArguments: ["--read-only"])
        let connection = try fixture.connect()
        #expect(nbdError { try connection.pwrite([1], offset: 0) } != nil)
        expectUsable(connection, "after a client-side refusal")
    }
}
