import Foundation
import Testing

/// `tidemark serve --log-format json|text`: what a log shipper sees of connections and
/// refusals, from the real server driven by nbdinfo and by clients that misbehave.
@Suite("Logs for machines")
struct ServiceLogTests {
    @Test("json: every stderr line parses; nbdinfo's connection opens and closes with duration and bytes; refusals carry their reason")
    func jsonLines() throws {
        let directory = try TestDirectory()
        let image = directory.file("disk.img")
        try ImageFile.createFilled(image, size: 4 << 20, seed: 3)
        let server = try TidemarkProcess.serve(image: image, in: directory, extraArguments: ["--log-format", "json"])
        let uri = try server.unixURI(export: "disk")

        try ExternalTool.check("nbdinfo", [uri])
        let unknown = try ExternalTool.run("nbdinfo", [try server.unixURI(export: "nope")])
        #expect(!unknown.succeeded, "\(unknown)")
        // A client with the wrong option magic: the handshake ends at once.
        let bad = try RawNBDSocket(unixSocket: directory.socketPath)
        try bad.handshake()
        try bad.send(Array(repeating: 0x58, count: 16))
        #expect(bad.isClosedByPeer())
        #expect(try server.stop() == .success, "\(server.serverLog)")

        let log = try JSONLogLines(server.serverLog)
        for entry in log.entries {
            #expect(JSONLogLines.isTimestamp(entry["time"]), "\(entry)")
            #expect(["trace", "debug", "info", "notice", "warning", "error", "critical"].contains(entry["level"] as? String ?? ""), "\(entry)")
            #expect(entry["message"] is String, "\(entry)")
            // Nothing per request above debug (the default level is info).
            #expect(entry["level"] as? String != "debug", "\(entry)")
        }

        // nbdinfo on "disk": opened, then closed with the export, duration and both byte counts.
        let closes = log.events("connection.close")
        let served = try #require(closes.first { $0["export"] as? String == "disk" }, "\(log.entries)")
        #expect(served["level"] as? String == "info")
        let connection = try #require(served["connection"] as? Int, "\(served)")
        #expect((served["duration_ms"] as? Double ?? -1) >= 0, "\(served)")
        // Greeting, option replies and the INFO reply: nbdinfo reads well over 100 bytes.
        #expect((served["bytes_read"] as? Int ?? 0) > 20, "\(served)")
        #expect((served["bytes_written"] as? Int ?? 0) > 100, "\(served)")
        let opened = log.events("connection.open").filter { $0["connection"] as? Int == connection }
        #expect(opened.count == 1 && opened.first?["level"] as? String == "info", "\(log.entries)")
        // Three clients, three distinct connection numbers, each opened and closed once.
        let numbers = Set(closes.compactMap { $0["connection"] as? Int })
        #expect(numbers.count == 3 && closes.count == 3, "\(closes)")
        #expect(Set(log.events("connection.open").compactMap { $0["connection"] as? Int }) == numbers)

        // The refusals: warnings with a reason, on the connection they refused.
        let refusals = log.events("handshake.refused")
        #expect(refusals.allSatisfy { $0["level"] as? String == "warning" && $0["connection"] is Int }, "\(refusals)")
        let unknownExport = refusals.first { ($0["reason"] as? String)?.contains("unknown export 'nope'") == true }
        #expect(unknownExport?["export"] as? String == "nope", "\(refusals)")
        #expect(refusals.contains { ($0["reason"] as? String)?.contains("bad option magic 0x5858585858585858") == true }, "\(refusals)")
        #expect(log.events("server.stopping").count == 1 && log.events("server.stopped").count == 1, "\(log.entries)")
    }

    @Test("json: a client over the connection limit is refused with a warning naming the limit")
    func connectionLimit() throws {
        let directory = try TestDirectory()
        let image = directory.file("disk.img")
        try ImageFile.createSparse(image, size: 1 << 20)
        let server = try TidemarkProcess.serve(
            image: image, in: directory, extraArguments: ["--log-format", "json", "--max-connections", "1"])
        let first = try RawNBDSocket(unixSocket: directory.socketPath)
        _ = try first.readGreeting()
        let second = try RawNBDSocket(unixSocket: directory.socketPath)
        #expect(second.isClosedByPeer())
        withExtendedLifetime(first) {}
        #expect(try server.stop() == .success)
        let log = try JSONLogLines(server.serverLog)
        let refused = log.events("connection.refused")
        #expect(refused.count == 1, "\(log.entries)")
        #expect(refused.first?["level"] as? String == "warning")
        #expect(refused.first?["reason"] as? String == "connection limit of 1 reached", "\(refused)")
        // The refused client was never admitted: one open and one close, for the first.
        #expect(log.events("connection.open").count == 1 && log.events("connection.close").count == 1, "\(log.entries)")
    }

    @Test("text (the default): UTC time with microseconds, level, message, then key=value fields")
    func textLines() throws {
        let directory = try TestDirectory()
        let image = directory.file("disk.img")
        try ImageFile.createSparse(image, size: 1 << 20)
        let server = try TidemarkProcess.serve(image: image, in: directory)
        try ExternalTool.check("nbdinfo", [try server.unixURI(export: "disk")])
        #expect(try server.stop() == .success)
        let lines = server.serverLog.split(separator: "\n")
        let closed = try #require(lines.first { $0.contains("NBD connection closed") }, "\(server.serverLog)")
        #expect(
            closed.wholeMatch(
                of: /\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z info NBD connection closed bytes_read=\d+ bytes_written=\d+ connection=\d+ duration_ms=[0-9.e-]+ event=connection\.close export=disk/
            ) != nil, "\(closed)")
        #expect(lines.allSatisfy { $0.wholeMatch(of: /\d{4}-\d{2}-\d{2}T[0-9:.]{15}Z (trace|debug|info|notice|warning|error|critical) .*/) != nil }, "\(server.serverLog)")
    }
}
