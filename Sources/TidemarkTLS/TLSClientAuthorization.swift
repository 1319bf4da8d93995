/// The verdict on a client after its TLS handshake.
public enum TLSClientAuthorization: Equatable, Sendable {
    /// Go on; `identity` is the certificate subject when one was checked.
    case allowed(identity: String?)
    /// Close the connection and log the reason, which names the client.
    case refused(TLSClientRefusal)
}

/// Why a client that completed (or attempted) a TLS handshake was turned away.
public enum TLSClientRefusal: Error, Equatable, Sendable, CustomStringConvertible {
    /// `--tls-verify-peer` and the client presented no certificate.
    case noCertificate
    /// The certificate subject is not among `--tls-allow`.
    case notAllowed(identity: String)
    /// The certificate subject has attribute types the allow-list cannot be compared with.
    case unnamedSubject
    /// The certificate's serial number is in `ca-crl.pem`.
    case revoked(subject: String)
    /// The client's PSK identity is not in the key file.
    case unknownPSKIdentity(String)

    public var description: String {
        switch self {
        case .noCertificate: return "the client presented no certificate (--tls-verify-peer)"
        case .notAllowed(let identity): return "client '\(identity)' is not on --tls-allow"
        case .unnamedSubject: return "the client certificate's subject cannot be compared with --tls-allow"
        case .revoked(let subject): return "client certificate '\(subject)' is revoked by ca-crl.pem"
        case .unknownPSKIdentity(let identity): return "unknown PSK identity '\(identity)'"
        }
    }
}
