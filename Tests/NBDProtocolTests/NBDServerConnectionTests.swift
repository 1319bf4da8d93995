import NBDProtocol
import NIOCore
import Testing

/// Drives ``NBDServerConnection`` to transmission on "disk" with structured replies and
/// both of its contexts selected.
struct ConnectionDriver {
    let connection: NBDServerConnection
    var output = ByteBuffer()

    init(configuration: NBDServerConnection.Configuration = .init()) {
        connection = NBDServerConnection(configuration: configuration)
    }

    /// Feeds `bytes` and steps until the machine needs more; returns every action.
    mutating func feed(_ bytes: [UInt8]) -> [ConnectionAction] {
        var input = ByteBuffer(bytes: bytes)
        var actions: [ConnectionAction] = []
        while true {
            let action = connection.next(&input, catalog: TestCatalog.standard, output: &output)
            actions.append(action)
            switch action {
            case .needMoreData, .pauseReading, .close, .startTLS: return actions
            case .continueNegotiating, .optionRefused, .enterTransmission, .execute, .refused: continue
            }
        }
    }

    static func inTransmission(configuration: NBDServerConnection.Configuration = .init()) -> ConnectionDriver {
        var driver = ConnectionDriver(configuration: configuration)
        _ = driver.feed(
            Client.flags(3) + Client.structuredReply + Client.setMeta("disk", ["base:allocation", "qemu:dirty-bitmap:b0"])
                + Client.go("disk"))
        driver.output.clear()
        return driver
    }
}

@Suite("NBDServerConnection")
struct NBDServerConnectionTests {
    static func read(_ cookie: UInt64, length: UInt32 = 512) -> [UInt8] {
        Client.request(type: Wire.cmdRead, cookie: cookie, length: length)
    }

    @Test("negotiation ends in transmission with the contexts resolved once, by kind")
    func contextsResolvedAtSelection() throws {
        let driver = ConnectionDriver.inTransmission()
        let session = try #require(driver.connection.session)
        #expect(session.metaContexts.map(\.kind) == [.baseAllocation, .dirtyBitmap("b0")])
        #expect(!driver.connection.isNegotiating)
    }

    @Test("an executed request is in flight until its completion; a refused one never is")
    func inFlightAccounting() {
        var driver = ConnectionDriver.inTransmission()
        let actions = driver.feed(Self.read(1) + Client.request(type: 99, cookie: 2))
        guard case .execute(1, .read(0, 512, false), 512) = actions[0] else {
            Issue.record("first action \(actions[0])"); return
        }
        guard case .refused(2, 99, .invalid, _) = actions[1] else { Issue.record("second action \(actions[1])"); return }
        // The refusal's error chunk is in the output, written by the machine.
        #expect(driver.output.readableBytes > 0)
        #expect(driver.connection.inFlight == 1)
        #expect(driver.connection.requestCompleted(cost: 512) == .none)
        #expect(driver.connection.inFlight == 0)
    }

    @Test("DISC with requests in flight pauses; the last completion closes as disconnected")
    func disconnectDrains() {
        var driver = ConnectionDriver.inTransmission()
        let actions = driver.feed(Self.read(1) + Self.read(2) + Client.request(type: Wire.cmdDisc))
        guard case .pauseReading = actions.last else { Issue.record("last action \(String(describing: actions.last))"); return }
        #expect(driver.connection.isHoldingInput)
        #expect(driver.connection.requestCompleted(cost: 512) == .none)
        #expect(driver.connection.requestCompleted(cost: 512) == .close(.clientDisconnected))
        #expect(driver.connection.isClosed)
    }

    @Test("DISC with nothing in flight closes at once")
    func disconnectIdle() {
        var driver = ConnectionDriver.inTransmission()
        let actions = driver.feed(Client.request(type: Wire.cmdDisc))
        guard case .close(.clientDisconnected) = actions.last else { Issue.record("\(actions)"); return }
    }

    @Test("a stop holds new requests, waits for those in flight, then closes as quiesced")
    func quiesce() {
        var driver = ConnectionDriver.inTransmission()
        _ = driver.feed(Self.read(1))
        #expect(driver.connection.quiesce() == nil)
        let actions = driver.feed(Self.read(2))
        guard case .pauseReading = actions.last else { Issue.record("\(actions)"); return }
        #expect(actions.count == 1, "a request was decoded during a stop")
        #expect(driver.connection.requestCompleted(cost: 512) == .close(.quiesced))
        #expect(driver.connection.isClosed)
    }

    @Test("the client's input ended: requests in flight are answered, then it closes as disconnected")
    func inputEndedDrains() {
        var driver = ConnectionDriver.inTransmission()
        _ = driver.feed(Self.read(1) + Self.read(2))
        #expect(driver.connection.inputEnded() == nil)
        #expect(driver.connection.isHoldingInput)
        #expect(driver.connection.requestCompleted(cost: 512) == .none)
        #expect(!driver.connection.isClosed)
        #expect(driver.connection.requestCompleted(cost: 512) == .close(.clientDisconnected))
        #expect(driver.connection.isClosed)
    }

    @Test("the client's input ended with nothing in flight, or during negotiation: it closes at once")
    func inputEndedIdle() {
        let idle = ConnectionDriver.inTransmission()
        #expect(idle.connection.inputEnded() == .clientDisconnected)
        #expect(idle.connection.isClosed)
        #expect(idle.connection.inputEnded() == nil, "closed once")
        var negotiating = ConnectionDriver()
        _ = negotiating.feed(Client.flags(3))
        #expect(negotiating.connection.inputEnded() == .clientDisconnected)
        #expect(negotiating.connection.isClosed)
    }

    @Test("a stop during negotiation closes at once")
    func quiesceNegotiating() {
        var driver = ConnectionDriver()
        _ = driver.feed(Client.flags(3))
        #expect(driver.connection.quiesce() == .quiesced)
        #expect(driver.connection.isClosed)
    }

    @Test("the handshake deadline ends negotiation, and nothing after it")
    func handshakeDeadline() {
        var negotiating = ConnectionDriver()
        _ = negotiating.feed(Client.flags(3))
        #expect(negotiating.connection.handshakeDeadlinePassed() == .handshakeTimedOut)
        #expect(negotiating.connection.isClosed)
        let transmitting = ConnectionDriver.inTransmission()
        #expect(transmitting.connection.handshakeDeadlinePassed() == nil)
        #expect(!transmitting.connection.isClosed)
    }

    @Test("the in-flight limit pauses decoding and the completion that leaves it resumes")
    func inFlightLimit() {
        var driver = ConnectionDriver.inTransmission(configuration: .init(maximumInFlight: 2))
        let actions = driver.feed(Self.read(1) + Self.read(2) + Self.read(3))
        #expect(actions.count == 3)
        guard case .pauseReading = actions.last else { Issue.record("\(actions)"); return }
        #expect(driver.connection.requestCompleted(cost: 512) == .none)
        #expect(driver.connection.requestCompleted(cost: 512) == .resumeReading)
        #expect(!driver.connection.isHoldingInput)
    }

    @Test("a framing error closes with the error; ABORT closes as aborted after its ACK")
    func closes() {
        var driver = ConnectionDriver.inTransmission()
        let actions = driver.feed(Client.request(type: Wire.cmdRead, magic: 0xDEAD_BEEF))
        guard case .close(.framingError(.badMagic(0xDEAD_BEEF))) = actions.last else { Issue.record("\(actions)"); return }

        var aborting = ConnectionDriver()
        let abort = aborting.feed(Client.flags(3) + Client.option(Wire.optAbort))
        guard case .close(.clientAborted) = abort.last else { Issue.record("\(abort)"); return }
        #expect(aborting.output.readableBytes == 20)
    }

    @Test("an unknown export in GO is a logged refusal and negotiation goes on")
    func optionRefused() {
        var driver = ConnectionDriver()
        let actions = driver.feed(Client.flags(3) + Client.go("nope"))
        guard case .optionRefused(.unknownExport("nope", _)) = actions[1] else { Issue.record("\(actions)"); return }
        #expect(driver.connection.isNegotiating)
    }
}

@Suite("NBD rules moved out of the server")
struct ProtocolRulesTests {
    @Test("context names resolve to kinds")
    func contextKinds() {
        #expect(NBDMetaContextKind(contextName: "base:allocation") == .baseAllocation)
        #expect(NBDMetaContextKind(contextName: "qemu:dirty-bitmap:b0") == .dirtyBitmap("b0"))
        #expect(NBDMetaContextKind(contextName: "qemu:dirty-bitmap:") == .dirtyBitmap(""))
        #expect(NBDMetaContextKind(contextName: "qemu:allocation-depth") == .unrecognized)
        #expect(NBDMetaContextKind.dirtyBitmapContext("x") == "qemu:dirty-bitmap:x")
    }

    @Test("errno values map as nbdkit and qemu-nbd map them")
    func errnoMapping() {
        #expect(NBDError(errno: 30) == .permission)  // EROFS
        #expect(NBDError(errno: 1) == .permission)  // EPERM
        #expect(NBDError(errno: 5) == .io)
        #expect(NBDError(errno: 12) == .noMemory)
        #expect(NBDError(errno: 28) == .noSpace)  // ENOSPC
        #expect(NBDError(errno: 122) == .noSpace)  // EDQUOT
        #expect(NBDError(errno: 27) == .noSpace)  // EFBIG
        #expect(NBDError(errno: 108) == .shutdown)
        #expect(NBDError(errno: 2) == .invalid)  // ENOENT: anything else
        #expect(NBDError.unsupported(by: .writeZeroes) == .notSupported)
        #expect(NBDError.unsupported(by: .trim) == .invalid)
    }

    /// Replies written by ``NBDReadReply`` with data bytes all 0xAB.
    static func reply(structured: Bool, length: UInt32, runs: [(length: UInt64, isHole: Bool)]?) -> [UInt8] {
        var buffer = ByteBuffer()
        let reply = NBDReadReply(cookie: 7, offset: 4096, length: length, structured: structured)
        let done = reply.write(runs: runs, into: &buffer) { buffer, count, _ in
            buffer.writeRepeatingByte(0xAB, count: count)
            return true
        }
        #expect(done)
        return Array(buffer.readableBytesView)
    }

    @Test("a READ reply is simple without structured replies, holes or not")
    func simpleRead() {
        let bytes = Self.reply(structured: false, length: 8, runs: [(4, true), (4, false)])
        #expect(bytes.count == 16 + 8)
        #expect(Array(bytes[0..<4]) == [0x67, 0x44, 0x66, 0x98])
        #expect(bytes[16...].allSatisfy { $0 == 0xAB })
    }

    @Test("a READ reply with holes is OFFSET_DATA and OFFSET_HOLE chunks, DONE on the last")
    func sparseRead() throws {
        let bytes = Self.reply(structured: true, length: 12, runs: [(4, false), (4, true), (100, false)])
        let chunks = try #require(Chunk.parseAll(bytes))
        #expect(chunks.map(\.type) == [1, 2, 1])
        #expect(chunks.map(\.done) == [false, false, true])
        #expect(chunks[1].payload == [0, 0, 0, 0, 0, 0, 0x10, 0x04, 0, 0, 0, 4])  // offset 4100, length 4
    }

    @Test("a READ reply without holes is one OFFSET_DATA chunk; a zero-length one is a NONE chunk")
    func denseRead() throws {
        let dense = try #require(Chunk.parseAll(Self.reply(structured: true, length: 8, runs: [(8, false)])))
        #expect(dense.map(\.type) == [1])
        #expect(dense[0].done)
        let empty = try #require(Chunk.parseAll(Self.reply(structured: true, length: 0, runs: nil)))
        #expect(empty.map(\.type) == [0])
    }

    @Test("a data source that stops makes the write report failure")
    func stoppedRead() {
        var buffer = ByteBuffer()
        let reply = NBDReadReply(cookie: 7, offset: 0, length: 8, structured: true)
        let runs: [(length: UInt64, isHole: Bool)]? = nil
        #expect(!reply.write(runs: runs, into: &buffer) { _, _, _ in false })
    }
}

extension Chunk {
    var done: Bool { flags & 1 != 0 }

    /// Splits a run of chunks; nil if the bytes are not whole well-formed chunks.
    static func parseAll(_ bytes: [UInt8]) -> [Chunk]? {
        var chunks: [Chunk] = []
        var index = 0
        while index < bytes.count {
            guard index + 20 <= bytes.count else { return nil }
            let length = bytes[(index + 16)..<(index + 20)].reduce(0) { $0 << 8 | Int($1) }
            guard index + 20 + length <= bytes.count, let chunk = parse(Array(bytes[index..<(index + 20 + length)]))
            else { return nil }
            chunks.append(chunk)
            index += 20 + length
        }
        return chunks
    }
}
