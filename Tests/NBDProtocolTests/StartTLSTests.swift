import NBDProtocol
import NIOCore
import Testing

@Suite("Handshake: STARTTLS, TLS required, nothing carried across STARTTLS")
struct StartTLSTests {
    /// Every option a client may send before STARTTLS, with a payload that would be valid.
    static let optionsBeforeTLS: [[UInt8]] = [
        Client.option(Wire.optList),
        Client.info("disk", [Wire.infoName, Wire.infoDescription]),
        Client.go("disk"),
        Client.structuredReply,
        Client.listMeta("bitmaps", []),
        Client.setMeta("bitmaps", ["qemu:dirty-bitmap:b0"]),
        Client.option(Wire.optExtendedHeaders),
        Client.option(Wire.optPeekExport),
        Client.option(0xdead_beef, [1, 2, 3]),
    ]

    @Test("with TLS offered, STARTTLS is ACKed and the machine asks for TLS")
    func startTLSAccepted() throws {
        var driver = HandshakeDriver.negotiating(tls: .offered)
        let replies = try driver.send(Client.option(Wire.optStartTLS))
        #expect(replies == [OptionReply(option: Wire.optStartTLS, type: Wire.repAck, data: [])])
        #expect(driver.outcome == .startTLS)
        #expect(!driver.machine.tlsActive)
    }

    @Test("bytes after STARTTLS in the same segment are left unparsed for TLS, even if they look like options")
    func bytesAfterStartTLSAreLeftForTLS() throws {
        var driver = HandshakeDriver.negotiating(tls: .offered)
        let clientHello: [UInt8] = [0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5]
        let injected = Client.structuredReply + Client.go("disk")
        let output = driver.feed(Client.option(Wire.optStartTLS) + injected + clientHello)
        #expect(try OptionReplyParser.parse(output).map(\.type) == [Wire.repAck])
        #expect(driver.outcome == .startTLS)
        #expect(driver.input.bytes == injected + clientHello)
        // Until TLS is up, the machine consumes nothing and writes nothing.
        var output2 = ByteBuffer()
        #expect(driver.machine.process(&driver.input, catalog: driver.catalog, output: &output2) == .needMoreData)
        #expect(driver.input.bytes == injected + clientHello)
        #expect(output2.readableBytes == 0)
    }

    @Test("structured replies negotiated before STARTTLS do not survive it (CVE-2021-3716)")
    func structuredRepliesReset() throws {
        var driver = HandshakeDriver.negotiating(tls: .offered)
        #expect(try driver.send(Client.structuredReply).map(\.type) == [Wire.repAck])
        _ = driver.feed(Client.option(Wire.optStartTLS))
        #expect(driver.outcome == .startTLS)
        driver.tlsEstablished()
        #expect(driver.machine.tlsActive)
        _ = driver.feed(Client.go("disk"))
        let session = try #require(driver.session)
        #expect(session.structuredReplies == false)
        #expect(!session.transmissionFlags.contains(.sendDF))  // DF needs structured replies
    }

    @Test("after STARTTLS structured replies can be negotiated anew (not 'already negotiated')")
    func structuredRepliesNegotiableAfterTLS() throws {
        var driver = HandshakeDriver.negotiating(tls: .offered)
        _ = try driver.send(Client.structuredReply)
        _ = driver.feed(Client.option(Wire.optStartTLS))
        driver.tlsEstablished()
        #expect(try driver.send(Client.structuredReply).map(\.type) == [Wire.repAck])
        _ = driver.feed(Client.go("disk"))
        #expect(driver.session?.structuredReplies == true)
    }

    @Test("extended headers negotiated before STARTTLS do not survive it")
    func extendedHeadersReset() throws {
        var driver = HandshakeDriver.negotiating(tls: .offered)
        #expect(try driver.send(Client.option(Wire.optExtendedHeaders)).map(\.type) == [Wire.repAck])
        _ = driver.feed(Client.option(Wire.optStartTLS))
        #expect(driver.outcome == .startTLS)
        driver.tlsEstablished()
        _ = driver.feed(Client.go("disk"))
        let session = try #require(driver.session)
        #expect(session.framing == .compact)
        #expect(session.structuredReplies == false)
    }

    @Test("meta contexts selected before STARTTLS do not survive it")
    func metaContextsReset() throws {
        var driver = HandshakeDriver.negotiating(tls: .offered)
        _ = try driver.send(Client.structuredReply)
        let selected = try driver.send(Client.setMeta("bitmaps", ["qemu:dirty-bitmap:b0"]))
        #expect(selected.map(\.type) == [Wire.repMetaContext, Wire.repAck])
        _ = driver.feed(Client.option(Wire.optStartTLS))
        driver.tlsEstablished()
        _ = try driver.send(Client.structuredReply)
        _ = driver.feed(Client.go("bitmaps"))
        let session = try #require(driver.session)
        #expect(session.structuredReplies)
        #expect(session.metaContexts.isEmpty)
    }

    @Test("a second STARTTLS inside TLS gets ERR_INVALID and negotiation goes on")
    func secondStartTLS() throws {
        var driver = HandshakeDriver.negotiating(tls: .required)
        _ = driver.feed(Client.option(Wire.optStartTLS))
        driver.tlsEstablished()
        let again = try driver.send(Client.option(Wire.optStartTLS))
        #expect(again.map(\.type) == [Wire.errInvalid])
        #expect(driver.outcome == .needMoreData)
        #expect(try driver.send(Client.option(Wire.optList)).last?.type == Wire.repAck)
    }

    @Test("STARTTLS with data gets ERR_INVALID and does not start TLS", arguments: [NBDTLSPolicy.offered, .required])
    func startTLSWithData(policy: NBDTLSPolicy) throws {
        var driver = HandshakeDriver.negotiating(tls: policy)
        let replies = try driver.send(Client.option(Wire.optStartTLS, [0]))
        #expect(replies.map(\.type) == [Wire.errInvalid])
        #expect(driver.outcome == .needMoreData)
        #expect(!driver.actions.contains(.startTLS))
    }

    @Test("with TLS offered, a plaintext client is served without STARTTLS")
    func offeredServesPlaintext() throws {
        var driver = HandshakeDriver.negotiating(tls: .offered)
        let list = try driver.send(Client.option(Wire.optList))
        #expect(list.map(\.type) == [Wire.repServer, Wire.repServer, Wire.repServer, Wire.repAck])
        _ = driver.feed(Client.go("disk"))
        #expect(driver.session?.exportName == "disk")
    }

    @Test("with TLS required, every option but STARTTLS and ABORT gets ERR_TLS_REQD and leaks nothing",
          arguments: optionsBeforeTLS)
    func requiredRefusesBeforeTLS(option: [UInt8]) throws {
        var driver = HandshakeDriver.negotiating(tls: .required)
        let output = driver.feed(option)
        let replies = try OptionReplyParser.parse(output)
        #expect(replies.count == 1)
        #expect(replies.first?.type == Wire.errTLSRequired)
        #expect(driver.outcome == .needMoreData)
        // No export name, description or size in the bytes sent.
        for secret in ["disk", "bitmaps", "the main disk", "qemu:dirty-bitmap"] {
            #expect(!output.containsSubsequence(Array(secret.utf8)), "leaked '\(secret)'")
        }
        if case .tlsRequired = driver.machine.takeRefusal() {} else { Issue.record("no refusal reported") }
    }

    @Test("with TLS required, EXPORT_NAME before STARTTLS closes the connection without a reply")
    func requiredExportNameCloses() {
        var driver = HandshakeDriver.negotiating(tls: .required)
        let output = driver.feed(Client.option(Wire.optExportName, Array("disk".utf8)))
        #expect(driver.outcome == .close(.exportNameBeforeTLS))
        #expect(output.isEmpty)
    }

    @Test("with TLS required, a non-fixed-newstyle client's EXPORT_NAME closes the connection")
    func requiredOldStyleClientCloses() {
        var driver = HandshakeDriver.negotiating(flags: 0, tls: .required)
        let output = driver.feed(Client.option(Wire.optExportName, Array("disk".utf8)))
        #expect(driver.outcome == .close(.exportNameBeforeTLS))
        #expect(output.isEmpty)
    }

    @Test("with TLS required, ABORT before STARTTLS is ACKed")
    func requiredAbort() throws {
        var driver = HandshakeDriver.negotiating(tls: .required)
        #expect(try driver.send(Client.option(Wire.optAbort)).map(\.type) == [Wire.repAck])
        #expect(driver.outcome == .abort)
    }

    @Test("with TLS required, options refused before STARTTLS are honoured after it")
    func requiredServesAfterTLS() throws {
        var driver = HandshakeDriver.negotiating(tls: .required)
        #expect(try driver.send(Client.structuredReply).map(\.type) == [Wire.errTLSRequired])
        _ = driver.feed(Client.option(Wire.optStartTLS))
        #expect(driver.outcome == .startTLS)
        driver.tlsEstablished()
        let list = try driver.send(Client.option(Wire.optList))
        #expect(list.map(\.type) == [Wire.repServer, Wire.repServer, Wire.repServer, Wire.repAck])
        #expect(try driver.send(Client.structuredReply).map(\.type) == [Wire.repAck])
        _ = driver.feed(Client.go("disk"))
        #expect(driver.session?.structuredReplies == true)
    }

    @Test("tlsEstablished without a STARTTLS does nothing")
    func tlsEstablishedWithoutStartTLS() throws {
        var driver = HandshakeDriver.negotiating(tls: .required)
        driver.machine.tlsEstablished()
        #expect(!driver.machine.tlsActive)
        #expect(try driver.send(Client.option(Wire.optList)).map(\.type) == [Wire.errTLSRequired])
    }
}

extension Array where Element == UInt8 {
    func containsSubsequence(_ needle: [UInt8]) -> Bool {
        guard !needle.isEmpty, count >= needle.count else { return needle.isEmpty }
        for start in 0...(count - needle.count) where self[start..<(start + needle.count)].elementsEqual(needle) {
            return true
        }
        return false
    }
}

@Suite("NBDServerConnection: STARTTLS as a connection action")
struct ConnectionStartTLSTests {
    @Test("STARTTLS is an action; the bytes after it stay in the input; nothing is decoded until TLS is established")
    func startTLSAction() throws {
        var connection = NBDServerConnection(configuration: .init(tls: .required))
        var output = ByteBuffer()
        let clientHello: [UInt8] = [0x16, 0x03, 0x01, 0x02, 0x00]
        var input = ByteBuffer(
            bytes: Client.flags(3) + Client.structuredReply + Client.option(Wire.optStartTLS) + Client.go("disk") + clientHello)
        var actions: [String] = []
        stepping: while true {
            let action = connection.next(&input, catalog: TestCatalog.standard, output: &output)
            actions.append("\(action)")
            switch action {
            case .continueNegotiating, .optionRefused: continue
            default: break stepping
            }
        }
        #expect(actions.last == "startTLS")
        #expect(input.bytes == Client.go("disk") + clientHello)
        let replies = try OptionReplyParser.parse(output.bytes)
        #expect(replies.map(\.type) == [Wire.errTLSRequired, Wire.repAck])
        output.clear()
        var pending = input
        #expect("\(connection.next(&pending, catalog: TestCatalog.standard, output: &output))" == "needMoreData")
        #expect(pending.readableBytes == input.readableBytes && output.readableBytes == 0)
        #expect(connection.isNegotiating)

        connection.tlsEstablished()
        #expect(connection.tlsActive)
        var encrypted = ByteBuffer(bytes: Client.go("disk"))
        var last = connection.next(&encrypted, catalog: TestCatalog.standard, output: &output)
        for _ in 0..<10 {
            guard case .continueNegotiating = last else { break }
            last = connection.next(&encrypted, catalog: TestCatalog.standard, output: &output)
        }
        guard case .enterTransmission(let session) = last else {
            Issue.record("expected transmission, got \(last)")
            return
        }
        #expect(session.structuredReplies == false)
    }

    @Test("the handshake deadline covers a TLS handshake that never finishes")
    func deadlineCoversTLS() {
        var connection = NBDServerConnection(configuration: .init(tls: .offered))
        var output = ByteBuffer()
        var input = ByteBuffer(bytes: Client.flags(3) + Client.option(Wire.optStartTLS))
        _ = connection.next(&input, catalog: TestCatalog.standard, output: &output)
        #expect("\(connection.next(&input, catalog: TestCatalog.standard, output: &output))" == "startTLS")
        #expect(connection.handshakeDeadlinePassed() == .handshakeTimedOut)
        #expect(connection.isClosed)
    }
}
