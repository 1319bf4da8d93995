import Foundation
import NBDClient
import Testing

/// `CAN_MULTI_CONN`: every connection to an export sees the same data, so a write on one
/// connection followed by FLUSH (or FUA) is visible on every other.
@Suite("Multi-connection consistency", .serialized)
struct MultiConnTests {
    @Test("a write on connection A, then FLUSH, is read back on connection B")
    func writeFlushRead() throws {
        let fixture = try ServerFixture()
        let a = try fixture.connect()
        let b = try fixture.connect()
        #expect(try a.canMultiConn && b.canMultiConn)
        // B reads first, so any per-connection cache would hold the old (zero) data.
        #expect(try b.pread(count: 1 << 20, offset: 1 << 20) == ImageFile.constant(0, count: 1 << 20))
        let data = ImageFile.pattern(count: 1 << 20, offset: 1 << 20, seed: 5)
        try a.pwrite(data, offset: 1 << 20)
        try a.flush()
        #expect(try b.pread(count: 1 << 20, offset: 1 << 20) == data)
        #expect(try allocationFlags(at: 1 << 20, in: b.blockStatus(count: 4096, offset: 1 << 20)["base:allocation"] ?? [], from: 1 << 20) == [])
    }

    @Test("a FUA write on A is visible on B; zeroes and trims on B are visible on A")
    func fuaAndZeroes() throws {
        let fixture = try ServerFixture(filled: true)
        let a = try fixture.connect()
        let b = try fixture.connect()
        try a.pwrite(ImageFile.constant(0x77, count: 8192), offset: 0, flags: [.fua])
        #expect(try b.pread(count: 8192, offset: 0) == ImageFile.constant(0x77, count: 8192))
        try b.zero(count: 1 << 20, offset: 2 << 20, flags: [.fua])
        try b.trim(count: 1 << 20, offset: 4 << 20)
        try b.flush()
        #expect(try a.pread(count: 1 << 20, offset: 2 << 20) == ImageFile.constant(0, count: 1 << 20))
        #expect(try a.pread(count: 1 << 20, offset: 4 << 20) == ImageFile.constant(0, count: 1 << 20))
    }

    @Test("four connections write disjoint ranges concurrently; a fifth reads them all")
    func concurrentConnections() throws {
        let fixture = try ServerFixture()
        let chunk = 2 << 20
        let failures = Failures()
        DispatchQueue.concurrentPerform(iterations: 4) { index in
            do {
                let connection = try fixture.connect()
                for piece in 0..<8 {
                    let offset = index * chunk * 2 + piece * (chunk / 4)
                    try connection.pwrite(ImageFile.pattern(count: chunk / 4, offset: offset, seed: 11), offset: UInt64(offset))
                }
                try connection.flush()
                try connection.shutdown()
            } catch {
                failures.add("writer \(index): \(error)")
            }
        }
        #expect(failures.all.isEmpty, "\(failures.all)")
        let reader = try fixture.connect()
        for index in 0..<4 {
            let offset = index * chunk * 2
            #expect(try reader.pread(count: chunk * 2, offset: UInt64(offset))
                == ImageFile.pattern(count: chunk * 2, offset: offset, seed: 11))
        }
        #expect(try ImageFile.read(fixture.image) == ImageFile.pattern(count: ServerFixture.defaultSize, offset: 0, seed: 11))
    }
}
