import ArgumentParser
import NBDClient

/// `--tls-certificates DIR`, `--tls-psk FILE`, `--tls-username NAME`: TLS for every NBD
/// connection a backup or restore opens, the same files libnbd's tools take. The URI must
/// be `nbds://` or `nbds+unix://` (an `nbd://` URI turns TLS off in libnbd).
struct ClientTLSOptions: ParsableArguments {
    @Option(
        help: ArgumentHelp(
            "X.509: DIR holds ca-cert.pem (and client-cert.pem, client-key.pem for mutual TLS). Needs an nbds:// URI.",
            valueName: "DIR"))
    var tlsCertificates: String?

    @Option(help: ArgumentHelp("PSK: psktool's key file. Needs an nbds:// URI.", valueName: "FILE"))
    var tlsPsk: String?

    @Option(
        help: ArgumentHelp(
            "The PSK identity (default: the URI's user@, else the login name).", valueName: "NAME"))
    var tlsUsername: String?

    /// The settings, or nil when no TLS option was given.
    var settings: NBDClientTLS? {
        guard tlsCertificates != nil || tlsPsk != nil || tlsUsername != nil else { return nil }
        return NBDClientTLS(certificatesDirectory: tlsCertificates, pskFile: tlsPsk, username: tlsUsername)
    }

    /// Checks the options against the URI they will be used with.
    func validate(uri: String) throws {
        guard settings != nil else { return }
        if tlsCertificates != nil && tlsPsk != nil {
            throw ValidationError("--tls-certificates and --tls-psk were both given: choose one")
        }
        guard uri.hasPrefix("nbds://") || uri.hasPrefix("nbds+unix://") else {
            throw ValidationError(
                "--tls-certificates, --tls-psk and --tls-username need an nbds:// or nbds+unix:// URI, got '\(uri)'")
        }
    }
}
