import Foundation
import NBDClient
import Testing

/// `nbdcopy` (libnbd 1.14): whole-image copies in both directions, with several
/// connections (it uses multi-conn when advertised) and block status for sparseness.
@Suite("nbdcopy", .serialized)
struct NbdcopyTests {
    static let size = 32 << 20

    /// A mixed image: patterned data with a few holes and zero runs.
    @discardableResult
    static func mixedImage(_ path: String, seed: UInt8) throws -> [UInt8] {
        var bytes = ImageFile.pattern(count: size, offset: 0, seed: seed)
        bytes.replaceSubrange((4 << 20)..<(8 << 20), with: ImageFile.constant(0, count: 4 << 20))
        bytes.replaceSubrange((20 << 20)..<((20 << 20) + 65536), with: ImageFile.constant(0, count: 65536))
        try ImageFile.write(path, bytes: bytes)
        return bytes
    }


    @Test("export → file: the copy has the export's bytes")
    func exportToFile() throws {
        let fixture = try ServerFixture(size: Self.size)
        // Give the export data, a trimmed hole and an untouched hole.
        let connection = try fixture.connect()
        let source = fixture.directory.file("seed.raw")
        let bytes = try Self.mixedImage(source, seed: 21)
        for offset in stride(from: 0, to: Self.size, by: 4 << 20) where !(4 << 20..<8 << 20).contains(offset) {
            try connection.pwrite(Array(bytes[offset..<(offset + (4 << 20))]), offset: UInt64(offset))
        }
        try connection.flush()
        let copy = fixture.directory.file("copy.raw")
        try ExternalTool.check("nbdcopy", ["--flush", fixture.uri, copy], timeout: 120)
        #expect(try ImageFile.size(copy) == Self.size)
        #expect(try ImageFile.sha256(copy) == ImageFile.sha256(source))
    }

    @Test("file → export with 4 connections: the image file ends up identical")
    func fileToExport() throws {
        let fixture = try ServerFixture(size: Self.size, filled: true)
        let source = fixture.directory.file("source.raw")
        try Self.mixedImage(source, seed: 22)
        try ExternalTool.check("nbdcopy", ["--connections=4", "--flush", source, fixture.uri], timeout: 120)
        #expect(try ImageFile.sha256(fixture.image) == ImageFile.sha256(source))
        // And back again through the server.
        let back = fixture.directory.file("back.raw")
        try ExternalTool.check("nbdcopy", [fixture.uri, back], timeout: 120)
        #expect(try ImageFile.sha256(back) == ImageFile.sha256(source))
    }

    @Test("export → export on one server, then compared with nbdcopy's own reader")
    func exportToExport() throws {
        let directory = try TestDirectory()
        let a = directory.file("a.raw")
        let b = directory.file("b.raw")
        try Self.mixedImage(a, seed: 23)
        try ImageFile.createFilled(b, size: Self.size, seed: 99)
        let server = try TidemarkProcess(
            arguments: ["serve", "--export", "a=\(a):ro", "--export", "b=\(b)", "--unix", directory.socketPath],
            directory: directory)
        try ExternalTool.check("nbdcopy", ["--flush", try server.unixURI(export: "a"), try server.unixURI(export: "b")], timeout: 120)
        #expect(try ImageFile.sha256(b) == ImageFile.sha256(a))
        // Holes in the source became zeroes (or holes) in the destination.
        let connection = try server.connect(export: "b")
        #expect(try connection.pread(count: 4 << 20, offset: 4 << 20) == ImageFile.constant(0, count: 4 << 20))
    }

    @Test("nbdcopy to null: reads the whole export using block status")
    func toNull() throws {
        let fixture = try ServerFixture(size: Self.size)
        let connection = try fixture.connect()
        try connection.pwrite(ImageFile.constant(1, count: 1 << 20), offset: 1 << 20)
        try connection.flush()
        try ExternalTool.check("nbdcopy", [fixture.uri, "null:"], timeout: 120)
    }
}
