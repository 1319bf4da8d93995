import Foundation
import NBDClient
import Testing

/// `serve --poll-max-ns`: an event loop whose connections have all answered busy-polls
/// their sockets for the next request. Polling must never change an answer, starve a
/// connection that is not idle, or outlive a closed socket.
@Suite("Idle polling", .serialized)
struct IdlePollingTests {
    static let caught = #"tidemark_idle_polls_total{outcome="caught"}"#
    static let expired = #"tidemark_idle_polls_total{outcome="expired"}"#

    /// Writes then reads back `rounds` 4 KiB blocks one at a time (queue depth 1).
    static func writeAndReadBack(_ connection: NBDConnection, base: Int, rounds: Int, seed: UInt8) throws -> [String] {
        var wrong: [String] = []
        for round in 0..<rounds {
            let offset = base + (round % 64) * 4096
            let data = ImageFile.pattern(count: 4096, offset: offset, seed: seed &+ UInt8(round % 200))
            try connection.pwrite(data, offset: UInt64(offset))
            if try connection.pread(count: 4096, offset: UInt64(offset)) != data { wrong.append("offset \(offset) round \(round)") }
        }
        return wrong
    }

    @Test("QD1 clients beside a pipelining one on a single event loop: every answer right, polls take requests, silences end them")
    func queueDepthOneBesidePipelining() throws {
        let (fixture, port) = try MetricsTests.serveWithMetrics(
            extraArguments: ["--event-loops", "1", "--poll-max-ns", "1000000"])
        let failures = Failures()
        // Alone first: the window opens on the gaps of a QD1 client.
        let solo = try fixture.connect()
        #expect(try Self.writeAndReadBack(solo, base: 0, rounds: 200, seed: 1).isEmpty)

        // Two QD1 clients and one with 32 reads in flight share the loop.
        DispatchQueue.concurrentPerform(iterations: 3) { index in
            do {
                let connection = try fixture.connect()
                if index < 2 {
                    let wrong = try Self.writeAndReadBack(connection, base: (1 + index) << 20, rounds: 400, seed: UInt8(10 * (index + 1)))
                    if !wrong.isEmpty { failures.add("QD1 client \(index): wrong data at \(wrong.prefix(3))") }
                } else {
                    for batch in 0..<40 {
                        let reads = (0..<32).map { (offset: UInt64((8 << 20) + ((batch * 32 + $0) % 128) * 65_536), count: 65_536) }
                        for (slot, result) in connection.pipelinedReads(reads).enumerated() {
                            guard case .success(let data) = result, data == [UInt8](repeating: 0, count: 65_536) else {
                                failures.add("pipelined read \(batch)/\(slot): \(result)")
                                return
                            }
                        }
                    }
                }
                try connection.shutdown()
            } catch {
                failures.add("client \(index): \(error)")
            }
        }
        #expect(failures.all.isEmpty, "\(failures.all)")

        // Pauses longer than the window: polls run out and the loop sleeps; the requests
        // after them are still answered.
        for round in 0..<5 {
            usleep(5_000)
            let offset = 4 << 20 + round * 4096
            let data = ImageFile.pattern(count: 4096, offset: offset, seed: 99)
            try solo.pwrite(data, offset: UInt64(offset))
            #expect(try solo.pread(count: 4096, offset: UInt64(offset)) == data)
        }
        try solo.shutdown()

        // Connections that come and go (their descriptors reused) leave nothing behind.
        for round in 0..<20 {
            let connection = try fixture.connect()
            #expect(try connection.pread(count: 4096, offset: UInt64(round * 4096)).count == 4096)
            try connection.shutdown()
        }
        let reader = try fixture.connect()
        for slot in 0..<64 {
            // The last of the 400 rounds of client 0 that wrote this slot.
            let round = slot < 16 ? 384 + slot : 320 + slot
            let offset = (1 << 20) + slot * 4096
            let expected = ImageFile.pattern(count: 4096, offset: offset, seed: 10 &+ UInt8(round % 200))
            #expect(try reader.pread(count: 4096, offset: UInt64(offset)) == expected)
        }
        let samples = try MetricsTests.scrape(port: port) { ($0[Self.caught] ?? 0) > 0 && ($0[Self.expired] ?? 0) > 0 }
        #expect((samples[Self.caught] ?? 0) > 0, "no request was taken by a poll")
        #expect((samples[Self.expired] ?? 0) > 0, "no poll ran out during the pauses")
        #expect(fixture.server.isRunning)
    }

    @Test("a client that pipelines starts no polls of its own; a QD1 client after it is polled for again")
    func pipeliningClientIsNotPolled() throws {
        let (fixture, port) = try MetricsTests.serveWithMetrics(
            extraArguments: ["--event-loops", "1", "--poll-max-ns", "1000000"])
        func polls() throws -> Double {
            let samples = try MetricsTests.scrape(port: port)
            return (samples[Self.caught] ?? 0) + (samples[Self.expired] ?? 0)
        }
        // A QD1 client opens the window.
        let solo = try fixture.connect()
        #expect(try Self.writeAndReadBack(solo, base: 0, rounds: 200, seed: 5).isEmpty)
        try solo.shutdown()
        let afterSolo = try polls()
        #expect(afterSolo > 0, "the QD1 client was never polled for")

        // 100 bursts of 32 reads in flight: each burst ends with the connection idle,
        // which before pacing started a poll every time.
        let pipelining = try fixture.connect()
        for burst in 0..<100 {
            let reads = (0..<32).map { (offset: UInt64((burst * 32 + $0) % 256 * 4096), count: 4096) }
            for (slot, result) in pipelining.pipelinedReads(reads).enumerated() {
                guard case .success(let data) = result else {
                    Issue.record("burst \(burst) read \(slot): \(result)")
                    return
                }
                #expect(data.count == 4096)
            }
        }
        let pipelined = try polls() - afterSolo
        #expect(pipelined <= 10, "\(pipelined) polls for 100 bursts of a pipelining client")

        // The same client at queue depth 1 earns polling back after 16 single reads.
        #expect(try Self.writeAndReadBack(pipelining, base: 2 << 20, rounds: 100, seed: 6).isEmpty)
        #expect(try polls() - afterSolo - pipelined >= 100, "a client back at QD1 is polled for again")
        try pipelining.shutdown()
    }

    @Test("--poll-max-ns 0 never polls; more than 1 ms is refused")
    func pollingOff() throws {
        let (fixture, port) = try MetricsTests.serveWithMetrics(extraArguments: ["--poll-max-ns", "0"])
        let connection = try fixture.connect()
        #expect(try Self.writeAndReadBack(connection, base: 0, rounds: 200, seed: 3).isEmpty)
        try connection.shutdown()
        let samples = try MetricsTests.scrape(port: port)
        #expect((samples[Self.caught] ?? 0) == 0)
        #expect((samples[Self.expired] ?? 0) == 0)

        let refused = try ControlPrograms.run(
            TidemarkProcess.binaryPath, ["serve", fixture.image, "--unix", fixture.directory.file("other.sock"), "--poll-max-ns", "2000000"])
        #expect(refused.status == 64, "\(refused)")
        #expect(refused.stderr.contains("--poll-max-ns"), "\(refused)")
    }
}
