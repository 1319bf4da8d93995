import Foundation
import Testing

/// The server under a descriptor limit: it raises its soft limit to the hard one, and
/// caps its connections to what fits, refusing the rest at once (never leaving a client
/// waiting in the backlog because `accept` ran out of descriptors).
@Suite("Descriptors: soft limit raised, connections capped to fit", .serialized)
struct DescriptorLimitTests {
    static let prlimit = "/usr/bin/prlimit"

    /// `tidemark serve` of a small image on a Unix socket, under `prlimit --nofile=LIMITS`;
    /// the directory goes with the server (it holds the image and the socket).
    static func serve(nofile limits: String) throws -> (TidemarkProcess, TestDirectory) {
        let directory = try TestDirectory()
        let image = directory.file("image.raw")
        try ImageFile.createSparse(image, size: 1 << 20)
        let server = try TidemarkProcess(
            arguments: ["serve", image, "--unix", directory.socketPath], directory: directory,
            launcher: [prlimit, "--nofile=\(limits)"])
        return (server, directory)
    }

    @Test("started with a soft limit below the hard one (prlimit --nofile=64:4096), the server raises it to 4096")
    func raisesSoftLimit() throws {
        let (server, directory) = try Self.serve(nofile: "64:4096")
        defer { withExtendedLifetime(directory) {} }
        let limits = try ProcessStatus.openFileLimits(of: server.process.processIdentifier)
        #expect(limits.soft == 4096 && limits.hard == 4096, "limits are \(limits)")
        // With 4096 descriptors the default cap of 1024 fits: no warning.
        #expect(!server.serverLog.contains("capping connections"), "\(server.serverLog)")
        try server.stop()
    }

    @Test("with a hard limit of 64 the cap is lowered; the client over it is closed at once and logged; a freed slot is reused")
    func capsConnections() throws {
        let (server, directory) = try Self.serve(nofile: "64:64")
        defer { withExtendedLifetime(directory) {} }
        let socketPath = directory.socketPath
        let log = server.serverLog
        guard let range = log.range(of: "capping connections at "),
            let cap = Int(log[range.upperBound...].prefix { $0.isNumber })
        else {
            Issue.record("no 'capping connections at N' warning in the log:\n\(log)")
            return
        }
        #expect(cap >= 1 && cap < 64 - DescriptorLimitTests.reserve, "cap \(cap)")

        var clients: [RawNBDSocket?] = []
        for index in 0..<cap {
            let client = try RawNBDSocket(unixSocket: socketPath, timeout: 5)
            do {
                _ = try client.readGreeting()
            } catch {
                Issue.record("client \(index + 1) of \(cap) was not greeted: \(error)")
                return
            }
            clients.append(client)
        }
        // One more: the kernel accepts it, the server closes it at once, without a greeting.
        let started = Date()
        let extra = try RawNBDSocket(unixSocket: socketPath, timeout: 5)
        #expect(throws: (any Error).self) { try extra.readGreeting() }
        let waited = Date().timeIntervalSince(started)
        #expect(waited < 2, "the refused client waited \(waited) s")
        Thread.sleep(forTimeInterval: 0.2)
        #expect(
            server.serverLog.contains("connection limit of \(cap) reached; refused"),
            "no refusal warning in the log:\n\(server.serverLog)")

        // Freeing a slot lets a new client in.
        clients[0] = nil
        #expect(try RawNBDSocket.awaitGreeting(unixSocket: socketPath), "no greeting after a slot was freed")
        clients.removeAll()
        try server.stop()
    }

    /// ``DescriptorLimit/reserve``, as the README states it.
    static let reserve = 32
}
