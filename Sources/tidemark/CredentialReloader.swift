import Dispatch
import Logging
import TidemarkTLS

#if canImport(Glibc)
import Glibc
#endif

/// Reloads the TLS certificates, key, CRL or PSK file on SIGHUP, as long-running servers
/// do after a certificate renewal. Connections in progress keep their TLS session; new
/// ones get the new credentials. A reload that fails is logged and the old credentials
/// stay in use.
final class CredentialReloader: Sendable {
    /// Dispatch sources are thread-safe but not marked Sendable.
    private struct SourceBox: @unchecked Sendable {
        let source: any DispatchSourceSignal
    }

    private let box: SourceBox

    init(credentials: TLSServerCredentials, logger: Logger) {
        // SIGHUP's default action ends the process: ignored until the source is
        // registered, so a reload asked for during the start is dropped, not fatal.
        signal(SIGHUP, SIG_IGN)
        let source = SignalSource.watching(SIGHUP) {
            do {
                try credentials.reload()
                logger.info(
                    "TLS credentials reloaded (SIGHUP): \(credentials.summary)", metadata: ["event": "tls.reloaded"])
            } catch {
                logger.error(
                    "TLS credentials not reloaded, the previous ones stay in use: \(error)",
                    metadata: ["event": "tls.reload_failed", "reason": "\(error)"])
            }
        }
        box = SourceBox(source: source)
    }

    func stop() {
        box.source.cancel()
    }
}
