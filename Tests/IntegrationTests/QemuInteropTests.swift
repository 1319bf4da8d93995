import Foundation
import NBDClient
import Testing

/// The qemu 7.2 client (qemu-io, qemu-img) against the server beside libnbd, and over TCP.
/// qemu-io patterns, `qemu-img info`, `map`, `convert` and `compare` run for qemu 7.2 and
/// qemu 10 in `QemuMatrixTests`.
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

    @Test("qemu-io sees what libnbd wrote, and the reverse")
    func crossClient() throws {
        let fixture = try ServerFixture()
        let connection = try fixture.connect()
        try connection.pwrite(ImageFile.constant(0x5C, count: 65536), offset: 4 << 20)
        try connection.flush()
        try Self.qemuIO(fixture.uri, ["read -P 0x5c 4M 64k", "write -P 0x6d 8M 32k"])
        #expect(try connection.pread(count: 32768, offset: 8 << 20) == ImageFile.constant(0x6D, count: 32768))
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
