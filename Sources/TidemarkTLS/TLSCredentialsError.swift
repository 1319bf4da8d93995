/// Why TLS credentials could not be loaded or the TLS options do not fit together. Each
/// message names the file or option and says what to do about it.
public enum TLSCredentialsError: Error, Equatable, CustomStringConvertible {
    /// `--tls on|require` without `--tls-certificates` or `--tls-psk`.
    case noCredentials(mode: TLSMode)
    /// Both `--tls-certificates` and `--tls-psk`.
    case bothCredentialKinds
    /// A TLS option given while `--tls off`.
    case optionWithoutTLS(option: String)
    /// `--tls-verify-peer` with PSK, where the key itself authenticates the client.
    case verifyPeerWithPSK
    /// `--tls-allow` with certificates but without `--tls-verify-peer`: no client
    /// certificate would be asked for, so no name could be checked.
    case allowListNeedsVerifyPeer
    /// An empty `--tls-allow` name.
    case emptyAllowedName
    /// A file the credentials need does not exist.
    case missingFile(path: String, role: String)
    /// A file exists but could not be read.
    case unreadableFile(path: String, reason: String)
    /// A file is larger than any real credential file.
    case fileTooLarge(path: String, limit: Int)
    /// A PEM file held no certificate (or no key) that could be parsed.
    case badPEM(path: String, role: String)
    /// The server key does not belong to the server certificate.
    case keyMismatch(certificate: String, key: String)
    /// A line of the PSK file is not psktool's `identity:hexkey`.
    case malformedPSKLine(path: String, line: Int, reason: String)
    /// The PSK file names no identity at all.
    case emptyPSKFile(path: String)
    /// An identity appears twice in the PSK file.
    case duplicatePSKIdentity(path: String, line: Int, identity: String)
    /// The CRL file could not be parsed.
    case badCRL(path: String, reason: String)
    /// The CRL's issuer is not a CA of `ca-cert.pem`, or its signature does not verify.
    case revocationListNotSigned(path: String, authorities: String, reason: String)
    /// swift-nio-ssl refused the configuration (should not happen with valid files).
    case contextFailed(reason: String)

    public var description: String {
        switch self {
        case .noCredentials(let mode):
            return "--tls \(mode.rawValue) needs credentials: --tls-certificates DIR (X.509) or --tls-psk FILE (pre-shared keys)"
        case .bothCredentialKinds:
            return "--tls-certificates and --tls-psk were both given: choose one (a PSK listener is TLS 1.2 only)"
        case .optionWithoutTLS(let option):
            return "\(option) has no effect with --tls off: add --tls require (or --tls on to serve plaintext clients too)"
        case .verifyPeerWithPSK:
            return "--tls-verify-peer checks client certificates and needs --tls-certificates; with --tls-psk the key already authenticates the client"
        case .allowListNeedsVerifyPeer:
            return "--tls-allow with --tls-certificates needs --tls-verify-peer, so that clients present a certificate whose name can be checked"
        case .emptyAllowedName:
            return "--tls-allow needs a name: a certificate subject such as 'CN=backup.example.com,O=Example' or a PSK identity"
        case .missingFile(let path, let role):
            return "\(path): no such file (the \(role)); a --tls-certificates directory holds ca-cert.pem, server-cert.pem and server-key.pem, as for qemu-nbd and nbdkit; `tidemark tls init DIR` makes them"
        case .unreadableFile(let path, let reason):
            return "\(path): cannot be read: \(reason)"
        case .fileTooLarge(let path, let limit):
            return "\(path): larger than \(limit) bytes, which no certificate, key or PSK file is; check the path"
        case .badPEM(let path, let role):
            return "\(path): no PEM \(role) could be read from it (expected a '-----BEGIN' block; an encrypted key must be decrypted first)"
        case .keyMismatch(let certificate, let key):
            return "\(key) is not the private key of \(certificate): the key and the certificate must be made together"
        case .malformedPSKLine(let path, let line, let reason):
            return "\(path):\(line): \(reason); each line must be 'identity:hexkey' as `psktool -u NAME -p FILE` writes"
        case .emptyPSKFile(let path):
            return "\(path): no 'identity:hexkey' line; make one with `psktool -u NAME -p \(path)`"
        case .duplicatePSKIdentity(let path, let line, let identity):
            return "\(path):\(line): identity '\(identity)' appears twice; keep one key per identity"
        case .badCRL(let path, let reason):
            return "\(path): not a usable certificate revocation list: \(reason)"
        case .revocationListNotSigned(let path, let authorities, let reason):
            return "\(path) is not signed by the CA in \(authorities): \(reason); make the CRL with that CA's key (`openssl ca -gencrl -cert ca-cert.pem -keyfile ca-key.pem` or `certtool --generate-crl --load-ca-certificate ca-cert.pem --load-ca-privkey ca-key.pem`), or remove it to run without revocations"
        case .contextFailed(let reason):
            return "TLS setup failed: \(reason)"
        }
    }
}
