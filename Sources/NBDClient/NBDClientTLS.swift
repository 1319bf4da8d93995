/// TLS for a client connection, as libnbd does it (gnutls inside libnbd).
///
/// Why here and not in the URI alone: the backup client takes `--tls-certificates` and
/// `--tls-psk` options that apply to every connection it opens (parallel readers, the
/// point-in-time view of a `--control` cycle, a restore target), whatever URI they use.
/// A URI's own `tls-certificates=`/`tls-psk-file=` parameters and `user@` still win, as
/// in nbdinfo and nbdcopy.
public struct NBDClientTLS: Sendable, Equatable {
    /// X.509: a directory with `ca-cert.pem` and, for mutual TLS, `client-cert.pem` and
    /// `client-key.pem` (`nbd_set_tls_certificates`).
    public var certificatesDirectory: String?
    /// PSK: psktool's key file (`nbd_set_tls_psk_file`).
    public var pskFile: String?
    /// The PSK identity (`nbd_set_tls_username`). libnbd's default is the login name,
    /// which rarely is the identity in the key file.
    public var username: String?
    /// Check the server certificate against the CA and, over TCP, the host name
    /// (`nbd_set_tls_verify_peer`; libnbd's default is true).
    public var verifyPeer: Bool

    public init(certificatesDirectory: String? = nil, pskFile: String? = nil, username: String? = nil, verifyPeer: Bool = true) {
        self.certificatesDirectory = certificatesDirectory
        self.pskFile = pskFile
        self.username = username
        self.verifyPeer = verifyPeer
    }
}
