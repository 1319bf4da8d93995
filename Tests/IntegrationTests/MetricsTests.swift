import Foundation
import NBDClient
import Testing
import QMPWire

#if canImport(Glibc)
import Glibc
#endif

/// `tidemark serve --metrics`: the real server scraped over HTTP after real client traffic.
@Suite("Metrics endpoint", .serialized)
struct MetricsTests {
    /// A fixture serving with `--metrics 127.0.0.1:PORT` on a free port, once it answers.
    static func serveWithMetrics(
        filled: Bool = false, extraArguments: [String] = []
    ) throws -> (fixture: ServerFixture, port: Int) {
        var lastError: (any Error)?
        for _ in 0..<5 {
            let port = try HTTPProbe.freePort()
            do {
                let fixture = try ServerFixture(
                    filled: filled, extraArguments: ["--metrics", "127.0.0.1:\(port)"] + extraArguments)
                try waitForEndpoint(port: port, server: fixture.server)
                return (fixture, port)
            } catch {
                lastError = error
            }
        }
        throw HarnessError("could not start a metrics endpoint: \(lastError.map { "\($0)" } ?? "")")
    }

    static func waitForEndpoint(port: Int, server: TidemarkProcess) throws {
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline {
            if let response = try? HTTPProbe.get(port: port, "/metrics"), response.status == 200 { return }
            usleep(20_000)
        }
        throw HarnessError("no metrics at 127.0.0.1:\(port) within 10 s; server log:\n\(server.serverLog)")
    }

    /// Scrapes until `condition` holds for the samples (connections fold when they close,
    /// which the server sees a moment after the client); returns the last samples.
    static func scrape(
        port: Int, until condition: ([String: Double]) -> Bool = { _ in true }
    ) throws -> [String: Double] {
        let deadline = Date().addingTimeInterval(10)
        var samples: [String: Double] = [:]
        repeat {
            let response = try HTTPProbe.get(port: port, "/metrics")
            #expect(response.status == 200)
            samples = HTTPProbe.samples(response.body)
            if condition(samples) { return samples }
            usleep(50_000)
        } while Date() < deadline
        return samples
    }

    @Test("exactly N 4 KiB writes and M reads: counters, bytes and histogram counts match the traffic")
    func countsMatchTraffic() throws {
        let (fixture, port) = try Self.serveWithMetrics()
        let writes = 100
        let reads = 37
        do {
            let connection = try fixture.connect()
            let block = [UInt8](repeating: 0xA5, count: 4096)
            for index in 0..<writes { try connection.pwrite(block, offset: UInt64(index) * 4096) }
            for index in 0..<reads { _ = try connection.pread(count: 4096, offset: UInt64(index) * 8192) }
            try connection.flush()
            try connection.shutdown()
        }
        let write = #"export="disk",command="write""#
        let read = #"export="disk",command="read""#
        let samples = try Self.scrape(port: port) {
            $0[#"tidemark_connections{transport="unix",tls="false"}"#] == 0
                && $0[#"tidemark_requests_total{\#(write),result="ok"}"#] == Double(writes)
        }
        #expect(samples[#"tidemark_requests_total{\#(write),result="ok"}"#] == Double(writes))
        #expect(samples[#"tidemark_requests_total{\#(write),result="error"}"#] == 0)
        #expect(samples[#"tidemark_request_bytes_total{\#(write)}"#] == Double(writes * 4096))
        #expect(samples[#"tidemark_request_duration_seconds_count{\#(write)}"#] == Double(writes))
        #expect(samples[#"tidemark_request_duration_seconds_bucket{\#(write),le="+Inf"}"#] == Double(writes))
        #expect((samples[#"tidemark_request_duration_seconds_sum{\#(write)}"#] ?? 0) > 0)
        #expect(samples[#"tidemark_requests_total{\#(read),result="ok"}"#] == Double(reads))
        #expect(samples[#"tidemark_request_bytes_total{\#(read)}"#] == Double(reads * 4096))
        #expect(samples[#"tidemark_request_duration_seconds_count{\#(read)}"#] == Double(reads))
        #expect(samples[#"tidemark_requests_total{export="disk",command="flush",result="ok"}"#] == 1)
        #expect(samples[#"tidemark_requests_in_flight{export="disk"}"#] == 0)
        #expect(samples[#"tidemark_connections_total{transport="unix",tls="false"}"#] == 1)
        #expect(samples[#"tidemark_connections{transport="unix",tls="false"}"#] == 0)
        #expect(samples[#"tidemark_build_info{version="0.1.0"}"#] == 1)
        #expect(samples[#"tidemark_journal_fsyncs_total{export="disk"}"#] == 0)
        // Buckets are cumulative and end at the count.
        let bounds = ["1e-05", "2.5e-05", "5e-05", "0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005",
                      "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "+Inf"]
        let buckets = bounds.map { samples[#"tidemark_request_duration_seconds_bucket{\#(write),le="\#($0)"}"#] ?? -1 }
        #expect(!buckets.contains(-1), "missing buckets: \(buckets)")
        #expect(buckets == buckets.sorted())
    }

    @Test("bitmaps, journal fsyncs and handshake failures are on the page; fio traffic is counted exactly")
    func stateAndFio() throws {
        let (fixture, port) = try Self.serveWithMetrics(extraArguments: ["--bitmap", "b0"])
        // Unknown client flags end the handshake: counted under a fixed reason.
        do {
            let raw = try RawNBDSocket(unixSocket: fixture.directory.socketPath)
            _ = try raw.handshake(clientFlags: 0xFFFF_0000)
            let deadline = Date().addingTimeInterval(5)
            while !raw.isClosedByPeer() && Date() < deadline { usleep(10_000) }
        }
        let directory = try TestDirectory()
        try ExternalTool.check(
            "fio",
            ["--ioengine=nbd", "--uri=\(fixture.uri)", "--name=w", "--rw=randwrite", "--bs=4k", "--iodepth=8",
             "--size=1m", "--number_ios=64", "--randrepeat=1"],
            timeout: 120, currentDirectory: directory.path)
        let write = #"export="disk",command="write""#
        let samples = try Self.scrape(port: port) {
            $0[#"tidemark_connections{transport="unix",tls="false"}"#] == 0
                && $0[#"tidemark_requests_total{\#(write),result="ok"}"#] == 64
        }
        #expect(samples[#"tidemark_requests_total{\#(write),result="ok"}"#] == 64)
        #expect(samples[#"tidemark_request_duration_seconds_count{\#(write)}"#] == 64)
        #expect(samples[#"tidemark_request_bytes_total{\#(write)}"#] == Double(64 * 4096))
        #expect((samples[#"tidemark_bitmap_dirty_bytes{export="disk",bitmap="b0"}"#] ?? 0) > 0)
        #expect(samples[#"tidemark_bitmap_recording{export="disk",bitmap="b0"}"#] == 1)
        #expect((samples[#"tidemark_journal_fsyncs_total{export="disk"}"#] ?? 0) >= 1)
        #expect(samples[#"tidemark_checkpoints_pending{export="disk"}"#] == 0)
        let failures = samples.filter { $0.key.hasPrefix("tidemark_handshake_failures_total") }
        #expect(failures == [#"tidemark_handshake_failures_total{reason="unknown_client_flags"}"#: 1], "\(failures)")
    }

    @Test("a checkpoint with a view: pending count and age, preserved bytes, the live bitmap restarting from empty")
    func checkpointAndView() throws {
        let port = try HTTPProbe.freePort()
        let fixture = try ControlFixture(filled: true, extraArguments: ["--bitmap", "b0", "--metrics", "127.0.0.1:\(port)"])
        try Self.waitForEndpoint(port: port, server: fixture.server)
        let writer = try fixture.connect()
        let block = [UInt8](repeating: 0x5A, count: 65536)
        for index in 0..<4 { try writer.pwrite(block, offset: UInt64(index) * 65536) }
        let client = try fixture.qmp()
        let created = try Views.create(client)
        #expect(created.count == 4 * 65536)
        // Overwriting two granules the view shows preserves their old data first.
        for index in 0..<2 { try writer.pwrite(block, offset: UInt64(index) * 65536) }
        let samples = try Self.scrape(port: port) { $0[#"tidemark_checkpoints_pending{export="disk"}"#] == 1 }
        #expect(samples[#"tidemark_checkpoints_pending{export="disk"}"#] == 1)
        let age = try #require(samples[#"tidemark_checkpoint_oldest_pending_age_seconds{export="disk"}"#])
        #expect(age >= 0 && age < 30)
        #expect(samples[#"tidemark_view_preserved_bytes{export="disk",checkpoint="\#(created.checkpoint)"}"#] == Double(2 * 65536))
        #expect(samples[#"tidemark_bitmap_dirty_bytes{export="disk",bitmap="b0"}"#] == Double(2 * 65536))
        #expect((samples[#"tidemark_journal_fsyncs_total{export="disk"}"#] ?? 0) >= 1)

        _ = try client.run("checkpoint-complete", ["node": "disk", "name": .string(created.checkpoint)])
        let after = try Self.scrape(port: port) { $0[#"tidemark_checkpoints_pending{export="disk"}"#] == 0 }
        #expect(after[#"tidemark_checkpoints_pending{export="disk"}"#] == 0)
        #expect(after[#"tidemark_checkpoint_oldest_pending_age_seconds{export="disk"}"#] == 0)
        #expect(after.keys.contains { $0.hasPrefix("tidemark_view_preserved_bytes") } == false)
        try writer.shutdown()
    }

    @Test("hostile HTTP: huge header, slowloris, non-GET, garbage, unknown path, too many sockets; scrapes go on")
    func hostileHTTP() throws {
        let (fixture, port) = try Self.serveWithMetrics()
        _ = fixture

        // A 64 KiB header: refused with 431 before the parser buffers it.
        let huge = "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + String(repeating: "a", count: 64 << 10) + "\r\n\r\n"
        let hugeReply = try HTTPProbe.exchange(port: port, Array(huge.utf8))
        #expect(hugeReply.status == 431 || hugeReply.status == 0, "status \(hugeReply.status)")

        // Not GET, not /metrics, not HTTP.
        #expect(try HTTPProbe.exchange(port: port, Array("POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc".utf8)).status == 405)
        #expect(try HTTPProbe.exchange(port: port, Array("DELETE /metrics HTTP/1.1\r\nHost: x\r\n\r\n".utf8)).status == 405)
        #expect(try HTTPProbe.get(port: port, "/").status == 404)
        #expect(try HTTPProbe.get(port: port, "/metricsx").status == 404)
        #expect(try HTTPProbe.exchange(port: port, Array("\u{16}\u{03}\u{01}\0\0garbage\r\n\r\n".utf8)).status == 400)

        // Slowloris: half a request, then silence; the server closes it within its deadline.
        let slow = try HTTPProbe.connect(port: port, receiveTimeout: 15)
        defer { close(slow) }
        HTTPProbe.send(slow, Array("GET /metrics HTTP/1.1\r\nHost: x\r\n".utf8))
        let started = Date()
        let slowReply = HTTPProbe.readToEnd(slow)
        let waited = Date().timeIntervalSince(started)
        #expect(slowReply != nil, "the server kept a stalled request open for 15 s")
        #expect(waited < 10, "closed after \(waited) s")

        // Idle sockets beyond the cap are closed at once; a scrape after they go works.
        var idle: [Int32] = []
        for _ in 0..<24 { idle.append(try HTTPProbe.connect(port: port, receiveTimeout: 2)) }
        let overflow = try HTTPProbe.connect(port: port, receiveTimeout: 2)
        #expect(HTTPProbe.readToEnd(overflow) != nil, "a connection over the cap was kept")
        close(overflow)
        for fd in idle { close(fd) }

        try Self.waitForEndpoint(port: port, server: fixture.server)
        let response = try HTTPProbe.get(port: port, "/metrics?x=1")
        #expect(response.status == 200)
        #expect(response.body.contains("tidemark_build_info"))
        #expect(fixture.server.isRunning)
    }
}
