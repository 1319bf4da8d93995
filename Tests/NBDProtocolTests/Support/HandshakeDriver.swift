import NBDProtocol
import NIOCore

/// Drives a `HandshakeStateMachine` the way the connection handler does: append the
/// bytes that arrived, call `process` until it needs more data or ends negotiation.
struct HandshakeDriver {
    var machine = HandshakeStateMachine()
    let catalog: TestCatalog
    /// Bytes received and not yet consumed.
    var input = ByteBuffer()
    /// Every action `process` returned, in order.
    var actions: [HandshakeAction] = []
    /// The last non-`continueNegotiating` action.
    var outcome: HandshakeAction = .needMoreData
    var ended = false

    init(catalog: TestCatalog = .standard, offersStructuredReplies: Bool = true, tls: NBDTLSPolicy = .unavailable) {
        self.catalog = catalog
        machine = HandshakeStateMachine(offersStructuredReplies: offersStructuredReplies, tls: tls)
    }

    /// A driver that already sent client flags (fixed newstyle + no zeroes by default).
    static func negotiating(
        flags: UInt32 = 3, catalog: TestCatalog = .standard, offersStructuredReplies: Bool = true,
        tls: NBDTLSPolicy = .unavailable
    ) -> HandshakeDriver {
        var driver = HandshakeDriver(catalog: catalog, offersStructuredReplies: offersStructuredReplies, tls: tls)
        _ = driver.feed(Client.flags(flags))
        return driver
    }

    /// Feeds bytes and runs the machine; returns the bytes it wrote.
    @discardableResult
    mutating func feed(_ bytes: [UInt8]) -> [UInt8] {
        input.writeBytes(bytes)
        var output = ByteBuffer()
        var iterations = 0
        while !ended {
            iterations += 1
            precondition(iterations < 100_000, "handshake made no progress")
            let action = machine.process(&input, catalog: catalog, output: &output)
            actions.append(action)
            switch action {
            case .continueNegotiating:
                continue
            case .needMoreData:
                outcome = action
            case .abort, .enterTransmission, .close, .startTLS:
                outcome = action
                ended = true
            }
            break
        }
        return output.bytes
    }

    /// Completes a TLS handshake that `.startTLS` asked for, as the connection does once
    /// its TLS handler reports success: negotiation resumes.
    mutating func tlsEstablished() {
        machine.tlsEstablished()
        ended = false
        outcome = .needMoreData
    }

    /// Sends one option and parses the replies it produced.
    mutating func send(_ option: [UInt8]) throws -> [OptionReply] {
        try OptionReplyParser.parse(feed(option))
    }

    /// The session, if negotiation entered transmission.
    var session: NBDSession? {
        if case .enterTransmission(let session) = outcome { return session }
        return nil
    }
}
