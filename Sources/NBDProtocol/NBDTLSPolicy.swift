/// What the handshake does about TLS (`serve --tls off|on|require`).
public enum NBDTLSPolicy: Sendable, Equatable {
    /// No TLS configured: `NBD_OPT_STARTTLS` gets `NBD_REP_ERR_POLICY`.
    case unavailable
    /// STARTTLS is accepted; plaintext clients are served too.
    case offered
    /// Before TLS, every option but STARTTLS and ABORT gets `NBD_REP_ERR_TLS_REQD` and
    /// `NBD_OPT_EXPORT_NAME` closes the connection, so nothing about the exports leaks.
    case required
}
