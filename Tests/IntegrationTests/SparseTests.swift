import Foundation
import NBDClient
import Testing

/// Sparseness: TRIM and WRITE_ZEROES (without NO_HOLE) punch holes in the image file, and
/// `base:allocation` reports what SEEK_DATA/SEEK_HOLE see.
@Suite("Sparse images", .serialized)
struct SparseTests {
    static let mib = 1 << 20
    static let slack = 64 * 1024

    /// The base:allocation flags of every run overlapping `[offset, offset + length)`.
    static func flags(in map: [(offset: UInt64, length: UInt64, flags: UInt32)], offset: Int, length: Int) -> Set<UInt32> {
        Set(map.filter { $0.offset < UInt64(offset + length) && $0.offset + $0.length > UInt64(offset) }.map(\.flags))
    }

    @Test("a fresh sparse image is one hole|zero extent and allocates nothing")
    func freshSparse() throws {
        let fixture = try ServerFixture()
        let connection = try fixture.connect()
        let map = try allocationMap(connection, length: UInt64(ServerFixture.defaultSize))
        #expect(Self.flags(in: map, offset: 0, length: ServerFixture.defaultSize) == [NBDAllocationFlags([.hole, .zero]).rawValue])
        #expect(try ImageFile.allocatedBytes(fixture.image) == 0)
    }

    @Test("a write allocates exactly its blocks and shows up as data")
    func writeAllocates() throws {
        let fixture = try ServerFixture()
        let connection = try fixture.connect()
        try connection.pwrite(ImageFile.constant(0x10, count: 65536), offset: UInt64(5 * Self.mib))
        try connection.flush()
        let allocated = try ImageFile.allocatedBytes(fixture.image)
        #expect(allocated >= 65536 && allocated <= 65536 + Self.slack)
        let map = try allocationMap(connection, length: UInt64(ServerFixture.defaultSize))
        #expect(Self.flags(in: map, offset: 5 * Self.mib, length: 65536) == [0])
        #expect(Self.flags(in: map, offset: 0, length: 5 * Self.mib) == [NBDAllocationFlags([.hole, .zero]).rawValue])
        #expect(Self.flags(in: map, offset: 5 * Self.mib + 65536, length: Self.mib) == [NBDAllocationFlags([.hole, .zero]).rawValue])
        // Data extents start and end on 512-byte boundaries.
        #expect(map.allSatisfy { $0.offset % 512 == 0 && $0.length % 512 == 0 })
    }

    @Test("TRIM punches a hole: fewer blocks in the file, hole|zero in base:allocation, zeroes on read")
    func trimPunchesHole() throws {
        let fixture = try ServerFixture(filled: true)
        let connection = try fixture.connect()
        let before = try ImageFile.allocatedBytes(fixture.image)
        try connection.trim(count: UInt64(4 * Self.mib), offset: UInt64(4 * Self.mib))
        try connection.flush()
        let after = try ImageFile.allocatedBytes(fixture.image)
        #expect(after <= before - 4 * Self.mib + Self.slack, "allocated \(before) → \(after)")
        let map = try allocationMap(connection, length: UInt64(ServerFixture.defaultSize))
        #expect(Self.flags(in: map, offset: 4 * Self.mib, length: 4 * Self.mib) == [NBDAllocationFlags([.hole, .zero]).rawValue])
        #expect(Self.flags(in: map, offset: 0, length: 4 * Self.mib) == [0])
        #expect(Self.flags(in: map, offset: 8 * Self.mib, length: 8 * Self.mib) == [0])
        #expect(try connection.pread(count: 4 * Self.mib, offset: UInt64(4 * Self.mib)) == ImageFile.constant(0, count: 4 * Self.mib))
        #expect(try ImageFile.read(fixture.image, offset: 4 * Self.mib, count: 4 * Self.mib) == ImageFile.constant(0, count: 4 * Self.mib))
    }

    @Test("WRITE_ZEROES without NO_HOLE punches a hole too")
    func zeroPunchesHole() throws {
        let fixture = try ServerFixture(filled: true)
        let connection = try fixture.connect()
        let before = try ImageFile.allocatedBytes(fixture.image)
        try connection.zero(count: UInt64(2 * Self.mib), offset: UInt64(10 * Self.mib))
        try connection.flush()
        let after = try ImageFile.allocatedBytes(fixture.image)
        #expect(after <= before - 2 * Self.mib + Self.slack, "allocated \(before) → \(after)")
        let map = try allocationMap(connection, length: UInt64(ServerFixture.defaultSize))
        #expect(Self.flags(in: map, offset: 10 * Self.mib, length: 2 * Self.mib) == [NBDAllocationFlags([.hole, .zero]).rawValue])
        #expect(try ImageFile.read(fixture.image, offset: 10 * Self.mib, count: 2 * Self.mib) == ImageFile.constant(0, count: 2 * Self.mib))
    }

    @Test("WRITE_ZEROES with NO_HOLE keeps the blocks allocated and reads back zeroes")
    func zeroNoHoleKeepsAllocation() throws {
        let fixture = try ServerFixture(filled: true)
        let connection = try fixture.connect()
        let before = try ImageFile.allocatedBytes(fixture.image)
        try connection.zero(count: UInt64(2 * Self.mib), offset: UInt64(6 * Self.mib), flags: [.noHole])
        try connection.flush()
        let after = try ImageFile.allocatedBytes(fixture.image)
        #expect(after >= before - Self.slack, "allocated \(before) → \(after)")
        #expect(try connection.pread(count: 2 * Self.mib, offset: UInt64(6 * Self.mib)) == ImageFile.constant(0, count: 2 * Self.mib))
        #expect(try ImageFile.read(fixture.image, offset: 6 * Self.mib, count: 2 * Self.mib) == ImageFile.constant(0, count: 2 * Self.mib))
        // Whatever the map says, it must not claim a hole that is not zero.
        let map = try allocationMap(connection, length: UInt64(ServerFixture.defaultSize))
        for run in map where NBDAllocationFlags(rawValue: run.flags).contains(.zero) {
            let sample = try connection.pread(count: 4096, offset: run.offset)
            #expect(sample == ImageFile.constant(0, count: 4096), "extent at \(run.offset) claims ZERO")
        }
    }

    @Test("a TRIM that is not 4 KiB aligned leaves the data around it intact")
    func partialBlockTrim() throws {
        let fixture = try ServerFixture(filled: true)
        let connection = try fixture.connect()
        let offset = Self.mib + 512
        let length = 8192 + 1024
        try connection.trim(count: UInt64(length), offset: UInt64(offset))
        try connection.flush()
        #expect(try connection.pread(count: 512, offset: UInt64(offset - 512)) == ImageFile.pattern(count: 512, offset: offset - 512))
        #expect(try connection.pread(count: 4096, offset: UInt64(offset + length)) == ImageFile.pattern(count: 4096, offset: offset + length))
        #expect(try ImageFile.read(fixture.image, offset: offset + length, count: 4096) == ImageFile.pattern(count: 4096, offset: offset + length))
    }

    @Test("a write into a hole re-allocates it")
    func writeAfterTrim() throws {
        let fixture = try ServerFixture(filled: true)
        let connection = try fixture.connect()
        try connection.trim(count: UInt64(Self.mib), offset: 0)
        try connection.pwrite(ImageFile.constant(0x66, count: 4096), offset: 8192)
        try connection.flush()
        let map = try allocationMap(connection, offset: 0, length: UInt64(Self.mib))
        #expect(Self.flags(in: map, offset: 8192, length: 4096) == [0])
        #expect(Self.flags(in: map, offset: 65536, length: 65536) == [NBDAllocationFlags([.hole, .zero]).rawValue])
        #expect(try connection.pread(count: 4096, offset: 8192) == ImageFile.constant(0x66, count: 4096))
    }
}
