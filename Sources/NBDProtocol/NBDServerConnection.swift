import NIOCore

/// One server connection's protocol, from greeting to close, sans IO.
///
/// It composes the handshake machine, the request decoder and the transmission machine,
/// and takes the connection's other events — a request's reply queued, a server stop, the
/// handshake deadline — so every decision about the connection's life is made here, in
/// memory, where tests can pump it byte by byte. The NIO handler only moves bytes: it
/// feeds input to ``next(_:catalog:output:)`` and carries out the ``ConnectionAction``
/// each step returns, the shape of `NIOSSHHandler` driving its connection state machine.
///
/// Room for what comes next is left in the types: a second request/reply framing
/// (extended headers) is a property of the session the decoder and encoders read, and
/// STARTTLS is one more ``ConnectionAction`` (swap the transport, then step again).
///
/// A class, not a value: the handler asks it several questions per request, and a large
/// value held by the handler would be copied (with its strings and arrays retained) for
/// each question asked across the module boundary. It is confined to the connection's
/// event loop like the handler that owns it.
public final class NBDServerConnection {
    /// Limits and offers fixed for the connection's life.
    public struct Configuration: Sendable {
        /// False answers `NBD_OPT_STRUCTURED_REPLY` with an error, as an old server would.
        public var offersStructuredReplies: Bool
        /// False answers `NBD_OPT_EXTENDED_HEADERS` with an error, as a server without them.
        public var offersExtendedHeaders: Bool
        /// Requests in flight at which reading pauses.
        public var maximumInFlight: Int
        /// READ and WRITE bytes in flight at which reading pauses.
        public var maximumBytesInFlight: UInt64
        /// Whether STARTTLS is accepted, and whether anything else is answered before it.
        public var tls: NBDTLSPolicy

        public init(
            offersStructuredReplies: Bool = true, offersExtendedHeaders: Bool = true, maximumInFlight: Int = 128,
            maximumBytesInFlight: UInt64 = 32 << 20, tls: NBDTLSPolicy = .unavailable
        ) {
            self.offersStructuredReplies = offersStructuredReplies
            self.offersExtendedHeaders = offersExtendedHeaders
            self.maximumInFlight = maximumInFlight
            self.maximumBytesInFlight = maximumBytesInFlight
            self.tls = tls
        }
    }

    /// What to do once a request's reply is queued.
    public enum CompletionAction: Equatable, Sendable {
        case none
        /// The in-flight limits were left: read again.
        case resumeReading
        /// The last reply a disconnect or a stop waited for is out: close.
        case close(ConnectionCloseReason)
    }

    private enum Phase {
        case handshake
        case transmission
        case closed
    }

    private var phase = Phase.handshake
    private var handshake: HandshakeStateMachine
    /// Set on entering transmission; mutated in place through optional chaining so the
    /// per-request path copies nothing.
    private var transmission: TransmissionStateMachine?
    private var decoder = NBDRequestDecoder()
    private let configuration: Configuration
    /// A stop was asked for: no new request is decoded, and the connection closes once
    /// nothing is in flight.
    public private(set) var isQuiescing = false
    /// The client shut its sending side and every request it sent was decoded: the
    /// connection closes once nothing is in flight.
    public private(set) var inputHasEnded = false

    public init(configuration: Configuration = Configuration()) {
        self.configuration = configuration
        self.handshake = HandshakeStateMachine(
            offersStructuredReplies: configuration.offersStructuredReplies,
            offersExtendedHeaders: configuration.offersExtendedHeaders, tls: configuration.tls)
    }

    /// Whether the connection runs over TLS (STARTTLS, then ``tlsEstablished()``).
    public var tlsActive: Bool { handshake.tlsActive }

    /// The TLS handshake that ``ConnectionAction/startTLS`` asked for is done and the
    /// client was accepted: negotiation resumes inside TLS, with nothing kept from before.
    public func tlsEstablished() {
        handshake.tlsEstablished()
    }

    // MARK: - State

    /// The negotiated session, once in transmission.
    public var session: NBDSession? { transmission?.session }
    /// True until an export is chosen (or the connection ends first).
    public var isNegotiating: Bool { phase == .handshake }
    /// True from the export's choice until the connection ends.
    public var isInTransmission: Bool { phase == .transmission }
    public var isClosed: Bool { phase == .closed }
    /// Requests whose replies are not yet queued.
    public var inFlight: Int { transmission?.inFlight ?? 0 }

    /// True while the server, not the client, keeps the next request out: requests in
    /// flight at the limit, a disconnect being drained, a stop.
    public var isHoldingInput: Bool {
        // Read through the optional in place: binding it would copy the session.
        phase == .transmission && (isQuiescing || inputHasEnded || transmission?.shouldPauseReading == true)
    }

    /// Bytes still to come before the request at the front of `input` is complete (see
    /// ``NBDRequestDecoder/bytesMissing(in:)``); nil outside transmission or while an
    /// oversized payload is drained.
    public func bytesMissing(in input: ByteBuffer) -> Int? {
        phase == .transmission ? decoder.bytesMissing(in: input) : nil
    }

    /// True while a request is partly received even if `input` is empty: a WRITE's
    /// header waits for its payload, or an oversized payload is being drained.
    public var isWithinRequest: Bool { phase == .transmission && decoder.isWithinRequest }

    /// The size of the request at the front of `input` when it is a WRITE whose payload
    /// will be kept (its payload alone once the header was taken), so its buffer can be
    /// allocated once (see ``NBDRequestDecoder/bytesNeeded(in:)``).
    public func bytesNeeded(in input: ByteBuffer) -> Int? {
        phase == .transmission ? decoder.bytesNeeded(in: input) : nil
    }

    // MARK: - Input

    /// The 18 bytes the server sends as soon as a client connects.
    public func writeGreeting(into output: inout ByteBuffer) {
        handshake.writeGreeting(into: &output)
    }

    /// Consumes at most one message from `input`, writing any reply the protocol itself
    /// makes into `output`, and says what the handler must do.
    public func next(
        _ input: inout ByteBuffer, catalog: some NBDExportCatalog, output: inout ByteBuffer
    ) -> ConnectionAction {
        switch phase {
        case .closed:
            return .needMoreData
        case .handshake:
            return negotiate(&input, catalog: catalog, output: &output)
        case .transmission:
            return nextRequest(&input, output: &output)
        }
    }

    private func negotiate(
        _ input: inout ByteBuffer, catalog: some NBDExportCatalog, output: inout ByteBuffer
    ) -> ConnectionAction {
        let action = handshake.process(&input, catalog: catalog, output: &output)
        let refusal = handshake.takeRefusal()
        switch action {
        case .needMoreData:
            return .needMoreData
        case .continueNegotiating:
            if let refusal { return .optionRefused(refusal) }
            return .continueNegotiating
        case .abort:
            phase = .closed
            return .close(.clientAborted)
        case .close(let failure):
            phase = .closed
            return .close(.handshakeFailed(failure))
        case .startTLS:
            return .startTLS
        case .enterTransmission(let session):
            phase = .transmission
            decoder = NBDRequestDecoder(framing: session.framing)
            transmission = TransmissionStateMachine(
                session: session, maximumInFlight: configuration.maximumInFlight,
                maximumBytesInFlight: configuration.maximumBytesInFlight)
            return .enterTransmission(session)
        }
    }

    private func nextRequest(_ input: inout ByteBuffer, output: inout ByteBuffer) -> ConnectionAction {
        guard !isHoldingInput else { return .pauseReading }
        switch decoder.decode(&input) {
        case .needMoreData:
            return .needMoreData
        case .protocolViolation(let error):
            phase = .closed
            return .close(.framingError(error))
        case .request(let request):
            guard let disposition = transmission?.received(request) else { return .needMoreData }
            switch disposition {
            case .execute(let cookie, let command):
                return .execute(cookie: cookie, command: command, cost: TransmissionStateMachine.cost(of: disposition))
            case .reject(let cookie, let command, let error, let message):
                NBDReplyEncoder.writeError(
                    cookie: cookie, command: command, error: error, message: message,
                    structured: transmission?.session.structuredReplies ?? false,
                    framing: transmission?.session.framing ?? .compact, requestOffset: request.offset, into: &output)
                return .refused(cookie: cookie, command: command, error: error, message: message)
            case .disconnect:
                if inFlight == 0 {
                    phase = .closed
                    return .close(.clientDisconnected)
                }
                return .pauseReading
            }
        }
    }

    // MARK: - Events

    /// A request's reply is queued; `cost` is what its ``ConnectionAction/execute(cookie:command:cost:)`` said.
    public func requestCompleted(cost: UInt64) -> CompletionAction {
        guard phase == .transmission, let action = transmission?.completed(cost: cost) else { return .none }
        switch action {
        case .close:
            phase = .closed
            return .close(.clientDisconnected)
        case .none, .resumeReading:
            if (isQuiescing || inputHasEnded) && inFlight == 0 {
                phase = .closed
                return .close(isQuiescing ? .quiesced : .clientDisconnected)
            }
            return action == .resumeReading ? .resumeReading : .none
        }
    }

    /// The server is stopping. Returns the reason to close now, or nil while replies are
    /// still in flight (the last ``requestCompleted(cost:)`` then says close).
    public func quiesce() -> ConnectionCloseReason? {
        isQuiescing = true
        switch phase {
        case .closed:
            return nil
        case .handshake:
            phase = .closed
            return .quiesced
        case .transmission:
            guard inFlight == 0 else { return nil }
            phase = .closed
            return .quiesced
        }
    }

    /// The client shut its sending side (libnbd does right after `NBD_CMD_DISC`, with a TLS
    /// close_notify first) and every request it sent before was decoded: the replies of
    /// those in flight must still reach it. Returns the reason to close now, or nil while
    /// replies are in flight (the last ``requestCompleted(cost:)`` then says close).
    public func inputEnded() -> ConnectionCloseReason? {
        switch phase {
        case .closed:
            return nil
        case .handshake:
            phase = .closed
            return .clientDisconnected
        case .transmission:
            inputHasEnded = true
            guard inFlight == 0 else { return nil }
            phase = .closed
            return .clientDisconnected
        }
    }

    /// The handshake deadline passed. Returns the reason to close when no export was
    /// chosen by then; nil when the connection is past negotiation.
    public func handshakeDeadlinePassed() -> ConnectionCloseReason? {
        guard phase == .handshake else { return nil }
        phase = .closed
        return .handshakeTimedOut
    }

    /// The connection ended for a reason outside the protocol (socket error, export
    /// removed, server fault): nothing more is decoded.
    public func connectionEnded() {
        phase = .closed
    }
}
