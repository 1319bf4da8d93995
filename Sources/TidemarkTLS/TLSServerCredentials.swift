import Logging
import NBDProtocol
import NIOCore
import NIOSSL
import Synchronization

/// The server's TLS credentials as loaded from `--tls-certificates` or `--tls-psk`: the
/// context each new TLS connection takes, and the client checks made after its handshake.
///
/// `reload()` (on SIGHUP) builds a new context from the files and swaps it in; TLS
/// sessions already running keep the context they started with, so reloading never drops
/// a connection. A reload that fails keeps the old credentials.
public final class TLSServerCredentials: Sendable {
    /// What was loaded, swapped whole by `reload()`.
    private struct Loaded: Sendable {
        var context: NIOSSLContext
        var revocations: RevocationList?
        var summary: String
    }

    /// The options these credentials were loaded from.
    public let settings: TLSServerSettings
    private let loaded: Mutex<Loaded>
    private let logger: Logger

    /// The `ca-cert.pem`, `server-cert.pem`, `server-key.pem` and `ca-crl.pem` file names
    /// of a `--tls-certificates` directory (qemu's and nbdkit's layout).
    public enum FileName {
        public static let caCertificate = "ca-cert.pem"
        public static let serverCertificate = "server-cert.pem"
        public static let serverKey = "server-key.pem"
        public static let revocationList = "ca-crl.pem"
    }

    /// TLS 1.2 PSK suites BoringSSL has, forward-secret ChaCha20-Poly1305 first, as
    /// gnutls' PSK clients (libnbd, qemu) offer them.
    public static let pskCipherSuites =
        "ECDHE-PSK-CHACHA20-POLY1305:ECDHE-PSK-AES256-CBC-SHA:ECDHE-PSK-AES128-CBC-SHA:PSK-AES256-CBC-SHA:PSK-AES128-CBC-SHA"

    /// Validates `settings` and loads the files they name. Blocking file I/O: call it
    /// before the event loops run, or off them.
    public init(settings: TLSServerSettings, logger: Logger) throws(TLSCredentialsError) {
        try settings.validate()
        self.settings = settings
        self.logger = logger
        loaded = Mutex(try Self.load(settings, logger: logger))
    }

    /// The logger of the connection whose TLS handshake is running on this thread. A PSK
    /// identity is refused inside swift-nio-ssl's PSK callback, which is shared by every
    /// connection of the context and learns nothing about the connection; the server binds
    /// this around feeding the handshake its bytes (the callback runs synchronously then),
    /// so the refusal is logged with the connection's id and peer. Unbound, the
    /// credentials' own logger is used.
    @TaskLocal public static var handshakeLogger: Logger?

    /// What the handshake machine does about TLS.
    public var policy: NBDTLSPolicy { settings.policy }

    /// One line saying what is loaded (kind, TLS versions, files), for the startup log.
    public var summary: String { loaded.withLock { $0.summary } }

    /// Re-reads the certificate, key, CRL or PSK files. New connections get the new
    /// context; connections already in TLS keep theirs. On failure the old credentials stay.
    public func reload() throws(TLSCredentialsError) {
        let fresh = try Self.load(settings, logger: logger)
        loaded.withLock { $0 = fresh }
    }

    /// A TLS handler for one connection, on the context current now.
    public func makeServerHandler() -> NIOSSLServerHandler {
        NIOSSLServerHandler(context: loaded.withLock { $0.context })
    }

    /// Decides whether the client whose TLS handshake just finished may go on.
    /// `peerCertificate` is the client certificate (nil for PSK or when none was asked
    /// for). PSK identities were already checked during the handshake.
    public func authorize(peerCertificate: NIOSSLCertificate?) -> TLSClientAuthorization {
        guard settings.certificatesDirectory != nil, settings.verifyPeer else { return .allowed(identity: nil) }
        guard let certificate = peerCertificate else { return .refused(.noCertificate) }
        let subject = DistinguishedName.subject(of: certificate)
        if loaded.withLock({ $0.revocations?.isRevoked(serial: certificate.serialNumber) ?? false }) {
            return .refused(.revoked(subject: subject ?? "(unnamed)"))
        }
        guard !settings.allowedNames.isEmpty else { return .allowed(identity: subject) }
        guard let subject else { return .refused(.unnamedSubject) }
        guard settings.allowedNames.contains(subject) else { return .refused(.notAllowed(identity: subject)) }
        return .allowed(identity: subject)
    }

    // MARK: - Loading

    private static func load(_ settings: TLSServerSettings, logger: Logger) throws(TLSCredentialsError) -> Loaded {
        if let directory = settings.certificatesDirectory {
            return try loadX509(directory: directory, settings: settings, logger: logger)
        }
        if let path = settings.pskFile {
            return try loadPSK(path: path, settings: settings, logger: logger)
        }
        throw .noCredentials(mode: settings.mode)
    }

    private static func loadX509(
        directory: String, settings: TLSServerSettings, logger: Logger
    ) throws(TLSCredentialsError) -> Loaded {
        let caPath = directory + "/" + FileName.caCertificate
        let certificatePath = directory + "/" + FileName.serverCertificate
        let keyPath = directory + "/" + FileName.serverKey
        let crlPath = directory + "/" + FileName.revocationList

        let chain = try certificates(at: certificatePath, role: "server certificate")
        let authorities = try certificates(at: caPath, role: "CA certificate")
        let keyBytes = try CredentialFile.read(keyPath, role: "server private key")
        let key: NIOSSLPrivateKey
        do {
            key = try NIOSSLPrivateKey(bytes: keyBytes, format: .pem)
        } catch {
            throw .badPEM(path: keyPath, role: "private key")
        }
        var revocations: RevocationList?
        if CredentialFile.exists(crlPath) {
            let list = try RevocationList(
                pem: CredentialFile.read(crlPath, role: "revocation list"), path: crlPath, authorities: authorities,
                authoritiesPath: caPath)
            if list.isPastNextUpdate {
                // Still used: dropping a stale list would let its revoked certificates in.
                logger.warning(
                    "\(crlPath) is past its nextUpdate time; its revocations still apply, but publish a fresh CRL from the CA",
                    metadata: ["event": "tls.crl_stale", "file": "\(crlPath)"])
            }
            revocations = list
        }

        var configuration = TLSConfiguration.makeServerConfiguration(
            certificateChain: chain.map { .certificate($0) }, privateKey: .privateKey(key))
        configuration.minimumTLSVersion = .tlsv12
        configuration.maximumTLSVersion = .tlsv13
        if settings.verifyPeer {
            configuration.certificateVerification = .noHostnameVerification
            configuration.trustRoots = .certificates(authorities)
            configuration.sendCANameList = true
        }
        let context: NIOSSLContext
        do {
            context = try NIOSSLContext(configuration: configuration)
        } catch NIOSSLError.failedToLoadPrivateKey {
            throw .keyMismatch(certificate: certificatePath, key: keyPath)
        } catch {
            throw .contextFailed(reason: "\(error) (\(certificatePath), \(keyPath))")
        }
        var summary = "X.509 from \(directory), TLS 1.2-1.3"
        summary += settings.verifyPeer ? ", client certificates required" : ", no client certificates"
        if let revocations {
            summary += ", \(revocations.revokedSerials.count) revoked"
            if revocations.isPastNextUpdate { summary += " (CRL past its nextUpdate)" }
        }
        if !settings.allowedNames.isEmpty { summary += ", \(settings.allowedNames.count) allowed names" }
        return Loaded(context: context, revocations: revocations, summary: summary)
    }

    private static func certificates(at path: String, role: String) throws(TLSCredentialsError) -> [NIOSSLCertificate] {
        let bytes = try CredentialFile.read(path, role: role)
        let parsed: [NIOSSLCertificate]
        do {
            parsed = try NIOSSLCertificate.fromPEMBytes(bytes)
        } catch {
            throw .badPEM(path: path, role: role)
        }
        guard !parsed.isEmpty else { throw .badPEM(path: path, role: role) }
        return parsed
    }

    private static func loadPSK(path: String, settings: TLSServerSettings, logger: Logger) throws(TLSCredentialsError) -> Loaded {
        let file = try PSKKeyFile(parsing: CredentialFile.read(path, role: "PSK key file"), path: path)
        let allowed = Set(settings.allowedNames)
        let keys = file.keys
        var configuration = TLSConfiguration.makePreSharedKeyConfiguration()
        // BoringSSL's PSK is TLS 1.2 only; with 1.3 allowed it would pick 1.3 and ask for a
        // certificate it does not have.
        configuration.minimumTLSVersion = .tlsv12
        configuration.maximumTLSVersion = .tlsv12
        configuration.cipherSuites = pskCipherSuites
        configuration.pskServerProvider = { context in
            let identity = context.clientIdentity
            let logger = TLSServerCredentials.handshakeLogger ?? logger
            guard let key = keys[identity] else {
                logger.warning(
                    "TLS refused: unknown PSK identity '\(identity)'",
                    metadata: ["event": "tls.refused", "reason": "unknown PSK identity", "identity": "\(identity)"])
                throw TLSClientRefusal.unknownPSKIdentity(identity)
            }
            guard allowed.isEmpty || allowed.contains(identity) else {
                logger.warning(
                    "TLS refused: PSK identity '\(identity)' is not on --tls-allow",
                    metadata: ["event": "tls.refused", "reason": "not allowed", "identity": "\(identity)"])
                throw TLSClientRefusal.notAllowed(identity: identity)
            }
            guard key.count <= context.maxPSKLength else { throw TLSClientRefusal.unknownPSKIdentity(identity) }
            return PSKServerIdentityResponse(key: NIOSSLSecureBytes(key))
        }
        let context: NIOSSLContext
        do {
            context = try NIOSSLContext(configuration: configuration)
        } catch {
            throw .contextFailed(reason: "\(error) (\(path))")
        }
        var summary = "PSK from \(path), TLS 1.2, \(keys.count) identities"
        if !allowed.isEmpty { summary += ", \(allowed.count) allowed" }
        return Loaded(context: context, revocations: nil, summary: summary)
    }
}
