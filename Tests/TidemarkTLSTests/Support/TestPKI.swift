import Foundation

/// Certificates made with openssl for the tests: a CA with a server and two client
/// certificates, a second unrelated CA with its own client, a CRL revoking one client,
/// and a PSK file. openssl is a test dependency (scripts/setup installs it): without it
/// the tests fail, they do not skip.
struct TestPKI {
    let root: String
    /// The server's `--tls-certificates` directory.
    var serverDirectory: String { root + "/server" }
    /// A client directory (libnbd layout) trusted by the server's CA.
    var clientDirectory: String { root + "/client" }
    /// A client of another CA.
    var strangerDirectory: String { root + "/stranger" }
    var pskFile: String { root + "/keys.psk" }

    static let clientSubject = "CN=backup-host,O=Tidemark Test"
    static let revokedSubject = "CN=revoked-host,O=Tidemark Test"
    static let pskIdentity = "alice"
    static let pskKey: [UInt8] = Array(0..<32)

    /// Makes everything in a fresh temporary directory.
    static func make() throws -> TestPKI {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("tidemark-pki-\(UUID().uuidString)").path
        let pki = TestPKI(root: root)
        try pki.build()
        return pki
    }

    func remove() { try? FileManager.default.removeItem(atPath: root) }

    private func build() throws {
        for directory in [root, serverDirectory, clientDirectory, strangerDirectory, root + "/work"] {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        }
        let work = root + "/work"
        try makeCA(key: work + "/ca-key.pem", cert: serverDirectory + "/ca-cert.pem", name: "Tidemark Test CA")
        try FileManager.default.copyItem(atPath: serverDirectory + "/ca-cert.pem", toPath: clientDirectory + "/ca-cert.pem")
        try issue(
            ca: (serverDirectory + "/ca-cert.pem", work + "/ca-key.pem"), subject: "/O=Tidemark Test/CN=localhost",
            key: serverDirectory + "/server-key.pem", cert: serverDirectory + "/server-cert.pem",
            extensions: "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1", serial: "1000")
        try issue(
            ca: (serverDirectory + "/ca-cert.pem", work + "/ca-key.pem"), subject: "/O=Tidemark Test/CN=backup-host",
            key: clientDirectory + "/client-key.pem", cert: clientDirectory + "/client-cert.pem",
            extensions: "extendedKeyUsage=clientAuth", serial: "2000")
        try issue(
            ca: (serverDirectory + "/ca-cert.pem", work + "/ca-key.pem"), subject: "/O=Tidemark Test/CN=revoked-host",
            key: root + "/revoked-key.pem", cert: root + "/revoked-cert.pem",
            extensions: "extendedKeyUsage=clientAuth", serial: "3000")
        try makeCA(key: work + "/other-ca-key.pem", cert: strangerDirectory + "/ca-cert.pem", name: "Other CA")
        try issue(
            ca: (strangerDirectory + "/ca-cert.pem", work + "/other-ca-key.pem"), subject: "/O=Tidemark Test/CN=backup-host",
            key: strangerDirectory + "/client-key.pem", cert: strangerDirectory + "/client-cert.pem",
            extensions: "extendedKeyUsage=clientAuth", serial: "2000")
        let hex = Self.pskKey.map { String(format: "%02x", $0) }.joined()
        try Data("\(Self.pskIdentity):\(hex)\n".utf8).write(to: URL(fileURLWithPath: pskFile))
    }

    /// Who signs a CRL written by `writeRevocationList`.
    enum CRLSigner {
        /// The CA of `ca-cert.pem`.
        case serverCA
        /// The unrelated "Other CA" (its name is not the issuer the server knows).
        case otherCA
        /// A new CA with the server CA's exact name but its own key: a forgery.
        case impostorCA
        /// A new CA "Certificates Only CA" whose key usage lacks cRLSign; the test adds its
        /// certificate (`certificatesOnlyCA`) to ca-cert.pem.
        case certificatesOnlyCA
    }

    var certificatesOnlyCA: String { root + "/work/certificates-only-cert.pem" }

    var revocationListPath: String { serverDirectory + "/ca-crl.pem" }

    /// Writes `ca-crl.pem` into the server directory revoking the `revoked-host` certificate
    /// (or nothing when `revoking` is false), signed by `signer`; `lastUpdate`/`nextUpdate`
    /// (openssl's YYYYMMDDHHMMSSZ) override the CRL's validity period.
    func writeRevocationList(
        signer: CRLSigner = .serverCA, revoking: Bool = true, lastUpdate: String? = nil, nextUpdate: String? = nil
    ) throws {
        let work = root + "/work"
        let (caCert, caKey): (String, String)
        switch signer {
        case .serverCA: (caCert, caKey) = (serverDirectory + "/ca-cert.pem", work + "/ca-key.pem")
        case .otherCA: (caCert, caKey) = (strangerDirectory + "/ca-cert.pem", work + "/other-ca-key.pem")
        case .impostorCA:
            (caCert, caKey) = (work + "/impostor-cert.pem", work + "/impostor-key.pem")
            try makeCA(key: caKey, cert: caCert, name: "Tidemark Test CA")
        case .certificatesOnlyCA:
            (caCert, caKey) = (certificatesOnlyCA, work + "/certificates-only-key.pem")
            try makeCA(key: caKey, cert: caCert, name: "Certificates Only CA", keyUsage: "keyCertSign")
        }
        let index = work + "/index.txt"
        try Data().write(to: URL(fileURLWithPath: index))
        let config = work + "/crl.cnf"
        try Data(
            """
            [ca]
            default_ca = test
            [test]
            database = \(index)
            default_md = sha256
            default_crl_days = 30
            """.utf8
        ).write(to: URL(fileURLWithPath: config))
        if revoking {
            try Self.openssl([
                "ca", "-config", config, "-revoke", root + "/revoked-cert.pem", "-keyfile", caKey, "-cert", caCert,
            ])
        }
        var generate = ["ca", "-config", config, "-gencrl", "-keyfile", caKey, "-cert", caCert, "-out", revocationListPath]
        if let lastUpdate { generate += ["-crl_lastupdate", lastUpdate] }
        if let nextUpdate { generate += ["-crl_nextupdate", nextUpdate] }
        try Self.openssl(generate)
    }

    /// Flips one bit in the last byte of `ca-crl.pem`'s DER, which is inside the signature
    /// BIT STRING, and writes it back as PEM: a CRL whose bytes were altered after signing.
    func alterRevocationListSignature() throws {
        let text = try String(contentsOfFile: revocationListPath, encoding: .utf8)
        let begin = "-----BEGIN X509 CRL-----", end = "-----END X509 CRL-----"
        guard let start = text.range(of: begin), let stop = text.range(of: end),
            var der = Data(base64Encoded: text[start.upperBound..<stop.lowerBound].filter { !$0.isWhitespace }),
            let last = der.indices.last
        else { throw TestPKIError.opensslFailed("read \(revocationListPath)", "no CRL PEM block") }
        der[last] ^= 0x01
        let encoded = der.base64EncodedString(options: [.lineLength64Characters, .endLineWithLineFeed])
        try Data("\(begin)\n\(encoded)\n\(end)\n".utf8).write(to: URL(fileURLWithPath: revocationListPath))
    }

    var revokedCertificate: String { root + "/revoked-cert.pem" }
    var revokedKey: String { root + "/revoked-key.pem" }

    private func makeCA(key: String, cert: String, name: String, keyUsage: String = "keyCertSign,cRLSign") throws {
        try Self.openssl(["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key])
        try Self.openssl([
            "req", "-new", "-x509", "-key", key, "-out", cert, "-days", "30", "-subj", "/O=Tidemark Test/CN=\(name)",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,\(keyUsage)",
        ])
    }

    private func issue(
        ca: (cert: String, key: String), subject: String, key: String, cert: String, extensions: String, serial: String
    ) throws {
        try Self.openssl(["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key])
        let request = root + "/work/request.csr"
        try Self.openssl(["req", "-new", "-key", key, "-out", request, "-subj", subject])
        let extensionFile = root + "/work/ext.cnf"
        try Data("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\(extensions)\n".utf8)
            .write(to: URL(fileURLWithPath: extensionFile))
        try Self.openssl([
            "x509", "-req", "-in", request, "-CA", ca.cert, "-CAkey", ca.key, "-set_serial", serial, "-out", cert,
            "-days", "30", "-extfile", extensionFile,
        ])
    }

    static func openssl(_ arguments: [String]) throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/openssl")
        process.arguments = arguments
        process.standardOutput = FileHandle.nullDevice
        let errors = Pipe()
        process.standardError = errors
        try process.run()
        let message = errors.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else {
            throw TestPKIError.opensslFailed(arguments.joined(separator: " "), String(decoding: message, as: UTF8.self))
        }
    }
}

enum TestPKIError: Error {
    case opensslFailed(String, String)
}
