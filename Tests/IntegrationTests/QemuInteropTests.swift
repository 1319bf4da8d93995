import Foundation
import NBDClient
import Testing

/// The qemu 7.2 client (qemu-io, qemu-img) against the server, over Unix sockets and TCP.
@Suite("qemu-io and qemu-img", .serialized)
struct QemuInteropTests {
    /// Runs qemu-io with `commands` on `uri`; fails on a non-zero exit or a pattern mismatch.
    @discardableResult
    static func qemuIO(_ uri: String, _ commands: [String]) throws -> ToolResult {
        let result = try ExternalTool.run("qemu-io", ["-f", "raw"] + commands.flatMap { ["-c", $0] } + [uri], timeout: 120)
        if !result.succeeded || result.stdout.contains("verification failed") || result.stderr.contains("verification failed") {
            throw HarnessError("qemu-io failed:\n\(result)")
        }
        return result
    }

    @Test("qemu-io writes patterns, zeroes and discards; read -P checks them, and the file agrees")
    func qemuIOPatterns() throws {
        let fixture = try ServerFixture()
        try Self.qemuIO(fixture.uri, [
            "write -P 0xab 0 1M",
            "write -P 0xcd 1M 64k",
            "write -f -P 0xef 3M 4k",  // FUA
            "write -P 0x12 5M 1536",  // not a multiple of 4 KiB
            "aio_write -P 0x34 6M 256k",
            "aio_flush",
            "read -P 0xab 0 1M",
            "read -P 0xcd 1M 64k",
            "read -P 0xef 3M 4k",
            "read -P 0x12 5M 1536",
            "read -P 0x34 6M 256k",
            "read -P 0 2M 1M",
            "flush",
        ])
        let image = try ImageFile.read(fixture.image)
        #expect(Array(image[0..<(1 << 20)]) == ImageFile.constant(0xAB, count: 1 << 20))
        #expect(Array(image[(1 << 20)..<((1 << 20) + 65536)]) == ImageFile.constant(0xCD, count: 65536))
        #expect(Array(image[(3 << 20)..<((3 << 20) + 4096)]) == ImageFile.constant(0xEF, count: 4096))
        #expect(Array(image[(5 << 20)..<((5 << 20) + 1536)]) == ImageFile.constant(0x12, count: 1536))
        #expect(Array(image[(6 << 20)..<((6 << 20) + 262_144)]) == ImageFile.constant(0x34, count: 262_144))

        try Self.qemuIO(fixture.uri, [
            "write -z 0 64k",  // WRITE_ZEROES
            "write -z -u 64k 64k",  // WRITE_ZEROES that may unmap
            "discard 1M 64k",  // TRIM
            "read -P 0 0 128k",
            "read -P 0xab 128k 896k",
            "read -P 0 1M 64k",
        ])
        let after = try ImageFile.read(fixture.image, offset: 0, count: (1 << 20) + 65536)
        #expect(Array(after[0..<131_072]) == ImageFile.constant(0, count: 131_072))
        #expect(Array(after[131_072..<(1 << 20)]) == ImageFile.constant(0xAB, count: (1 << 20) - 131_072))
        #expect(Array(after[(1 << 20)...]) == ImageFile.constant(0, count: 65536))
    }

    @Test("qemu-io sees what libnbd wrote, and the reverse")
    func crossClient() throws {
        let fixture = try ServerFixture()
        let connection = try fixture.connect()
        try connection.pwrite(ImageFile.constant(0x5C, count: 65536), offset: 4 << 20)
        try connection.flush()
        try Self.qemuIO(fixture.uri, ["read -P 0x5c 4M 64k", "write -P 0x6d 8M 32k"])
        #expect(try connection.pread(count: 32768, offset: 8 << 20) == ImageFile.constant(0x6D, count: 32768))
    }

    @Test("qemu-img info reports the virtual size")
    func info() throws {
        let fixture = try ServerFixture(size: 24 << 20)
        let result = try ExternalTool.check("qemu-img", ["info", "--output=json", fixture.uri])
        let json = try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any]
        #expect(json?["virtual-size"] as? Int == 24 << 20, "\(result.stdout)")
    }

    @Test("qemu-img convert from the export to a file, then qemu-img compare")
    func convertFromExport() throws {
        let fixture = try ServerFixture(filled: true)
        let connection = try fixture.connect()
        try connection.trim(count: 2 << 20, offset: 4 << 20)
        try connection.flush()
        let copy = fixture.directory.file("copy.raw")
        try ExternalTool.check("qemu-img", ["convert", "-f", "raw", "-O", "raw", fixture.uri, copy])
        #expect(try ImageFile.read(copy) == ImageFile.read(fixture.image))
        try ExternalTool.check("qemu-img", ["compare", "-f", "raw", "-F", "raw", fixture.uri, copy])
        // The copy is sparse where the export reported a hole.
        #expect(try ImageFile.allocatedBytes(copy) <= ServerFixture.defaultSize - (2 << 20) + 65536)
    }

    @Test("qemu-img convert from a file into the export (-n), then compare")
    func convertIntoExport() throws {
        let fixture = try ServerFixture(filled: true)
        let source = fixture.directory.file("source.raw")
        var bytes = ImageFile.pattern(count: ServerFixture.defaultSize, offset: 0, seed: 40)
        bytes.replaceSubrange((2 << 20)..<(6 << 20), with: ImageFile.constant(0, count: 4 << 20))
        try ImageFile.write(source, bytes: bytes)
        try ExternalTool.check("qemu-img", ["convert", "-n", "-f", "raw", "-O", "raw", source, fixture.uri])
        try ExternalTool.check("qemu-img", ["compare", "-f", "raw", "-F", "raw", source, fixture.uri])
        #expect(try ImageFile.read(fixture.image) == bytes)
    }

    @Test("qemu-img map matches the allocation")
    func map() throws {
        let fixture = try ServerFixture()
        let connection = try fixture.connect()
        try connection.pwrite(ImageFile.constant(1, count: 1 << 20), offset: 3 << 20)
        try connection.flush()
        let result = try ExternalTool.check("qemu-img", ["map", "--output=json", "-f", "raw", fixture.uri])
        let entries = try #require(try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [[String: Any]])
        func entry(at offset: Int) -> [String: Any]? {
            entries.first { e in
                guard let start = e["start"] as? Int, let length = e["length"] as? Int else { return false }
                return start <= offset && offset < start + length
            }
        }
        #expect(entry(at: 3 << 20)?["data"] as? Bool == true, "\(result.stdout)")
        #expect(entry(at: (4 << 20) - 1)?["data"] as? Bool == true, "\(result.stdout)")
        #expect(entry(at: 0)?["data"] as? Bool == false, "\(result.stdout)")
        #expect(entry(at: 0)?["zero"] as? Bool == true, "\(result.stdout)")
        #expect(entry(at: 10 << 20)?["data"] as? Bool == false, "\(result.stdout)")
        #expect(entries.reduce(0) { $0 + ($1["length"] as? Int ?? 0) } == ServerFixture.defaultSize)
    }

    @Test("over TCP: qemu-img convert and compare via nbd://127.0.0.1:PORT/NAME, qemu-io and nbdinfo too")
    func tcp() throws {
        let directory = try TestDirectory()
        let image = directory.file("tcp.raw")
        try ImageFile.createFilled(image, size: 8 << 20, seed: 9)
        let (server, port) = try TidemarkProcess.serveTCP(image: image, name: "tcpdisk", in: directory)
        let uri = "nbd://127.0.0.1:\(port)/tcpdisk"
        #expect(server.listeners.contains(uri), "listeners: \(server.listeners)")

        let copy = directory.file("copy.raw")
        try ExternalTool.check("qemu-img", ["convert", "-f", "raw", "-O", "raw", uri, copy])
        try ExternalTool.check("qemu-img", ["compare", "-f", "raw", "-F", "raw", uri, copy])
        #expect(try ImageFile.read(copy) == ImageFile.read(image))

        try Self.qemuIO(uri, ["write -P 0x99 1M 64k", "read -P 0x99 1M 64k"])
        #expect(try ImageFile.read(image, offset: 1 << 20, count: 65536) == ImageFile.constant(0x99, count: 65536))
        #expect(try ExternalTool.check("nbdinfo", ["--size", uri]).stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "8388608")

        let connection = try NBDConnection()
        try connection.connect(uri: uri)
        #expect(try connection.pread(count: 65536, offset: 1 << 20) == ImageFile.constant(0x99, count: 65536))
        try connection.shutdown()
        #expect(try server.stop() == .success)
    }
}
