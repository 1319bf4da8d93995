import NIOCore

/// What the connection handler must do after one step of ``NBDServerConnection``.
///
/// Each step consumes at most one message (client flags, one option, one request).
/// Replies the machine produces itself (option replies, refusals of invalid requests)
/// are already in the output buffer; the handler only has to send them.
public enum ConnectionAction {
    /// Nothing more can be decoded from the input: read from the socket.
    case needMoreData
    /// The server holds the input (requests in flight at the limit, a disconnect or a
    /// stop under way): read nothing until a completion resumes it.
    case pauseReading
    /// The client flags or one option were handled; step again.
    case continueNegotiating
    /// An option was refused for a reason worth a log line (its error reply is in the
    /// output); the connection goes on: step again.
    case optionRefused(HandshakeRefusal)
    /// Negotiation is over: the export is chosen. The handler attaches it and steps again.
    case enterTransmission(NBDSession)
    /// Run the command and write its reply with `cookie`; report ``NBDServerConnection/requestCompleted(cost:)``
    /// with `cost` once the reply is queued.
    case execute(cookie: UInt64, command: NBDCommand, cost: UInt64)
    /// The request was invalid; its error reply is in the output. Nothing is in flight.
    case refused(cookie: UInt64, command: UInt16, error: NBDError, message: String)
    /// Send what the output holds, then close.
    case close(ConnectionCloseReason)
    /// `NBD_OPT_STARTTLS` was accepted; its ACK is in the output. Send and flush it in
    /// plaintext, then put TLS in front of the connection and give it the bytes left in
    /// the input (the start of the client's ClientHello, never NBD options). Nothing is
    /// decoded until ``NBDServerConnection/tlsEstablished()``.
    case startTLS
}
