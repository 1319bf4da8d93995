import Foundation
import Logging
import NBDProtocol
import NIOCore
import NIOEmbedded
import NIOSSL
import Testing
import TidemarkTLS

/// Loading credentials and running real TLS handshakes in memory against them.
@Suite("TLS credentials: loading, X.509 and PSK handshakes, mutual TLS, allow-lists, CRL, reload")
struct TLSCredentialsTests {
    let logger = Logger(label: "test")

    func clientConfiguration(_ pki: TestPKI, directory: String? = nil, certificate: String? = nil, key: String? = nil)
        throws -> TLSConfiguration
    {
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(pki.serverDirectory + "/ca-cert.pem"))
        configuration.certificateVerification = .noHostnameVerification
        if let directory {
            configuration.certificateChain = try NIOSSLCertificate.fromPEMFile(directory + "/client-cert.pem").map { .certificate($0) }
            configuration.privateKey = .privateKey(try NIOSSLPrivateKey(file: directory + "/client-key.pem", format: .pem))
        }
        if let certificate, let key {
            configuration.certificateChain = try NIOSSLCertificate.fromPEMFile(certificate).map { .certificate($0) }
            configuration.privateKey = .privateKey(try NIOSSLPrivateKey(file: key, format: .pem))
        }
        return configuration
    }

    func pskClient(identity: String, key: [UInt8]) -> TLSConfiguration {
        var configuration = TLSConfiguration.makePreSharedKeyConfiguration()
        configuration.maximumTLSVersion = .tlsv12
        configuration.pskClientProvider = { _ in PSKClientIdentityResponse(key: NIOSSLSecureBytes(key), identity: identity) }
        return configuration
    }

    @Test("X.509: the server directory loads and a client trusting the CA completes a TLS 1.3 handshake")
    func x509Handshake() throws {
        let pki = try TestPKI.make()
        defer { pki.remove() }
        let credentials = try TLSServerCredentials(
            settings: TLSServerSettings(mode: .require, certificatesDirectory: pki.serverDirectory), logger: logger)
        #expect(credentials.policy == .required)
        let pair = try TLSPair(server: credentials.makeServerHandler(), client: clientConfiguration(pki))
        defer { pair.finish() }
        #expect(pair.handshake())
        #expect(pair.serverHandler.tlsVersion == .tlsv13)
        #expect(credentials.authorize(peerCertificate: pair.serverHandler.peerCertificate) == .allowed(identity: nil))
    }

    @Test("X.509: a TLS record split into 1-byte segments still completes the handshake and carries data")
    func splitRecords() throws {
        let pki = try TestPKI.make()
        defer { pki.remove() }
        let credentials = try TLSServerCredentials(
            settings: TLSServerSettings(mode: .require, certificatesDirectory: pki.serverDirectory), logger: logger)
        let pair = try TLSPair(server: credentials.makeServerHandler(), client: clientConfiguration(pki))
        defer { pair.finish() }
        let address = try SocketAddress(ipAddress: "127.0.0.1", port: 1)
        _ = pair.server.connect(to: address)
        _ = pair.client.connect(to: address)
        pair.shuttle(chunkSize: 1)
        #expect(pair.serverEvents.handshakeCompleted && pair.clientEvents.handshakeCompleted)
        try pair.client.writeAndFlush(ByteBuffer(string: "IHAVEOPT")).wait()
        pair.shuttle(chunkSize: 1)
        #expect(pair.serverEvents.received == ByteBuffer(string: "IHAVEOPT"))
    }

    @Test("mutual TLS: a client certificate from the CA is accepted and its subject read as qemu lists it")
    func mutualTLS() throws {
        let pki = try TestPKI.make()
        defer { pki.remove() }
        let credentials = try TLSServerCredentials(
            settings: TLSServerSettings(
                mode: .require, certificatesDirectory: pki.serverDirectory, verifyPeer: true,
                allowedNames: [TestPKI.clientSubject]),
            logger: logger)
        let pair = try TLSPair(server: credentials.makeServerHandler(), client: clientConfiguration(pki, directory: pki.clientDirectory))
        defer { pair.finish() }
        #expect(pair.handshake())
        let certificate = try #require(pair.serverHandler.peerCertificate)
        #expect(DistinguishedName.subject(of: certificate) == TestPKI.clientSubject)
        #expect(credentials.authorize(peerCertificate: certificate) == .allowed(identity: TestPKI.clientSubject))
    }

    @Test("mutual TLS: a client without a certificate fails the handshake")
    func mutualTLSWithoutCertificate() throws {
        let pki = try TestPKI.make()
        defer { pki.remove() }
        let credentials = try TLSServerCredentials(
            settings: TLSServerSettings(mode: .require, certificatesDirectory: pki.serverDirectory, verifyPeer: true),
            logger: logger)
        let pair = try TLSPair(server: credentials.makeServerHandler(), client: clientConfiguration(pki))
        defer { pair.finish() }
        #expect(!pair.handshake())
        #expect(!pair.serverEvents.errors.isEmpty)
        #expect(credentials.authorize(peerCertificate: nil) == .refused(.noCertificate))
    }

    @Test("mutual TLS: a certificate from another CA fails the handshake")
    func strangerCertificate() throws {
        let pki = try TestPKI.make()
        defer { pki.remove() }
        let credentials = try TLSServerCredentials(
            settings: TLSServerSettings(mode: .require, certificatesDirectory: pki.serverDirectory, verifyPeer: true),
            logger: logger)
        let pair = try TLSPair(
            server: credentials.makeServerHandler(), client: clientConfiguration(pki, directory: pki.strangerDirectory))
        defer { pair.finish() }
        #expect(!pair.handshake())
        #expect(!pair.serverEvents.handshakeCompleted)
    }

    @Test("mutual TLS: a valid certificate whose subject is not on --tls-allow is refused, naming it")
    func notOnAllowList() throws {
        let pki = try TestPKI.make()
        defer { pki.remove() }
        let credentials = try TLSServerCredentials(
            settings: TLSServerSettings(
                mode: .require, certificatesDirectory: pki.serverDirectory, verifyPeer: true,
                allowedNames: ["CN=someone-else,O=Tidemark Test"]),
            logger: logger)
        let pair = try TLSPair(server: credentials.makeServerHandler(), client: clientConfiguration(pki, directory: pki.clientDirectory))
        defer { pair.finish() }
        #expect(pair.handshake())
        let verdict = credentials.authorize(peerCertificate: pair.serverHandler.peerCertificate)
        #expect(verdict == .refused(.notAllowed(identity: TestPKI.clientSubject)))
        if case .refused(let refusal) = verdict { #expect(refusal.description.contains("CN=backup-host")) }
    }

    @Test("ca-crl.pem: a revoked client certificate is refused, others pass")
    func revokedCertificate() throws {
        let pki = try TestPKI.make()
        defer { pki.remove() }
        try pki.writeRevocationList()
        let credentials = try TLSServerCredentials(
            settings: TLSServerSettings(mode: .require, certificatesDirectory: pki.serverDirectory, verifyPeer: true),
            logger: logger)
        #expect(credentials.summary.contains("1 revoked"))
        let revoked = try TLSPair(
            server: credentials.makeServerHandler(),
            client: clientConfiguration(pki, certificate: pki.revokedCertificate, key: pki.revokedKey))
        defer { revoked.finish() }
        #expect(revoked.handshake())
        #expect(
            credentials.authorize(peerCertificate: revoked.serverHandler.peerCertificate)
                == .refused(.revoked(subject: TestPKI.revokedSubject)))
        let good = try TLSPair(server: credentials.makeServerHandler(), client: clientConfiguration(pki, directory: pki.clientDirectory))
        defer { good.finish() }
        #expect(good.handshake())
        #expect(credentials.authorize(peerCertificate: good.serverHandler.peerCertificate) == .allowed(identity: TestPKI.clientSubject))
    }

    /// Loads the server directory with mutual TLS; the error, if loading fails.
    func loadingError(_ pki: TestPKI) -> TLSCredentialsError? {
        do {
            _ = try TLSServerCredentials(
                settings: TLSServerSettings(mode: .require, certificatesDirectory: pki.serverDirectory, verifyPeer: true),
                logger: logger)
            return nil
        } catch {
            return error
        }
    }

    @Test("ca-crl.pem: a CRL of another CA, one forged under our CA's name, or one with an altered signature is refused, naming the files",
          arguments: ["other CA", "impostor", "altered"])
    func forgedRevocationList(kind: String) throws {
        let pki = try TestPKI.make()
        defer { pki.remove() }
        switch kind {
        case "other CA": try pki.writeRevocationList(signer: .otherCA)
        case "impostor": try pki.writeRevocationList(signer: .impostorCA)
        default:
            try pki.writeRevocationList()
            try pki.alterRevocationListSignature()
        }
        let error = try #require(loadingError(pki))
        guard case .revocationListNotSigned(let path, let authorities, let reason) = error else {
            Issue.record("unexpected error \(error)")
            return
        }
        #expect(path == pki.revocationListPath)
        #expect(authorities == pki.serverDirectory + "/ca-cert.pem")
        if kind == "other CA" {
            #expect(reason.contains("issuer /O=Tidemark Test/CN=Other CA is not the subject"), "\(reason)")
        } else {
            #expect(reason.contains("signature does not verify"), "\(reason)")
        }
        #expect(error.description.contains("ca-crl.pem is not signed by the CA in \(pki.serverDirectory)/ca-cert.pem"))
    }

    @Test("ca-crl.pem: a change of any single bit of a signed CRL is refused, and none traps")
    func everyBitOfRevocationListCounts() throws {
        let pki = try TestPKI.make()
        defer { pki.remove() }
        try pki.writeRevocationList()
        let authorities = try NIOSSLCertificate.fromPEMFile(pki.serverDirectory + "/ca-cert.pem")
        let text = try String(contentsOfFile: pki.revocationListPath, encoding: .utf8)
        let begin = "-----BEGIN X509 CRL-----", end = "-----END X509 CRL-----"
        let start = try #require(text.range(of: begin)), stop = try #require(text.range(of: end))
        let der = try #require(Data(base64Encoded: text[start.upperBound..<stop.lowerBound].filter { !$0.isWhitespace }))
        func load(_ bytes: Data) throws(TLSCredentialsError) -> RevocationList {
            let pem = "\(begin)\n\(bytes.base64EncodedString(options: .lineLength64Characters))\n\(end)\n"
            return try RevocationList(pem: Array(pem.utf8), path: "ca-crl.pem", authorities: authorities, authoritiesPath: "ca-cert.pem")
        }
        #expect(try load(der).revokedSerials.count == 1)
        var accepted: [String] = []
        for index in der.indices {
            for bit in [UInt8(0x01), 0x80] {
                var altered = der
                altered[index] ^= bit
                if (try? load(altered)) != nil { accepted.append("byte \(index - der.startIndex) bit \(bit)") }
            }
        }
        #expect(accepted.isEmpty, "accepted after a change: \(accepted)")
    }

    @Test("ca-crl.pem: with several CAs in ca-cert.pem, a CRL signed by any of them is accepted")
    func revocationListOfSecondAuthority() throws {
        let pki = try TestPKI.make()
        defer { pki.remove() }
        try pki.writeRevocationList(signer: .otherCA)
        #expect(loadingError(pki) != nil)
        let authorities = pki.serverDirectory + "/ca-cert.pem"
        var bundle = try Data(contentsOf: URL(fileURLWithPath: authorities))
        bundle.append(try Data(contentsOf: URL(fileURLWithPath: pki.strangerDirectory + "/ca-cert.pem")))
        try bundle.write(to: URL(fileURLWithPath: authorities))
        #expect(loadingError(pki) == nil)
    }

    @Test("ca-crl.pem: a CRL signed by a CA of ca-cert.pem whose key usage lacks cRLSign is refused")
    func revocationListOfCertificatesOnlyAuthority() throws {
        let pki = try TestPKI.make()
        defer { pki.remove() }
        try pki.writeRevocationList(signer: .certificatesOnlyCA)
        let authorities = pki.serverDirectory + "/ca-cert.pem"
        var bundle = try Data(contentsOf: URL(fileURLWithPath: authorities))
        bundle.append(try Data(contentsOf: URL(fileURLWithPath: pki.certificatesOnlyCA)))
        try bundle.write(to: URL(fileURLWithPath: authorities))
        let error = try #require(loadingError(pki))
        guard case .revocationListNotSigned(_, _, let reason) = error else {
            Issue.record("unexpected error \(error)")
            return
        }
        #expect(reason.contains("without cRLSign"), "\(reason)")
    }

    @Test("ca-crl.pem past its nextUpdate: loaded with a warning naming the file, and its revocations still apply")
    func staleRevocationList() throws {
        let pki = try TestPKI.make()
        defer { pki.remove() }
        try pki.writeRevocationList(lastUpdate: "20240101000000Z", nextUpdate: "20240201000000Z")
        let capture = LogCapture()
        let credentials = try TLSServerCredentials(
            settings: TLSServerSettings(mode: .require, certificatesDirectory: pki.serverDirectory, verifyPeer: true),
            logger: capture.logger())
        let warnings = capture.lines.filter { $0.level == .warning && $0.metadata["event"] == "tls.crl_stale" }
        #expect(warnings.count == 1)
        #expect(warnings.first?.message.contains(pki.revocationListPath + " is past its nextUpdate") == true)
        #expect(credentials.summary.contains("1 revoked (CRL past its nextUpdate)"))
        let revoked = try TLSPair(
            server: credentials.makeServerHandler(),
            client: clientConfiguration(pki, certificate: pki.revokedCertificate, key: pki.revokedKey))
        defer { revoked.finish() }
        #expect(revoked.handshake())
        #expect(
            credentials.authorize(peerCertificate: revoked.serverHandler.peerCertificate)
                == .refused(.revoked(subject: TestPKI.revokedSubject)))

        // A current CRL loads without the warning.
        try pki.writeRevocationList()
        let quiet = LogCapture()
        _ = try TLSServerCredentials(
            settings: TLSServerSettings(mode: .require, certificatesDirectory: pki.serverDirectory, verifyPeer: true),
            logger: quiet.logger())
        #expect(quiet.lines.filter { $0.level == .warning }.isEmpty)
    }

    @Test("reload: a forged ca-crl.pem is refused and the loaded revocations stay in force")
    func reloadWithForgedRevocationList() throws {
        let pki = try TestPKI.make()
        defer { pki.remove() }
        try pki.writeRevocationList()
        let credentials = try TLSServerCredentials(
            settings: TLSServerSettings(mode: .require, certificatesDirectory: pki.serverDirectory, verifyPeer: true),
            logger: logger)
        // The forgery lists nothing: used, it would let the revoked client in.
        try pki.writeRevocationList(signer: .impostorCA, revoking: false)
        #expect {
            try credentials.reload()
        } throws: { error in
            guard case .revocationListNotSigned = error as? TLSCredentialsError else { return false }
            return true
        }
        let revoked = try TLSPair(
            server: credentials.makeServerHandler(),
            client: clientConfiguration(pki, certificate: pki.revokedCertificate, key: pki.revokedKey))
        defer { revoked.finish() }
        #expect(revoked.handshake())
        #expect(
            credentials.authorize(peerCertificate: revoked.serverHandler.peerCertificate)
                == .refused(.revoked(subject: TestPKI.revokedSubject)))
        let good = try TLSPair(server: credentials.makeServerHandler(), client: clientConfiguration(pki, directory: pki.clientDirectory))
        defer { good.finish() }
        #expect(good.handshake())
        #expect(credentials.authorize(peerCertificate: good.serverHandler.peerCertificate) == .allowed(identity: TestPKI.clientSubject))
    }

    @Test("PSK: the right identity and key complete a TLS 1.2 ECDHE-PSK-CHACHA20-POLY1305 handshake")
    func pskHandshake() throws {
        let pki = try TestPKI.make()
        defer { pki.remove() }
        let credentials = try TLSServerCredentials(
            settings: TLSServerSettings(mode: .require, pskFile: pki.pskFile), logger: logger)
        let pair = try TLSPair(
            server: credentials.makeServerHandler(), client: pskClient(identity: TestPKI.pskIdentity, key: TestPKI.pskKey))
        defer { pair.finish() }
        #expect(pair.handshake())
        #expect(pair.serverHandler.tlsVersion == .tlsv12)
    }

    @Test("PSK: a wrong key, an unknown identity, or an identity not on --tls-allow fail the handshake",
          arguments: [("alice", false, [UInt8](repeating: 7, count: 32)), ("mallory", false, TestPKI.pskKey), ("alice", true, TestPKI.pskKey)])
    func pskRefused(identity: String, restricted: Bool, key: [UInt8]) throws {
        let pki = try TestPKI.make()
        defer { pki.remove() }
        let credentials = try TLSServerCredentials(
            settings: TLSServerSettings(mode: .require, pskFile: pki.pskFile, allowedNames: restricted ? ["bob"] : []),
            logger: logger)
        let pair = try TLSPair(server: credentials.makeServerHandler(), client: pskClient(identity: identity, key: key))
        defer { pair.finish() }
        #expect(!pair.handshake())
        #expect(!pair.serverEvents.handshakeCompleted)
    }

    @Test("PSK: a refused identity is logged on the connection's logger when the server binds it, else on the credentials' logger")
    func pskRefusalLogger() throws {
        let pki = try TestPKI.make()
        defer { pki.remove() }
        let own = LogCapture()
        let credentials = try TLSServerCredentials(
            settings: TLSServerSettings(mode: .require, pskFile: pki.pskFile), logger: own.logger())
        let connection = LogCapture()
        let bound = try TLSPair(server: credentials.makeServerHandler(), client: pskClient(identity: "mallory", key: TestPKI.pskKey))
        defer { bound.finish() }
        let completed = TLSServerCredentials.$handshakeLogger.withValue(connection.logger(metadata: ["connection": "42"])) {
            bound.handshake()
        }
        #expect(!completed)
        let refusal = connection.lines.filter { $0.message.contains("unknown PSK identity 'mallory'") }
        #expect(refusal.count == 1)
        #expect(refusal.first?.metadata["connection"] == "42")
        #expect(refusal.first?.metadata["event"] == "tls.refused")
        #expect(own.lines.isEmpty)

        let unbound = try TLSPair(server: credentials.makeServerHandler(), client: pskClient(identity: "eve", key: TestPKI.pskKey))
        defer { unbound.finish() }
        #expect(!unbound.handshake())
        #expect(own.lines.filter { $0.message.contains("unknown PSK identity 'eve'") }.count == 1)
    }

    @Test("a missing file, bad PEM and a key of another certificate are reported with the file's name")
    func loadingErrors() throws {
        let pki = try TestPKI.make()
        defer { pki.remove() }
        let settings = TLSServerSettings(mode: .require, certificatesDirectory: pki.serverDirectory)
        let key = pki.serverDirectory + "/server-key.pem"
        let saved = try Data(contentsOf: URL(fileURLWithPath: key))

        try FileManager.default.removeItem(atPath: key)
        #expect(throws: TLSCredentialsError.missingFile(path: key, role: "server private key")) {
            try TLSServerCredentials(settings: settings, logger: logger)
        }
        try Data("-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n".utf8).write(to: URL(fileURLWithPath: key))
        #expect(throws: TLSCredentialsError.badPEM(path: key, role: "private key")) {
            try TLSServerCredentials(settings: settings, logger: logger)
        }
        try FileManager.default.copyItem(atPath: pki.clientDirectory + "/client-key.pem", toPath: key + ".other")
        try FileManager.default.removeItem(atPath: key)
        try FileManager.default.moveItem(atPath: key + ".other", toPath: key)
        #expect(throws: TLSCredentialsError.keyMismatch(certificate: pki.serverDirectory + "/server-cert.pem", key: key)) {
            try TLSServerCredentials(settings: settings, logger: logger)
        }
        try saved.write(to: URL(fileURLWithPath: key))
        let cert = pki.serverDirectory + "/server-cert.pem"
        try Data("not a certificate".utf8).write(to: URL(fileURLWithPath: cert))
        #expect(throws: TLSCredentialsError.badPEM(path: cert, role: "server certificate")) {
            try TLSServerCredentials(settings: settings, logger: logger)
        }
    }

    @Test("reload: new handlers use the new certificate; a handshake begun before keeps the old; a failed reload keeps the old")
    func reload() throws {
        let pki = try TestPKI.make()
        defer { pki.remove() }
        let credentials = try TLSServerCredentials(
            settings: TLSServerSettings(mode: .require, certificatesDirectory: pki.serverDirectory), logger: logger)
        let before = try TLSPair(server: credentials.makeServerHandler(), client: clientConfiguration(pki))
        defer { before.finish() }
        #expect(before.handshake())
        let oldSerial = try NIOSSLCertificate.fromPEMFile(pki.serverDirectory + "/server-cert.pem").first?.serialNumber

        // Renew: the server certificate re-issued for the same key with a new serial.
        try TestPKI.openssl([
            "req", "-new", "-key", pki.serverDirectory + "/server-key.pem", "-out", pki.root + "/work/server.csr",
            "-subj", "/O=Tidemark Test/CN=localhost",
        ])
        try TestPKI.openssl([
            "x509", "-req", "-in", pki.root + "/work/server.csr", "-CA", pki.serverDirectory + "/ca-cert.pem",
            "-CAkey", pki.root + "/work/ca-key.pem", "-set_serial", "4242", "-out", pki.serverDirectory + "/server-cert.pem",
            "-days", "30",
        ])
        try credentials.reload()
        let after = try TLSPair(server: credentials.makeServerHandler(), client: clientConfiguration(pki))
        defer { after.finish() }
        #expect(after.handshake())
        let newSerial = try NIOSSLCertificate.fromPEMFile(pki.serverDirectory + "/server-cert.pem").first?.serialNumber
        #expect(newSerial != oldSerial)
        // What the new client saw is the renewed certificate.
        #expect(try after.client.pipeline.syncOperations.handler(type: NIOSSLClientHandler.self).peerCertificate?.serialNumber == newSerial)
        #expect(try before.client.pipeline.syncOperations.handler(type: NIOSSLClientHandler.self).peerCertificate?.serialNumber == oldSerial)
        // The established session still carries data after the reload.
        try before.client.writeAndFlush(ByteBuffer(string: "still here")).wait()
        before.shuttle()
        #expect(before.serverEvents.received == ByteBuffer(string: "still here"))

        // A broken file: reload fails, the loaded credentials keep working.
        try Data("broken".utf8).write(to: URL(fileURLWithPath: pki.serverDirectory + "/server-cert.pem"))
        #expect(throws: TLSCredentialsError.self) { try credentials.reload() }
        let stillGood = try TLSPair(server: credentials.makeServerHandler(), client: clientConfiguration(pki))
        defer { stillGood.finish() }
        #expect(stillGood.handshake())
    }

    @Test("garbage instead of a ClientHello fails the handshake without a trap")
    func garbageClientHello() throws {
        let pki = try TestPKI.make()
        defer { pki.remove() }
        let credentials = try TLSServerCredentials(
            settings: TLSServerSettings(mode: .require, certificatesDirectory: pki.serverDirectory), logger: logger)
        let server = EmbeddedChannel()
        let events = EventRecorder()
        try server.pipeline.syncOperations.addHandlers([credentials.makeServerHandler(), events])
        _ = server.connect(to: try SocketAddress(ipAddress: "127.0.0.1", port: 1))
        do {
            try server.writeInbound(ByteBuffer(string: "GET / HTTP/1.1\r\nHost: x\r\n\r\n" + String(repeating: "\u{0}", count: 300)))
        } catch {
            events.errors.append(error)
        }
        #expect(!events.errors.isEmpty || !server.isActive)
        #expect(!events.handshakeCompleted)
        server.close(promise: nil)
        server.embeddedEventLoop.advanceTime(by: .seconds(60))
    }
}
