import Foundation
import NBDClient
import Testing

/// The server's defences against clients that hold resources: the handshake timeout and
/// the connection limit.
@Suite("Limits: handshake timeout and connection limit", .serialized)
struct LimitsTests {
    @Test("a client that never finishes the handshake is disconnected after --handshake-timeout")
    func handshakeTimeout() throws {
        let fixture = try ServerFixture(extraArguments: ["--handshake-timeout", "1"])
        let socketPath = try #require(fixture.server.socketPath)

        let idle = try RawNBDSocket(unixSocket: socketPath, timeout: 5)
        _ = try idle.readGreeting()
        let started = Date()
        // Send nothing: the server must hang up on its own, well before our 5 s receive timeout.
        #expect(idle.isClosedByPeer())
        let waited = Date().timeIntervalSince(started)
        #expect(waited >= 0.5 && waited < 4.5, "closed after \(waited) s")

        // A client that finishes its handshake in time is not affected by the timer.
        let client = try fixture.connect()
        Thread.sleep(forTimeInterval: 1.5)
        let data = try client.pread(count: 512, offset: 0)
        #expect(data.count == 512)
        #expect(fixture.server.isRunning)
    }

    @Test("connections beyond --max-connections are closed at once; a freed slot is reusable")
    func connectionLimit() throws {
        let fixture = try ServerFixture(extraArguments: ["--max-connections", "2"])
        let socketPath = try #require(fixture.server.socketPath)

        var first: RawNBDSocket? = try RawNBDSocket(unixSocket: socketPath, timeout: 5)
        let second = try RawNBDSocket(unixSocket: socketPath, timeout: 5)
        _ = try first?.readGreeting()
        _ = try second.readGreeting()

        // The third is accepted by the kernel but closed by the server without a greeting.
        let third = try RawNBDSocket(unixSocket: socketPath, timeout: 5)
        #expect(throws: (any Error).self) { try third.readGreeting() }

        // Closing one of the first two frees its slot.
        first = nil
        #expect(try RawNBDSocket.awaitGreeting(unixSocket: socketPath), "no greeting after a slot was freed")
        _ = second
        #expect(fixture.server.isRunning)
    }
}
