import Foundation
import NBDClient
import Testing
import QMPWire

#if canImport(Glibc)
import Glibc
#endif

/// The server's memory stays bounded whatever clients do: clients that never read their
/// replies, clients that announce large WRITEs and never finish them, QMP clients that
/// never read their events. Each test measures the real server's RSS from /proc.
@Suite("Memory: bounded whatever clients do", .serialized)
struct MemoryBoundTests {
    static let mebibyte = 1 << 20
    static let readCommand: UInt16 = 0
    static let writeCommand: UInt16 = 1

    /// A raw connection in transmission with simple replies.
    static func rawClient(_ socketPath: String, export: String = "disk", timeout: Int = 10) throws -> RawNBDSocket {
        let client = try RawNBDSocket(unixSocket: socketPath, timeout: timeout)
        try client.handshake()
        try client.go(export: export)
        return client
    }

    @Test("pipelined 1 MiB READs whose replies are not read: RSS stays bounded, no reply is lost, others are served")
    func unreadReplies() throws {
        let imageMiB = 64
        let fixture = try ServerFixture(size: imageMiB * Self.mebibyte, filled: true)
        let socketPath = try #require(fixture.server.socketPath)
        let pid = fixture.server.process.processIdentifier
        let expected = (0..<imageMiB).map { ImageFile.pattern(count: Self.mebibyte, offset: $0 * Self.mebibyte) }
        let before = try ProcessStatus.residentBytes(of: pid)

        // 4 connections x 500 pipelined reads = 2000 MiB of replies the clients do not read.
        let connections = 4
        let readsPerConnection = 500
        let clients = try (0..<connections).map { _ in try Self.rawClient(socketPath, timeout: 20) }
        for (index, client) in clients.enumerated() {
            var requests: [UInt8] = []
            for read in 0..<readsPerConnection {
                let offset = UInt64((read + index) % imageMiB) * UInt64(Self.mebibyte)
                requests += RawNBDSocket.request(
                    type: Self.readCommand, cookie: UInt64(read), offset: offset, length: UInt32(Self.mebibyte))
            }
            try client.send(requests)
        }
        let sampler = ProcessStatus.PeakSampler(pid: pid)
        Thread.sleep(forTimeInterval: 2)

        // Meanwhile another client is served normally.
        let other = try fixture.connect()
        let data = try other.pread(count: Self.mebibyte, offset: 5 * UInt64(Self.mebibyte))
        #expect(data == expected[5], "the second client read wrong data")
        try? other.shutdown()
        let peak = sampler.stop()
        let bound = 150 * Self.mebibyte
        print("unread replies: RSS before \(mib(before)), peak with \(connections) x \(readsPerConnection) MiB unread \(mib(peak))")
        #expect(peak < bound, "RSS peaked at \(mib(peak)) with unread replies (bound \(mib(bound)))")

        // Every reply arrives, in full and correct.
        for (index, client) in clients.enumerated() {
            var cookies = Set<UInt64>()
            for _ in 0..<readsPerConnection {
                let reply = try client.readSimpleReply()
                #expect(reply.error == 0, "READ failed")
                let cookie = reply.cookie
                let payload = try client.receive(Self.mebibyte)
                let chunk = (Int(cookie) + index) % imageMiB
                let same = payload.count == expected[chunk].count && payload.withUnsafeBytes { received in
                    expected[chunk].withUnsafeBytes { wanted in
                        guard let a = received.baseAddress, let b = wanted.baseAddress else { return false }
                        return memcmp(a, b, wanted.count) == 0
                    }
                }
                if !same {
                    Issue.record("connection \(index): reply \(cookie) carries wrong data")
                }
                cookies.insert(cookie)
            }
            #expect(cookies == Set((0..<readsPerConnection).map(UInt64.init)), "connection \(index) lost replies")
        }
        let after = try ProcessStatus.residentBytes(of: pid)
        print("unread replies: RSS after all replies were read \(mib(after))")
        #expect(fixture.server.isRunning)
    }

    @Test("a WRITE header sent alone: its payload 300 ms later is written; a header whose payload never comes is cut by --request-timeout")
    func headerBeforePayload() throws {
        let fixture = try ServerFixture(size: 8 * Self.mebibyte, extraArguments: ["--request-timeout", "1"])
        let socketPath = try #require(fixture.server.socketPath)
        let client = try Self.rawClient(socketPath)
        let data = ImageFile.pattern(count: 4096, offset: 12_288, seed: 4)
        try client.send(RawNBDSocket.request(type: Self.writeCommand, cookie: 1, offset: 12_288, length: 4096))
        usleep(300_000)
        try client.send(data)
        let written = try client.readSimpleReply()
        #expect(written.error == 0 && written.cookie == 1)
        try client.sendRequest(type: Self.readCommand, cookie: 2, offset: 12_288, length: 4096)
        let read = try client.readSimpleReply()
        #expect(read.error == 0 && read.cookie == 2)
        #expect(try client.receive(4096) == data)

        // Only the header: the server holds no byte of the request in its buffer, and the
        // stall is still seen.
        let silent = try Self.rawClient(socketPath)
        try silent.send(RawNBDSocket.request(type: Self.writeCommand, cookie: 3, offset: 0, length: 4096))
        let started = Date()
        while !silent.peerHasClosed() && Date().timeIntervalSince(started) < 10 { usleep(20_000) }
        let elapsed = Date().timeIntervalSince(started)
        #expect(elapsed >= 0.9 && elapsed < 5, "closed after \(elapsed) s")
        #expect(fixture.server.serverLog.contains("stalled"), "\(fixture.server.serverLog)")
        // The first client is unaffected.
        try client.sendRequest(type: Self.readCommand, cookie: 4, offset: 12_288, length: 4096)
        #expect(try client.readSimpleReply().error == 0)
        #expect(try client.receive(4096) == data)
        #expect(fixture.server.isRunning)
    }

    @Test("WRITEs announced as 32 MiB and left short on 40 connections: RSS within the payload budget; --request-timeout closes them")
    func shortWrites() throws {
        // 15 of the 40 fit at a time: three rounds of the 1 s timeout.
        let budgetMiB = 512
        let fixture = try ServerFixture(
            size: 64 * Self.mebibyte,
            extraArguments: ["--request-timeout", "1", "--payload-budget", String(budgetMiB)])
        let socketPath = try #require(fixture.server.socketPath)
        let pid = fixture.server.process.processIdentifier
        let before = try ProcessStatus.residentBytes(of: pid)

        let connections = 40
        let announced = 32 * Self.mebibyte
        let clients = try (0..<connections).map { _ in try Self.rawClient(socketPath) }
        // Header + payload less 10 bytes, per connection; sent as fast as the server takes it.
        var message = RawNBDSocket.request(type: Self.writeCommand, cookie: 1, length: UInt32(announced))
        message += [UInt8](repeating: 0xA5, count: announced - 10)
        var sent = [Int](repeating: 0, count: connections)
        var closed = [Bool](repeating: false, count: connections)
        let sampler = ProcessStatus.PeakSampler(pid: pid)
        let started = Date()

        // A well-behaved client keeps working meanwhile (its 4 MiB WRITE needs budget too).
        let good = Thread.detachedResult {
            let connection = try fixture.connect()
            defer { try? connection.shutdown() }
            let data = ImageFile.pattern(count: 4 * Self.mebibyte, offset: 0)
            try connection.pwrite(data, offset: 8 << 20)
            return try connection.pread(count: data.count, offset: 8 << 20) == data
        }

        let deadline = Date().addingTimeInterval(40)
        message.withUnsafeBytes { bytes in
            while Date() < deadline && closed.contains(false) {
                var progress = false
                for index in 0..<connections where !closed[index] {
                    if sent[index] < bytes.count {
                        guard let n = clients[index].sendWithoutWaiting(UnsafeRawBufferPointer(rebasing: bytes[sent[index]...])) else {
                            closed[index] = true
                            continue
                        }
                        sent[index] += n
                        progress = progress || n > 0
                    } else if clients[index].peerHasClosed() {
                        closed[index] = true
                    }
                }
                if !progress { usleep(2_000) }
            }
        }
        let elapsed = Date().timeIntervalSince(started)
        let peak = sampler.stop()
        let goodResult = try good.wait(timeout: 30)
        Thread.sleep(forTimeInterval: 0.5)
        let after = try ProcessStatus.residentBytes(of: pid)
        print(
            "short writes: RSS before \(mib(before)), peak \(mib(peak)), after all were closed \(mib(after)); "
                + "\(closed.filter { $0 }.count) of \(connections) closed in \(String(format: "%.1f", elapsed)) s")

        // Budget, plus what each waiting connection read before it stopped, plus the server itself.
        let bound = before + budgetMiB * Self.mebibyte + 96 * Self.mebibyte
        #expect(peak < bound, "RSS peaked at \(mib(peak)) (bound \(mib(bound)); unbounded would be ~\(connections * 34) MiB)")
        #expect(!closed.contains(false), "\(closed.filter { !$0 }.count) stalled connections are still open")
        #expect(goodResult, "the well-behaved client read back wrong data")
        #expect(fixture.server.serverLog.contains("stalled"), "no log line about the stalled request:\n\(fixture.server.serverLog)")
        #expect(after < before + 64 * Self.mebibyte, "RSS stayed at \(mib(after)) after the connections were closed")

        // The server still serves.
        let connection = try fixture.connect()
        #expect(try connection.pread(count: 4096, offset: 0).count == 4096)
        #expect(fixture.server.isRunning)
    }

    @Test("a QMP client that never reads its events is disconnected; RSS stays bounded; other clients go on")
    func slowQMPReader() throws {
        let fixture = try ControlFixture()
        let pid = fixture.server.process.processIdentifier
        let slow = try fixture.qmp()
        let worker = try fixture.qmp()
        try worker.run("block-dirty-bitmap-add", ["node": "disk", "name": "b0"])
        let before = try ProcessStatus.residentBytes(of: pid)

        // Each pair of commands makes two ~1.1 KiB events, for every client. In batches of
        // 100 pairs, pipelined, replies read after each batch (events skipped).
        let pairs = 1200
        let batch = 100
        let padding = String(repeating: "x", count: 1000)
        var eventBytes = 0
        for start in stride(from: 0, to: pairs, by: batch) {
            var text = ""
            for index in start..<min(pairs, start + batch) {
                let name = "\(padding)-\(index)"
                text += QMPJSON.object([
                    "execute": "checkpoint-create", "id": .int(Int64(2 * index)),
                    "arguments": ["node": "disk", "bitmap": "b0", "name": .string(name)],
                ]).serialized() + "\n"
                text += QMPJSON.object([
                    "execute": "checkpoint-complete", "id": .int(Int64(2 * index + 1)),
                    "arguments": ["node": "disk", "name": .string(name)],
                ]).serialized() + "\n"
                eventBytes += 2 * (name.utf8.count + 120)
            }
            try worker.sendRaw(text)
            for _ in 0..<(2 * min(batch, pairs - start)) {
                let reply = try worker.receiveReply(timeout: 30)
                #expect(reply["return"] != nil, "\(reply)")
                worker.events.removeAll()
            }
        }
        let peak = try ProcessStatus.residentBytes(of: pid)
        print("slow QMP reader: RSS before \(mib(before)), after ~\(mib(eventBytes)) of events \(mib(peak))")
        #expect(peak < before + 32 * Self.mebibyte, "RSS grew from \(mib(before)) to \(mib(peak))")

        // The slow client now reads: it gets some events, then the end of the connection,
        // far short of everything that was emitted.
        var received = 0
        var sawEOF = false
        let deadline = Date().addingTimeInterval(20)
        while Date() < deadline {
            do {
                guard try slow.receiveIfAny(timeout: 2) != nil else { break }
                received += 1
            } catch is QMPConnectionClosed {
                sawEOF = true
                break
            }
        }
        #expect(sawEOF, "the slow client was not disconnected (read \(received) messages)")
        #expect(received < 2 * pairs, "the slow client got all \(received) events")
        #expect(fixture.server.serverLog.contains("QMP client that does not read"), "no log line:\n\(fixture.server.serverLog)")
        #expect(try worker.run("query-version")["qemu"] != nil)
        #expect(fixture.server.isRunning)
    }
}

extension Thread {
    /// Runs `body` on a new thread; `wait` returns its result.
    final class Result<Value>: @unchecked Sendable {
        private let done = DispatchSemaphore(value: 0)
        private var outcome: Swift.Result<Value, any Error>?

        fileprivate func finish(_ result: Swift.Result<Value, any Error>) {
            outcome = result
            done.signal()
        }

        func wait(timeout: TimeInterval) throws -> Value {
            guard done.wait(timeout: .now() + timeout) == .success, let outcome else {
                throw HarnessError("the background client did not finish within \(Int(timeout)) s")
            }
            return try outcome.get()
        }
    }

    static func detachedResult<Value>(_ body: @escaping () throws -> Value) -> Result<Value> {
        let result = Result<Value>()
        nonisolated(unsafe) let body = body
        Thread.detachNewThread { result.finish(Swift.Result { try body() }) }
        return result
    }
}
