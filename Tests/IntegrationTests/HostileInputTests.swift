import Foundation
import NBDClient
import Testing

/// Malformed or abandoned traffic costs only the offending connection: the server keeps
/// serving everyone else and does not balloon its memory.
@Suite("Hostile input", .serialized)
struct HostileInputTests {
    /// The server's resident memory in bytes, from /proc.
    static func residentBytes(_ server: TidemarkProcess) throws -> Int {
        let status = try String(contentsOfFile: "/proc/\(server.process.processIdentifier)/status", encoding: .utf8)
        guard let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") }),
              let kib = Int(line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first ?? "")
        else {
            throw HarnessError("no VmRSS in /proc status")
        }
        return kib * 1024
    }

    /// A fresh libnbd client still gets correct data.
    static func expectServing(_ fixture: ServerFixture, sourceLocation: SourceLocation = #_sourceLocation) {
        do {
            let connection = try fixture.connect()
            try connection.pwrite(ImageFile.constant(0x3C, count: 4096), offset: 1 << 20)
            #expect(try connection.pread(count: 4096, offset: 1 << 20) == ImageFile.constant(0x3C, count: 4096), sourceLocation: sourceLocation)
        } catch {
            Issue.record("server stopped serving: \(error)", sourceLocation: sourceLocation)
        }
        #expect(fixture.server.isRunning, sourceLocation: sourceLocation)
    }

    @Test("a request with a bad magic closes that connection only")
    func badRequestMagic() throws {
        let fixture = try ServerFixture()
        let bystander = try fixture.connect()
        let raw = try RawNBDSocket(unixSocket: fixture.directory.socketPath)
        try raw.handshake()
        try raw.go(export: "disk")
        try raw.send([0xDE, 0xAD, 0xBE, 0xEF] + [UInt8](repeating: 0, count: 24))
        #expect(raw.isClosedByPeer())
        #expect(try bystander.pread(count: 4096, offset: 0) == ImageFile.constant(0, count: 4096))
        Self.expectServing(fixture)
    }

    @Test("garbage instead of a handshake closes that connection only")
    func garbageHandshake() throws {
        let fixture = try ServerFixture()
        let raw = try RawNBDSocket(unixSocket: fixture.directory.socketPath)
        _ = try raw.readGreeting()
        try raw.send(RawNBDSocket.be(UInt32(3)) + Array("GET / HTTP/1.1\r\nHost: x\r\n\r\n".utf8))
        #expect(raw.isClosedByPeer())
        Self.expectServing(fixture)
    }

    @Test("a 1 GiB WRITE header is refused without buffering a gigabyte")
    func hugeWrite() throws {
        let fixture = try ServerFixture()
        let raw = try RawNBDSocket(unixSocket: fixture.directory.socketPath)
        try raw.handshake()
        try raw.go(export: "disk")
        try raw.sendRequest(type: 1, cookie: 1, offset: 0, length: 1 << 30)
        // Some payload follows, then the client gives up.
        try? raw.send(ImageFile.constant(0xAA, count: 1 << 20))
        usleep(200_000)
        #expect(try Self.residentBytes(fixture.server) < 512 << 20)
        Self.expectServing(fixture)
        #expect(try ImageFile.read(fixture.image, offset: 0, count: 4096) == ImageFile.constant(0, count: 4096))
    }

    @Test("an option claiming 4 GiB of data neither blocks other clients nor is buffered")
    func hugeOption() throws {
        let fixture = try ServerFixture()
        let raw = try RawNBDSocket(unixSocket: fixture.directory.socketPath)
        try raw.handshake()
        try raw.send(RawNBDSocket.be(RawNBDSocket.optionMagic) + RawNBDSocket.be(UInt32(0x42)) + RawNBDSocket.be(UInt32.max))
        try? raw.send(ImageFile.constant(0x55, count: 1 << 20))
        usleep(200_000)
        #expect(try Self.residentBytes(fixture.server) < 512 << 20)
        Self.expectServing(fixture)
    }

    @Test("a client that vanishes halfway through a WRITE payload does not disturb the rest")
    func vanishingWriter() throws {
        let fixture = try ServerFixture(filled: true)
        do {
            let raw = try RawNBDSocket(unixSocket: fixture.directory.socketPath)
            try raw.handshake()
            try raw.go(export: "disk")
            try raw.sendRequest(type: 1, cookie: 1, offset: 0, length: 1 << 20, payload: ImageFile.constant(0xAA, count: 300_000))
        }  // closed here
        usleep(100_000)
        Self.expectServing(fixture)
        // A write the server never fully received must not be applied.
        let connection = try fixture.connect()
        #expect(try connection.pread(count: 1 << 20, offset: 0) == ImageFile.pattern(count: 1 << 20, offset: 0))
    }

    @Test("a hundred connections opened and dropped at every stage")
    func connectionChurn() throws {
        let fixture = try ServerFixture()
        for index in 0..<100 {
            let raw = try RawNBDSocket(unixSocket: fixture.directory.socketPath)
            switch index % 4 {
            case 0: break
            case 1: _ = try raw.readGreeting()
            case 2: try raw.handshake()
            default:
                try raw.handshake()
                try raw.go(export: "disk")
                try raw.sendRequest(type: 0, cookie: 1, offset: 0, length: 1 << 20)
            }
        }
        Self.expectServing(fixture)
    }
}
