/// Why a connection ends, named after the event that ended it.
public enum ConnectionCloseReason: Equatable, Sendable, CustomStringConvertible {
    /// `NBD_OPT_ABORT`; its ACK is in the output.
    case clientAborted
    /// The handshake broke a rule that ends the connection (bad magic, unknown export for
    /// `NBD_OPT_EXPORT_NAME`, too many options, ...).
    case handshakeFailed(HandshakeFailure)
    /// No export was chosen before the handshake deadline.
    case handshakeTimedOut
    /// A request's framing was broken (bad magic, an undrainable payload): the stream
    /// cannot be trusted after it.
    case framingError(RequestFramingError)
    /// `NBD_CMD_DISC`, or the client shut its sending side; every reply before it is out.
    case clientDisconnected
    /// The server is stopping, and every reply in flight is out.
    case quiesced

    public var description: String {
        switch self {
        case .clientAborted: return "client aborted the handshake"
        case .handshakeFailed(let failure): return "handshake refused: \(failure)"
        case .handshakeTimedOut: return "handshake refused: no export chosen in time"
        case .framingError(let error): return "protocol violation: \(error)"
        case .clientDisconnected: return "client disconnected"
        case .quiesced: return "server stopping"
        }
    }
}
