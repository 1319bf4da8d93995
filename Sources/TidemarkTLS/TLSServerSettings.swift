import NBDProtocol

/// The TLS options of `tidemark serve`, named as nbdkit's. Validated before anything is
/// loaded so that a misconfiguration is reported before the server listens.
public struct TLSServerSettings: Sendable, Equatable {
    /// `--tls off|on|require`.
    public var mode: TLSMode
    /// `--tls-certificates DIR`: `ca-cert.pem`, `server-cert.pem`, `server-key.pem` and an
    /// optional `ca-crl.pem`, the layout qemu-nbd and nbdkit use.
    public var certificatesDirectory: String?
    /// `--tls-psk FILE`: psktool's `identity:hexkey` lines.
    public var pskFile: String?
    /// `--tls-verify-peer`: clients must present a certificate signed by `ca-cert.pem`.
    public var verifyPeer: Bool
    /// `--tls-allow NAME`: the client certificate subjects (RFC 4514, as qemu's
    /// `--tls-authz` lists them) or PSK identities allowed in; empty allows every client
    /// the credentials authenticate.
    public var allowedNames: [String]

    public init(
        mode: TLSMode = .off, certificatesDirectory: String? = nil, pskFile: String? = nil,
        verifyPeer: Bool = false, allowedNames: [String] = []
    ) {
        self.mode = mode
        self.certificatesDirectory = certificatesDirectory
        self.pskFile = pskFile
        self.verifyPeer = verifyPeer
        self.allowedNames = allowedNames
    }

    /// What the handshake machine does about TLS under these settings.
    public var policy: NBDTLSPolicy {
        switch mode {
        case .off: return .unavailable
        case .on: return .offered
        case .require: return .required
        }
    }

    /// Checks that the options fit together; says which to add or drop when they do not.
    public func validate() throws(TLSCredentialsError) {
        if mode == .off {
            if certificatesDirectory != nil { throw .optionWithoutTLS(option: "--tls-certificates") }
            if pskFile != nil { throw .optionWithoutTLS(option: "--tls-psk") }
            if verifyPeer { throw .optionWithoutTLS(option: "--tls-verify-peer") }
            if !allowedNames.isEmpty { throw .optionWithoutTLS(option: "--tls-allow") }
            return
        }
        switch (certificatesDirectory, pskFile) {
        case (nil, nil): throw .noCredentials(mode: mode)
        case (.some, .some): throw .bothCredentialKinds
        case (nil, .some):
            if verifyPeer { throw .verifyPeerWithPSK }
        case (.some, nil):
            if !allowedNames.isEmpty && !verifyPeer { throw .allowListNeedsVerifyPeer }
        }
        if allowedNames.contains(where: \.isEmpty) { throw .emptyAllowedName }
    }
}
