/// `serve --tls`: whether the server offers TLS, and whether it insists on it.
public enum TLSMode: String, Sendable, CaseIterable {
    /// No TLS: `NBD_OPT_STARTTLS` is refused with `NBD_REP_ERR_POLICY`.
    case off
    /// TLS is offered; plaintext clients are still served.
    case on
    /// Nothing but STARTTLS and ABORT is answered before TLS is up.
    case require
}
