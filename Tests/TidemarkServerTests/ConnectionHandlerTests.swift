import Dispatch
import NBDProtocol
import NIOCore
import NIOEmbedded
import Testing
@testable import TidemarkServer

@Suite("Connection handler in memory")
struct ConnectionHandlerTests {
    /// What the image holds at `offset` before any write: byte i is i % 251.
    static func original(at offset: Int, count: Int) -> [UInt8] {
        (offset..<(offset + count)).map { UInt8($0 % 251) }
    }

    @Test(
        "a handshake and requests cut into pieces of any size are decoded as sent",
        arguments: [[1], [3, 7, 1], [27, 29], [4095, 1, 4097], [100_000]])
    func framingAcrossReads(pieces: [Int]) async throws {
        let harness = try await ConnectionHarness()
        let payload = (0..<4096).map { UInt8(($0 * 7 + 3) % 256) }
        let stream =
            ClientBytes.handshake()
            + ClientBytes.request(.write, cookie: 1, offset: 8192, length: 4096, payload: payload)
            + ClientBytes.request(.read, cookie: 2, offset: 8192, length: 4096)
            + ClientBytes.request(.read, cookie: 3, offset: 100, length: 50)
            + ClientBytes.request(.disconnect, cookie: 4)
        try await harness.send(stream, pieces: pieces)
        // A read the page cache could not answer at once went to the pool: let it land.
        try await harness.settlePool()
        let bytes = try await harness.outbound()
        // Option replies first, then the transmission replies, in any order: a read that
        // went to the pool is answered after the ones that did not.
        let goEnd = try #require(Self.endOfOptionReplies(bytes))
        #expect(OptionReplies.endsWithAck(Array(bytes[..<goEnd]), option: NBDOption.go))
        let replies = try #require(SimpleReply.parse(Array(bytes[goEnd...]), readLengths: [2: 4096, 3: 50]))
            .sorted { $0.cookie < $1.cookie }
        try #require(replies.map(\.cookie) == [1, 2, 3])
        #expect(replies.allSatisfy { $0.error == 0 })
        #expect(replies[1].data == payload)
        #expect(replies[2].data == Self.original(at: 100, count: 50))
        // NBD_CMD_DISC with nothing in flight closes the connection.
        #expect(!harness.isActive)
        try await harness.shutdown()
    }

    @Test("a full socket stops request decoding; writability resumes it and every reply goes out")
    func backPressure() async throws {
        let harness = try await ConnectionHarness()
        try await harness.negotiate()
        try await harness.setWritable(false)
        let reads = (1...3).flatMap { ClientBytes.request(.read, cookie: UInt64($0), offset: UInt64($0) * 512, length: 512) }
        try await harness.send(reads)
        #expect(try await harness.outbound().isEmpty, "requests were executed while the client was not reading replies")
        try await harness.setWritable(true)
        try await harness.settlePool()
        // In any order: a read the page cache could not answer at once went to the pool.
        let replies = try #require(SimpleReply.parse(try await harness.outbound(), readLengths: [1: 512, 2: 512, 3: 512]))
            .sorted { $0.cookie < $1.cookie }
        try #require(replies.map(\.cookie) == [1, 2, 3])
        #expect(replies[2].data == Self.original(at: 1536, count: 512))
        #expect(harness.isActive)
        try await harness.shutdown()
    }

    @Test("a stop with a request in flight waits for its reply, executes nothing new, then closes")
    func quiesceWithRequestsInFlight() async throws {
        let harness = try await ConnectionHarness()
        try await harness.negotiate()
        let gate = harness.holdPool()
        // FLUSH always goes to the pool, held busy: it stays in flight.
        try await harness.send(ClientBytes.request(.flush, cookie: 1))
        #expect(try await harness.outbound().isEmpty)
        try await harness.quiesce()
        #expect(harness.isActive, "closed with the FLUSH still in flight")
        // A request arriving during the stop is not executed.
        try await harness.send(ClientBytes.request(.read, cookie: 3, length: 512))
        #expect(try await harness.outbound().isEmpty)
        gate.signal()
        try await harness.settlePool()
        let late = try #require(SimpleReply.parse(try await harness.outbound()))
        #expect(late == [SimpleReply(cookie: 1, error: 0, data: [])])
        #expect(!harness.isActive, "still open after the last reply of a stop")
        try await harness.shutdown()
    }

    @Test("a stop with nothing in flight closes at once; so does a stop during the handshake")
    func quiesceIdle() async throws {
        let idle = try await ConnectionHarness()
        try await idle.negotiate()
        try await idle.quiesce()
        #expect(!idle.isActive)
        try await idle.shutdown()

        let negotiating = try await ConnectionHarness()
        try await negotiating.send(ClientBytes.u32(3))
        try await negotiating.quiesce()
        #expect(!negotiating.isActive)
        try await negotiating.shutdown()
    }

    @Test("the handshake deadline closes a client that never chooses an export, and only such a client")
    func handshakeDeadline() async throws {
        let slow = try await ConnectionHarness()
        try await slow.send(ClientBytes.u32(3))
        await slow.loop.advanceTime(by: ConnectionHarness.handshakeTimeout - .milliseconds(1))
        #expect(slow.isActive, "closed before the deadline")
        await slow.loop.advanceTime(by: .milliseconds(2))
        #expect(!slow.isActive, "open past the deadline")
        try await slow.shutdown()

        let chosen = try await ConnectionHarness()
        try await chosen.negotiate()
        await chosen.loop.advanceTime(by: ConnectionHarness.handshakeTimeout + .seconds(1))
        #expect(chosen.isActive, "a connection in transmission was closed by the handshake deadline")
        try await chosen.send(ClientBytes.request(.read, cookie: 9, length: 512))
        try await chosen.settlePool()
        let replies = try #require(SimpleReply.parse(try await chosen.outbound(), readLengths: [9: 512]))
        #expect(replies.map(\.cookie) == [9])
        try await chosen.shutdown()
    }

    @Test("an invalid request gets its error at once and the connection goes on")
    func refusalInline() async throws {
        let harness = try await ConnectionHarness()
        try await harness.negotiate()
        // Past the end of the 1 MiB export: EINVAL; then a valid read.
        try await harness.send(
            ClientBytes.request(.read, cookie: 1, offset: 1 << 20, length: 512)
                + ClientBytes.request(.read, cookie: 2, length: 16))
        try await harness.settlePool()
        let replies = try #require(SimpleReply.parse(try await harness.outbound(), readLengths: [2: 16]))
        try #require(replies.map(\.cookie) == [1, 2])
        #expect(replies[0].error == NBDError.invalid.rawValue)
        #expect(replies[1].data == Self.original(at: 0, count: 16))
        try await harness.shutdown()
    }

    /// Where the option replies end: after the ACK of NBD_OPT_GO.
    static func endOfOptionReplies(_ bytes: [UInt8]) -> Int? {
        var index = 0
        while index + 20 <= bytes.count, Reader.u64(bytes, index) == 0x0003_e889_0455_65a9 {
            let option = Reader.u32(bytes, index + 8)
            let type = Reader.u32(bytes, index + 12)
            index += 20 + Int(Reader.u32(bytes, index + 16))
            if option == NBDOption.go && type == NBDOptionReply.ack { return index }
        }
        return nil
    }
}
