/// An option the handshake refused although the connection goes on: the client asked for
/// something this server will not give (an export it does not have, TLS it does not
/// offer). The connection handler logs these as refusals; option errors that are ordinary
/// negotiation (an unsupported option a client probes for) are not refusals.
public enum HandshakeRefusal: Equatable, Sendable, CustomStringConvertible {
    /// `NBD_OPT_INFO` or `NBD_OPT_GO` named an export that does not exist.
    case unknownExport(name: String, option: UInt32)
    /// `NBD_OPT_STARTTLS` on a server without TLS.
    case tlsNotConfigured
    /// An option other than STARTTLS or ABORT before TLS on a server that requires TLS.
    case tlsRequired(option: UInt32)

    /// The export the client asked for, if the refusal is about one.
    public var exportName: String? {
        if case .unknownExport(let name, _) = self { return name }
        return nil
    }

    public var description: String {
        switch self {
        case .unknownExport(let name, let option):
            return "\(NBDNames.option(option)) asked for unknown export '\(name)'"
        case .tlsNotConfigured:
            return "client asked for TLS (NBD_OPT_STARTTLS), which is not configured"
        case .tlsRequired(let option):
            return "client sent option \(option) before STARTTLS on a server that requires TLS"
        }
    }
}
