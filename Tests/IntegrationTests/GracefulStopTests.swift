import Foundation
import NBDClient
import Testing

/// SIGTERM and SIGINT: the server finishes what is in flight, flushes, and exits 0, and
/// every acknowledged write is in the file.
@Suite("Graceful stop", .serialized)
struct GracefulStopTests {
    /// What the writers did, slot by slot: the seed last acknowledged and the seed of a
    /// write that was sent but never acknowledged.
    final class WriteLog: @unchecked Sendable {
        private let lock = NSLock()
        private(set) var acknowledged: [Int: UInt8] = [:]
        private(set) var pending: [Int: UInt8] = [:]
        private(set) var count = 0
        private(set) var errors: [String] = []

        func begin(slot: Int, seed: UInt8) {
            lock.lock()
            pending[slot] = seed
            lock.unlock()
        }

        func acknowledge(slot: Int, seed: UInt8) {
            lock.lock()
            acknowledged[slot] = seed
            pending[slot] = nil
            count += 1
            lock.unlock()
        }

        func fail(_ message: String) {
            lock.lock()
            errors.append(message)
            lock.unlock()
        }

        var acknowledgedCount: Int {
            lock.lock()
            defer { lock.unlock() }
            return count
        }
    }

    static let slotSize = 64 * 1024
    static let slotsPerWriter = 128
    static let writers = 3

    @Test("SIGTERM while clients write: exit 0, acknowledged writes in the file, no torn writes")
    func sigtermDuringWrites() throws {
        let size = Self.slotSize * Self.slotsPerWriter * Self.writers
        let fixture = try ServerFixture(size: size)
        let log = WriteLog()
        let connections = try (0..<Self.writers).map { _ in try fixture.connect() }
        let group = DispatchGroup()
        let deadline = Date().addingTimeInterval(20)
        for (index, connection) in connections.enumerated() {
            group.enter()
            Thread.detachNewThread {
                defer { group.leave() }
                // Wrap around the writer's slots with a new seed each pass until the
                // server goes away; seeds step by 2 per pass, so passes never look alike.
                var iteration = 0
                while Date() < deadline {
                    let slot = index * Self.slotsPerWriter + iteration % Self.slotsPerWriter
                    let seed = UInt8(truncatingIfNeeded: 2 * (iteration / Self.slotsPerWriter) + 2 + 100 * index)
                    let data = ImageFile.pattern(count: Self.slotSize, offset: slot * Self.slotSize, seed: seed)
                    log.begin(slot: slot, seed: seed)
                    do {
                        try connection.pwrite(data, offset: UInt64(slot * Self.slotSize))
                    } catch {
                        return  // the server stopped
                    }
                    log.acknowledge(slot: slot, seed: seed)
                    iteration += 1
                }
                log.fail("writer \(index) was never stopped by the server")
            }
        }
        // Let the writers get going, then stop the server under load.
        while log.acknowledgedCount < 50 && Date() < deadline {
            usleep(1000)
        }
        let termination = try fixture.server.stop(signal: SIGTERM, timeout: 30)
        #expect(group.wait(timeout: .now() + 30) == .success, "writers did not notice the stop")
        #expect(termination == .success, "tidemark: \(termination); stderr:\n\(fixture.server.serverLog)")
        #expect(log.errors.isEmpty, "\(log.errors)")
        #expect(log.acknowledgedCount >= 50)

        let image = try ImageFile.read(fixture.image)
        #expect(image.count == size)
        var checked = 0
        for slot in Set(log.acknowledged.keys).union(log.pending.keys).sorted() {
            let range = (slot * Self.slotSize)..<((slot + 1) * Self.slotSize)
            let actual = Array(image[range])
            var allowed: [[UInt8]] = []
            if let seed = log.acknowledged[slot] {
                allowed.append(ImageFile.pattern(count: Self.slotSize, offset: range.lowerBound, seed: seed))
            } else {
                allowed.append(ImageFile.constant(0, count: Self.slotSize))
            }
            if let seed = log.pending[slot] {
                // Sent but unacknowledged: either wholly applied or not at all.
                allowed.append(ImageFile.pattern(count: Self.slotSize, offset: range.lowerBound, seed: seed))
            }
            #expect(allowed.contains(actual), "slot \(slot) (offset \(range.lowerBound)) holds neither the acknowledged nor the in-flight data")
            checked += 1
        }
        #expect(checked > 0)
    }

    @Test("SIGTERM with pipelined writes in flight: acknowledged ones are in the file, none is torn")
    func sigtermWithPipelinedWrites() throws {
        let count = 64
        let size = 256 * 1024
        let fixture = try ServerFixture(size: 2 * count * size)
        let connections = try (0..<2).map { _ in try fixture.connect() }
        let batches = (0..<2).map { index in
            (0..<count).map { slot in
                let offset = index * count * size + slot * size
                return NBDConnection.PipelinedWrite(offset: UInt64(offset), data: ImageFile.pattern(count: size, offset: offset, seed: 60))
            }
        }
        // Warm the connections up so the stop lands among the pipelined writes, not
        // before the first one.
        for connection in connections {
            try connection.pwrite(ImageFile.constant(0, count: 4096), offset: 0)
        }
        let outcomes = OutcomeLog()
        let group = DispatchGroup()
        for (index, connection) in connections.enumerated() {
            // Threads of their own: GCD's pool may be too small on 2 cores to run both
            // writers at once.
            group.enter()
            Thread.detachNewThread {
                outcomes.record(connection: index, connection.pipelinedWrites(batches[index]))
                group.leave()
            }
        }
        // Stop as soon as the server has applied the first pipelined write, with the
        // rest still queued or in flight.
        let firstBlock = ImageFile.pattern(count: 4096, offset: 0, seed: 60)
        let waitLimit = Date().addingTimeInterval(10)
        while try ImageFile.read(fixture.image, offset: 0, count: 4096) != firstBlock && Date() < waitLimit {
            usleep(200)
        }
        let termination = try fixture.server.stop(signal: SIGTERM, timeout: 30)
        #expect(group.wait(timeout: .now() + 30) == .success)
        #expect(termination == .success, "tidemark: \(termination); stderr:\n\(fixture.server.serverLog)")
        #expect(outcomes.all.count == 2)

        let image = try ImageFile.read(fixture.image)
        for (index, errors) in outcomes.all {
            for (slot, error) in errors.enumerated() {
                let offset = index * count * size + slot * size
                let actual = Array(image[offset..<(offset + size)])
                let written = ImageFile.pattern(count: size, offset: offset, seed: 60)
                if error == nil {
                    #expect(actual == written, "acknowledged write at \(offset) is not in the file")
                } else {
                    #expect(actual == written || actual == ImageFile.constant(0, count: size), "unacknowledged write at \(offset) is torn")
                }
            }
        }
    }

    /// Per-connection results of pipelined writes, gathered from writer threads.
    final class OutcomeLog: @unchecked Sendable {
        private let lock = NSLock()
        private var outcomes: [Int: [NBDClientError?]] = [:]

        func record(connection: Int, _ errors: [NBDClientError?]) {
            lock.lock()
            outcomes[connection] = errors
            lock.unlock()
        }

        var all: [Int: [NBDClientError?]] {
            lock.lock()
            defer { lock.unlock() }
            return outcomes
        }
    }

    @Test("SIGTERM after FUA writes: every one of them is in the file")
    func sigtermAfterFUA() throws {
        let fixture = try ServerFixture()
        let connection = try fixture.connect()
        for index in 0..<16 {
            try connection.pwrite(ImageFile.constant(UInt8(index + 1), count: 65536), offset: UInt64(index * 65536), flags: [.fua])
        }
        // Plain writes, acknowledged but not flushed: the stop must flush them.
        try connection.pwrite(ImageFile.constant(0xEE, count: 1 << 20), offset: 4 << 20)
        #expect(try fixture.server.stop(signal: SIGTERM) == .success)
        for index in 0..<16 {
            #expect(try ImageFile.read(fixture.image, offset: index * 65536, count: 65536) == ImageFile.constant(UInt8(index + 1), count: 65536))
        }
        #expect(try ImageFile.read(fixture.image, offset: 4 << 20, count: 1 << 20) == ImageFile.constant(0xEE, count: 1 << 20))
    }

    @Test("SIGINT with idle clients connected, and SIGTERM with none, exit 0", arguments: [SIGINT, SIGTERM])
    func idleStop(signal: Int32) throws {
        let fixture = try ServerFixture()
        let idle = signal == SIGINT ? try fixture.connect() : nil
        let negotiating = signal == SIGINT ? try RawNBDSocket(unixSocket: fixture.directory.socketPath) : nil
        _ = try negotiating?.readGreeting()
        if let idle { try idle.pwrite(ImageFile.constant(1, count: 4096), offset: 0) }
        #expect(try fixture.server.stop(signal: signal, timeout: 20) == .success, "stderr:\n\(fixture.server.serverLog)")
        if idle != nil {
            #expect(try ImageFile.read(fixture.image, offset: 0, count: 4096) == ImageFile.constant(1, count: 4096))
        }
        withExtendedLifetime((idle, negotiating)) {}
    }

    /// Starts `tidemark serve` on a small image and returns at once, before the server
    /// has announced anything; the directory holds the image and socket while it runs.
    static func startWithoutWaiting() throws -> (TestDirectory, TidemarkProcess) {
        let directory = try TestDirectory()
        let image = directory.file("disk.raw")
        try ImageFile.createSparse(image, size: 1 << 20)
        let server = try TidemarkProcess(
            arguments: ["serve", image, "--unix", directory.socketPath], directory: directory, expectedListeners: 0)
        return (directory, server)
    }

    @Test("a SIGTERM at any moment of the start ends the server; none is lost while its handler is set up")
    func sigtermDuringStart() throws {
        var graceful = 0
        for round in 0..<40 {
            let (directory, server) = try Self.startWithoutWaiting()
            // 0 to 120 ms after the spawn (a debug build announces its listener after
            // about 20 ms): before, during and after the handlers' setup.
            usleep(UInt32(round) * 3_000 + UInt32.random(in: 0..<3_000))
            // Throws if the server outlives the timeout: the signal was lost.
            let termination = try server.stop(signal: SIGTERM, timeout: 15)
            // Before the handler exists SIGTERM's default action ends the process.
            let killed = TidemarkProcess.Termination(exited: false, status: SIGTERM)
            #expect(termination == .success || termination == killed, "round \(round): \(termination)\n\(server.serverLog)")
            if termination == .success { graceful += 1 }
            withExtendedLifetime(directory) {}
        }
        #expect(graceful > 0, "no round reached the handler")
    }

    /// The start once ignored SIGINT and SIGTERM until libdispatch had registered their
    /// sources, up to a few milliseconds later on a loaded machine: a signal then was
    /// dropped and the server never stopped. Sampling `/proc` every few tens of
    /// microseconds saw that window in two of three starts.
    @Test("SIGTERM and SIGINT are never ignored during the start, and have their handlers once it announces a listener")
    func signalsNeverIgnoredDuringStart() throws {
        for _ in 0..<5 {
            let (directory, server) = try Self.startWithoutWaiting()
            let pid = server.process.processIdentifier
            let deadline = Date().addingTimeInterval(30)
            var samples = 0
            while server.listeners.isEmpty && server.process.isRunning && Date() < deadline {
                // The process may not have exec'd yet, or be gone: only what was read counts.
                if let term = try? ProcessStatus.ignores(SIGTERM, pid: pid),
                    let interrupt = try? ProcessStatus.ignores(SIGINT, pid: pid)
                {
                    samples += 1
                    #expect(!term && !interrupt, "SIGTERM or SIGINT ignored during the start (sample \(samples))")
                    if term || interrupt { break }
                }
            }
            #expect(!server.listeners.isEmpty, "no listener announced; \(server.serverLog)")
            #expect(samples > 0)
            #expect(try ProcessStatus.catches(SIGTERM, pid: pid))
            #expect(try ProcessStatus.catches(SIGINT, pid: pid))
            #expect(try server.stop() == .success)
            withExtendedLifetime(directory) {}
        }
    }
}
