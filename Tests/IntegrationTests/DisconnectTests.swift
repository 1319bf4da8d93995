import Foundation
import NBDClient
import Testing

/// The end of a connection the client asks for: every request it sent before
/// `NBD_CMD_DISC`, or before it shut its sending side, is answered in full before the
/// server closes (the spec: "the server MUST handle all outstanding requests"). libnbd
/// sends NBD_CMD_DISC and then shuts its side at once (after a TLS close_notify under TLS),
/// and goes on reading replies; until the server allowed half-closure and waited for its
/// replies to be on the socket, the close dropped them: 57 of 64 pipelined reads failed
/// over TLS, a half-close cut the replies short in plaintext, and (in a release build)
/// the last of 300 unread 1 MiB replies before NBD_CMD_DISC was cut short.
@Suite("Disconnect: every reply before the close", .serialized)
struct DisconnectTests {
    static let mebibyte = 1 << 20
    static let imageMiB = 64

    /// A server on a filled image and a raw client in transmission with it.
    static func connectedClient() throws -> (ServerFixture, RawNBDSocket) {
        let fixture = try ServerFixture(size: imageMiB * mebibyte, filled: true)
        let socketPath = try #require(fixture.server.socketPath)
        let client = try RawNBDSocket(unixSocket: socketPath, timeout: 20)
        try client.handshake()
        try client.go(export: "disk")
        return (fixture, client)
    }

    /// `count` 1 MiB READs, cookie i reading MiB i of the image (modulo its size).
    static func readRequests(count: Int) -> [UInt8] {
        (0..<count).flatMap { index in
            RawNBDSocket.request(
                type: 0, cookie: UInt64(index), offset: UInt64(index % imageMiB * mebibyte), length: UInt32(mebibyte))
        }
    }

    /// Reads `count` simple 1 MiB READ replies and checks each one's data against the
    /// image pattern; returns the cookies seen.
    static func readReplies(_ client: RawNBDSocket, count: Int) throws -> Set<UInt64> {
        var cookies = Set<UInt64>()
        for _ in 0..<count {
            let reply = try client.readSimpleReply()
            #expect(reply.error == 0, "READ failed")
            let cookie = reply.cookie
            let data = try client.receive(mebibyte)
            let offset = Int(cookie) % imageMiB * mebibyte
            if data != ImageFile.pattern(count: mebibyte, offset: offset) {
                Issue.record("reply \(cookie) carries wrong data")
            }
            cookies.insert(cookie)
        }
        return cookies
    }

    /// 300 pipelined 1 MiB READs, then NBD_CMD_DISC; the client reads nothing for a
    /// second, so many replies are still queued in the server when it reads the DISC.
    @Test("300 pipelined 1 MiB READs left unread, then NBD_CMD_DISC: every reply arrives whole, then EOF")
    func pipelinedThenDisconnect() throws {
        let (fixture, client) = try Self.connectedClient()
        let count = 300
        let requests = Self.readRequests(count: count) + RawNBDSocket.request(type: 2, cookie: UInt64(count))
        // The server answers while this is sent: send from another thread, as its replies
        // fill the socket before all requests are out.
        let sent = Thread.detachedResult { try client.send(requests) }
        Thread.sleep(forTimeInterval: 1)
        let cookies = try Self.readReplies(client, count: count)
        _ = try sent.wait(timeout: 20)
        #expect(cookies == Set((0..<count).map(UInt64.init)), "replies lost")
        #expect(client.isClosedByPeer(), "the server did not close after NBD_CMD_DISC")
        #expect(fixture.server.isRunning)
    }

    @Test("a half-close after pipelined READs that were sent whole: every reply, then EOF")
    func halfCloseAfterRequests() throws {
        let (fixture, client) = try Self.connectedClient()
        // 48 requests fit in the socket at once (28 bytes each): all are sent before the
        // shutdown, and most replies are still to come when the server sees EOF.
        let count = 48
        try client.send(Self.readRequests(count: count))
        try client.shutdownWrites()
        Thread.sleep(forTimeInterval: 0.5)
        let cookies = try Self.readReplies(client, count: count)
        #expect(cookies == Set((0..<count).map(UInt64.init)), "replies lost")
        #expect(client.isClosedByPeer(), "the server did not close after the client's half-close")
        #expect(fixture.server.isRunning)
    }

    @Test("libnbd: 64 pipelined 1 MiB reads, then nbd_aio_disconnect at once: all succeed, in plaintext and over TLS")
    func libnbdDisconnect() throws {
        let directory = try TestDirectory()
        let files = try TLSFiles(in: directory)
        let image = directory.file("disk.img")
        try ImageFile.createFilled(image, size: Self.imageMiB * Self.mebibyte, seed: 5)
        let script = RepositoryPaths.file("Tests/Tools/pipelined_disconnect.py")
        var digests: [String] = []
        for tls in [false, true] {
            let server = try TidemarkProcess.serve(
                image: image, in: directory,
                extraArguments: tls ? ["--tls", "require", "--tls-certificates", files.certificates] : [])
            let uri = tls
                ? "nbds+unix:///disk?socket=\(directory.socketPath)" : "nbd+unix:///disk?socket=\(directory.socketPath)"
            let result = try ExternalTool.check(
                "/usr/bin/python3", [script, uri, "64"] + (tls ? [files.certificates] : []), timeout: 60)
            let report = try #require(
                try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any], "\(result)")
            #expect(report["ok"] as? Int == 64, "tls \(tls): \(result.stdout)")
            #expect(report["failed"] as? Int == 0, "tls \(tls): \(result.stdout)")
            #expect(report["closed"] as? Bool == true, "tls \(tls): \(result.stdout)")
            digests.append(report["sha256"] as? String ?? "")
            #expect(server.isRunning)
            try server.stop()
        }
        #expect(digests[0] == digests[1] && !digests[0].isEmpty, "TLS read other data than plaintext")
    }
}
