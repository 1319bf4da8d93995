import Foundation
import NBDClient
import QMPWire
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// NBD extended headers against the real server: a 6 TiB image driven by qemu 10 with
/// single requests past 4 GiB, the views and checkpoint flow with a qemu 10 client, and
/// hostile extended requests from a raw client, each answered as the spec says while the
/// server goes on serving.
@Suite("Extended headers: qemu 10 and hostile input", .serialized)
struct ExtendedHeadersInteropTests {
    static let gib: UInt64 = 1 << 30
    static let qemu10 = QemuRelease.qemu10

    /// A server with `--metrics` on a free port (retried when the port was taken meanwhile).
    static func serveWithMetrics(size: Int, extraArguments: [String]) throws -> (fixture: ServerFixture, port: Int) {
        var lastError: (any Error)?
        for _ in 0..<5 {
            let port = try HTTPProbe.freePort()
            do {
                let fixture = try ServerFixture(
                    size: size, extraArguments: ["--metrics", "127.0.0.1:\(port)", "--log-level", "debug"] + extraArguments)
                try MetricsTests.waitForEndpoint(port: port, server: fixture.server)
                return (fixture, port)
            } catch {
                lastError = error
            }
        }
        throw HarnessError("could not start a metrics endpoint: \(lastError.map { "\($0)" } ?? "")")
    }

    static func requests(_ samples: [String: Double], _ command: String) -> Double {
        samples[#"tidemark_requests_total{export="disk",command="\#(command)",result="ok"}"#] ?? 0
    }

    static func bytes(_ samples: [String: Double], _ command: String) -> Double {
        samples[#"tidemark_request_bytes_total{export="disk",command="\#(command)"}"#] ?? 0
    }

    // MARK: - 6 TiB

    @Test("6 TiB sparse image: qemu 10 zeroes 5 GiB in one request, a raw client trims 5 GiB in one, dirty granules past 4 GiB, whole-disk map in a few requests")
    func sixTebibytes() throws {
        let size = 6 * (1 << 40)
        let (fixture, port) = try Self.serveWithMetrics(size: size, extraArguments: ["--bitmap", "b0"])
        let gib = Self.gib
        try Self.qemu10.qemuIO(fixture.uri, [
            "write -P 0xaa 5G 64k",
            // One WRITE_ZEROES of 5 GiB that may punch (-u); qemu-io takes more than 2 GiB
            // only with -n (no slow fallback: FAST_ZERO, which punching is).
            "write -z -u -n 8G 5G",
            "write -P 0xbb 6000G 4k",
            "read -P 0xaa 5G 64k",
            "read -P 0 8G 64k",
            "read -P 0xbb 6000G 4k",
        ])
        // One TRIM of 5 GiB from 16 GiB, in a 64-bit length no compact header can carry.
        let raw = try RawNBDSocket(unixSocket: fixture.directory.socketPath, timeout: 60)
        try raw.negotiateExtended()
        try raw.sendExtendedRequest(type: 4, cookie: 0x7157, offset: 16 * gib, length: 5 * gib)
        let trim = try raw.readExtendedReply()
        #expect(trim.count == 1 && trim.first?.type == 0 && trim.first?.error == 0, "TRIM reply \(trim)")
        #expect(trim.first?.cookie == 0x7157 && trim.first?.offset == 16 * gib)
        try raw.sendExtendedRequest(type: 2, cookie: 0)

        let after = try MetricsTests.scrape(port: port) { Self.requests($0, "trim") == 1 }
        #expect(Self.requests(after, "write_zeroes") == 1, "one WRITE_ZEROES request")
        #expect(Self.bytes(after, "write_zeroes") == Double(5 * gib))
        #expect(Self.requests(after, "trim") == 1, "one TRIM request")
        #expect(Self.bytes(after, "trim") == Double(5 * gib))

        // The dirty granules, through libnbd 1.14 (compact headers, 4 GiB per request).
        let dirty: [(UInt64, UInt64)] = [(5 * gib, 65536), (8 * gib, 5 * gib), (16 * gib, 5 * gib), (6000 * gib, 65536)]
        let expected = BitmapMaps.bitmapMap(dirty: dirty, size: UInt64(size))
        #expect(try BitmapMaps.nbdinfoMap(uri: fixture.uri, context: BitmapMaps.context("b0")).extents == expected)

        // The same through qemu 10's x-dirty-bitmap over the whole disk: with extended
        // headers each BLOCK_STATUS may cover the rest of the disk, so a handful do.
        let before = Self.requests(try MetricsTests.scrape(port: port), "block_status")
        guard let socket = fixture.server.socketPath else { throw HarnessError("no Unix listener") }
        let map = try Self.qemu10.check("qemu-img", [
            "map", "--output=json", "--image-opts",
            "driver=nbd,server.type=unix,server.path=\(socket),export=disk,x-dirty-bitmap=qemu:dirty-bitmap:b0",
        ])
        let extents = try QemuMatrixTests.mapEntries(map.stdout).map { BitmapExtent($0.start, $0.length, $0.data ? 0 : 1) }
        #expect(BitmapMaps.merged(extents) == expected, "\(map.stdout)")
        let used = Self.requests(try MetricsTests.scrape(port: port), "block_status") - before
        #expect(used > 0 && used <= 16, "qemu 10 sent \(used) BLOCK_STATUS requests for 6 TiB")

        // Zeroes and trims punched holes: the 6 TiB image holds only the two writes.
        #expect(try ImageFile.allocatedBytes(fixture.image) < 16 << 20)
        QemuMatrixClient(release: .qemu10, serverArguments: [], extendedHeaders: true).expectFraming(fixture.server)
    }

    // MARK: - Views and checkpoints

    @Test("views and checkpoints with a qemu 10 client: writes, checkpoint view, convert, compare, maps of the increment")
    func viewsAndCheckpoints() throws {
        let fixture = try ControlFixture(size: 16 << 20, extraArguments: ["--log-level", "debug"])
        let client = try fixture.qmp()
        try client.run("block-dirty-bitmap-add", ["node": "disk", "name": "b0", "persistent": true])
        let uri = try fixture.uri()
        try Self.qemu10.qemuIO(uri, ["write -P 0x11 0 4M", "write -P 0x22 8M 1M"])
        let instant = try ImageFile.read(fixture.image)

        let created = try Views.create(client)
        #expect(created.view == "disk@c1" && created.changes == "disk@c1.changes")
        // Writes after the checkpoint, over data, into a hole, zeroes and a discard.
        try Self.qemu10.qemuIO(uri, [
            "write -P 0x33 64k 128k", "write -P 0x44 12M 1M", "write -z 2M 64k", "discard 8M 1M", "flush",
        ])

        // The view reads as the instant, for qemu 10's convert and compare.
        let viewURI = try fixture.uri(export: created.view)
        let copy = fixture.directory.file("view-copy.raw")
        try Self.qemu10.check("qemu-img", ["convert", "-f", "raw", "-O", "raw", viewURI, copy])
        #expect(try ImageFile.read(copy) == instant, "the view must read as the image did at the checkpoint")
        try Self.qemu10.check("qemu-img", ["compare", "-f", "raw", "-F", "raw", viewURI, copy])
        try Self.qemu10.qemuIO(viewURI, ["read -P 0x11 0 4M", "read -P 0x22 8M 1M", "read -P 0 12M 1M"], readOnly: true)

        // The view carries the increment c1; qemu 10 maps it through x-dirty-bitmap.
        guard let socket = fixture.server.socketPath else { throw HarnessError("no Unix listener") }
        let increment = try Self.qemu10.check("qemu-img", [
            "map", "--output=json", "--image-opts",
            "driver=nbd,server.type=unix,server.path=\(socket),export=\(created.view),x-dirty-bitmap=qemu:dirty-bitmap:c1",
        ])
        let dirty = try QemuMatrixTests.mapEntries(increment.stdout).map { BitmapExtent($0.start, $0.length, $0.data ? 0 : 1) }
        #expect(BitmapMaps.merged(dirty) == BitmapMaps.bitmapMap(dirty: [(0, 4 << 20), (8 << 20, 1 << 20)], size: fixture.size))
        // The .changes view reports the increment as allocation (base:allocation).
        let changes = try Self.qemu10.check("qemu-img", ["map", "--output=json", "-f", "raw", try fixture.uri(export: created.changes)])
        let data = try QemuMatrixTests.mapEntries(changes.stdout).filter(\.data).map { BitmapExtent($0.start, $0.length, 0) }
        #expect(BitmapMaps.merged(data) == [BitmapExtent(0, 4 << 20, 0), BitmapExtent(8 << 20, 1 << 20, 0)], "\(changes.stdout)")
        // b0 records the writes after the checkpoint.
        #expect(try fixture.bitmapMap("b0") == BitmapMaps.bitmapMap(
            dirty: [(64 << 10, 128 << 10), (2 << 20, 64 << 10), (8 << 20, 1 << 20), (12 << 20, 1 << 20)], size: fixture.size))

        try client.run("checkpoint-complete", ["node": "disk", "name": "c1"])
        let gone = try Self.qemu10.run("qemu-img", ["info", viewURI])
        #expect(!gone.succeeded, "the view is gone after checkpoint-complete")
        QemuMatrixClient(release: .qemu10, serverArguments: [], extendedHeaders: true).expectFraming(fixture.server)
    }

    // MARK: - Socket activation

    @Test("socket activation (systemd-socket-activate): qemu 10 writes and maps a bitmap with extended headers")
    func socketActivation() throws {
        let directory = try TestDirectory()
        let image = directory.file("disk.img")
        try ImageFile.createSparse(image, size: 16 << 20)
        let activator = try SpawnedProgram(
            try ExternalTool.locate("systemd-socket-activate"),
            ["-l", directory.socketPath, TidemarkProcess.binaryPath, "serve", image, "--bitmap", "b0", "--log-level", "debug"])
        let deadline = Date().addingTimeInterval(10)
        while !FileManager.default.fileExists(atPath: directory.socketPath) && Date() < deadline { usleep(10_000) }
        // The first connection starts the server on the inherited socket.
        let uri = "nbd+unix:///disk?socket=\(directory.socketPath)"
        try Self.qemu10.qemuIO(uri, ["write -P 0x5a 1M 64k", "write -z 4M 128k", "read -P 0x5a 1M 64k"])
        let map = try Self.qemu10.check("qemu-img", [
            "map", "--output=json", "--image-opts",
            "driver=nbd,server.type=unix,server.path=\(directory.socketPath),export=disk,x-dirty-bitmap=qemu:dirty-bitmap:b0",
        ])
        let extents = try QemuMatrixTests.mapEntries(map.stdout).map { BitmapExtent($0.start, $0.length, $0.data ? 0 : 1) }
        #expect(BitmapMaps.merged(extents) == BitmapMaps.bitmapMap(dirty: [(1 << 20, 64 << 10), (4 << 20, 128 << 10)], size: 16 << 20))
        kill(activator.pid, SIGTERM)
        let result = try activator.wait(timeout: 30)
        #expect(result.status == 0, "\(result)")
        let started = result.stderr.split(separator: "\n").filter { $0.contains("transmission started") }
        #expect(started.count == 2 && started.allSatisfy { $0.contains("framing=\"extended headers\"") }, "\(result.stderr)")
    }

    // MARK: - Hostile extended requests

    /// Sends a FLUSH and expects its NONE reply: the connection is still in sync.
    static func expectServing(_ raw: RawNBDSocket, cookie: UInt64, sourceLocation: SourceLocation = #_sourceLocation) throws {
        try raw.sendExtendedRequest(type: 3, cookie: cookie)
        let reply = try raw.readExtendedReply()
        #expect(reply.count == 1 && reply.first?.type == 0 && reply.first?.cookie == cookie, "FLUSH reply \(reply)", sourceLocation: sourceLocation)
    }

    /// Expects one final ERROR chunk with `error`, echoing `cookie` and `offset`.
    static func expectError(
        _ raw: RawNBDSocket, _ error: UInt32, cookie: UInt64, offset: UInt64, sourceLocation: SourceLocation = #_sourceLocation
    ) throws {
        let reply = try raw.readExtendedReply()
        #expect(reply.count == 1, "\(reply)", sourceLocation: sourceLocation)
        #expect(reply.first?.type == 0x8001 && reply.first?.error == error, "\(reply)", sourceLocation: sourceLocation)
        #expect(reply.first?.cookie == cookie && reply.first?.offset == offset, "\(reply)", sourceLocation: sourceLocation)
    }

    @Test("hostile extended requests: each gets the spec's answer and the connection (or, after a framing error, the server) goes on")
    func hostileInput() throws {
        let fixture = try ServerFixture(extraArguments: ["--bitmap", "b0"])
        let raw = try RawNBDSocket(unixSocket: fixture.directory.socketPath)
        try raw.negotiateExtended(contexts: ["base:allocation"])
        let einval: UInt32 = 22

        // A WRITE with PAYLOAD_LEN, and one without it (qemu 10's form): both write.
        try raw.sendExtendedRequest(
            type: 1, flags: RawNBDSocket.flagPayloadLength, cookie: 1, offset: 4096, length: 512,
            payload: [UInt8](repeating: 0x61, count: 512))
        #expect(try raw.readExtendedReply().first?.type == 0)
        try raw.sendExtendedRequest(type: 1, cookie: 2, offset: 8192, length: 512, payload: [UInt8](repeating: 0x62, count: 512))
        #expect(try raw.readExtendedReply().first?.type == 0)
        #expect(try ImageFile.read(fixture.image, offset: 4096, count: 512) == ImageFile.constant(0x61, count: 512))
        #expect(try ImageFile.read(fixture.image, offset: 8192, count: 512) == ImageFile.constant(0x62, count: 512))

        // A payload on a command that takes none (READ), and the BLOCK_STATUS payload form
        // (not offered): the payload is read and dropped, EINVAL, the stream stays in sync.
        try raw.sendExtendedRequest(type: 0, flags: RawNBDSocket.flagPayloadLength, cookie: 3, offset: 512, length: 4, payload: [1, 2, 3, 4])
        try Self.expectError(raw, einval, cookie: 3, offset: 512)
        try raw.sendExtendedRequest(
            type: 7, flags: RawNBDSocket.flagPayloadLength, cookie: 4, offset: 0, length: 12,
            payload: RawNBDSocket.be(UInt64(1 << 20)) + RawNBDSocket.be(UInt32(1)))
        try Self.expectError(raw, einval, cookie: 4, offset: 0)
        try Self.expectServing(raw, cookie: 5)

        // Effect lengths past 2^63 - 1: EINVAL, whatever the command.
        for (cookie, type) in [(UInt64(6), UInt16(4)), (7, 6), (8, 7)] {
            try raw.sendExtendedRequest(type: type, cookie: cookie, offset: 0, length: UInt64(Int64.max) + 1)
            try Self.expectError(raw, einval, cookie: cookie, offset: 0)
        }
        try raw.sendExtendedRequest(type: 6, cookie: 9, offset: 1 << 20, length: UInt64.max)
        try Self.expectError(raw, einval, cookie: 9, offset: 1 << 20)
        // A BLOCK_STATUS of the whole disk: one BLOCK_STATUS_EXT chunk.
        try raw.sendExtendedRequest(type: 7, cookie: 10, offset: 0, length: UInt64(ServerFixture.defaultSize))
        let status = try raw.readExtendedReply()
        #expect(status.count == 1 && status.first?.type == 6 && status.first?.error == 0, "\(status)")
        // A payload longer than the 32 MiB maximum but one the server can drain: EINVAL.
        try raw.sendExtendedRequest(
            type: 1, flags: RawNBDSocket.flagPayloadLength, cookie: 11, offset: 0, length: 33 << 20,
            payload: [UInt8](repeating: 0x63, count: 33 << 20))
        try Self.expectError(raw, einval, cookie: 11, offset: 0)
        try Self.expectServing(raw, cookie: 12)
        #expect(try ImageFile.read(fixture.image, offset: 0, count: 512) == ImageFile.constant(0, count: 512))

        // A payload length the server will not drain (2^40): a hard disconnect.
        try raw.sendExtendedRequest(type: 1, flags: RawNBDSocket.flagPayloadLength, cookie: 13, length: 1 << 40)
        #expect(raw.isClosedByPeer(), "a 1 TiB payload must end the connection")

        // The compact magic on an extended connection: the stream is lost, a hard disconnect.
        let second = try RawNBDSocket(unixSocket: fixture.directory.socketPath)
        try second.negotiateExtended()
        try second.sendExtendedRequest(type: 3, cookie: 14, magic: RawNBDSocket.requestMagic)
        #expect(second.isClosedByPeer(), "a compact request on an extended connection must end it")

        // The server keeps serving: a fresh extended connection and qemu 10 both work.
        let third = try RawNBDSocket(unixSocket: fixture.directory.socketPath)
        try third.negotiateExtended()
        try Self.expectServing(third, cookie: 15)
        try Self.qemu10.qemuIO(fixture.uri, ["read -P 0x61 4096 512", "read -P 0x62 8192 512"])
        #expect(fixture.server.isRunning)
    }

    @Test("negotiation: EXTENDED_HEADERS ACKed, STRUCTURED_REPLY then EXT_HEADER_REQD, a repeat INVALID; --no-extended-headers: UNSUP")
    func negotiation() throws {
        let fixture = try ServerFixture()
        let raw = try RawNBDSocket(unixSocket: fixture.directory.socketPath)
        try raw.handshake()
        try raw.sendOption(RawNBDSocket.optionExtendedHeaders)
        #expect(try raw.readOptionReply().type == RawNBDSocket.Reply.ack.rawValue)
        try raw.sendOption(.structuredReply)
        #expect(try raw.readOptionReply().type == 0x8000_000A)
        try raw.sendOption(RawNBDSocket.optionExtendedHeaders)
        #expect(try raw.readOptionReply().type == RawNBDSocket.Reply.errInvalid.rawValue)
        try raw.go(export: "disk")
        try Self.expectServing(raw, cookie: 1)

        // EXPORT_NAME after extended headers is forbidden: the server hangs up.
        let exportName = try RawNBDSocket(unixSocket: fixture.directory.socketPath)
        try exportName.handshake()
        try exportName.sendOption(RawNBDSocket.optionExtendedHeaders)
        #expect(try exportName.readOptionReply().type == RawNBDSocket.Reply.ack.rawValue)
        try exportName.sendOption(.exportName, data: Array("disk".utf8))
        #expect(exportName.isClosedByPeer())

        let refusing = try ServerFixture(extraArguments: ["--no-extended-headers"])
        let old = try RawNBDSocket(unixSocket: refusing.directory.socketPath)
        try old.handshake()
        try old.sendOption(RawNBDSocket.optionExtendedHeaders)
        #expect(try old.readOptionReply().type == RawNBDSocket.Reply.errUnsup.rawValue)
        try old.sendOption(.structuredReply)
        #expect(try old.readOptionReply().type == RawNBDSocket.Reply.ack.rawValue)
        try old.go(export: "disk")
        try old.sendRequest(type: 3, cookie: 2)
        #expect(try old.readReply().error == 0)
    }
}
