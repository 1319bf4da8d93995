import Foundation
import NBDClient
import Testing

/// TLS against the real server with the ecosystem's clients: libnbd (nbdinfo, nbdcopy),
/// qemu 7.2 (qemu-img, qemu-io with tls-creds objects) and hostile clients written in
/// Python's ssl (Tests/Tools/tls_probe.py). Each attack is followed by a good client, to
/// show the server keeps serving others.
@Suite("TLS: X.509, PSK, mutual TLS, allow-lists, attacks")
struct TLSTests {
    static let mib = 1 << 20

    /// A server on `image` with `arguments`, and the TLS files.
    func serve(_ arguments: [String], files: TLSFiles, in directory: TestDirectory, image: String? = nil) throws -> TidemarkProcess {
        let path = image ?? directory.file("disk.img")
        if image == nil { try ImageFile.createFilled(path, size: 8 * Self.mib, seed: 7) }
        return try TidemarkProcess.serve(image: path, in: directory, extraArguments: arguments)
    }

    @Test("X.509 require: nbdinfo and qemu-img over TLS; a plaintext client is refused and learns no export name or size")
    func x509Require() throws {
        let directory = try TestDirectory()
        let files = try TLSFiles(in: directory)
        let server = try serve(["--tls", "require", "--tls-certificates", files.certificates], files: files, in: directory)
        let uri = TLSFiles.x509URI(socket: directory.socketPath, certificates: files.certificates)

        let tls = try TLSFiles.nbdinfoSize(uri)
        #expect(tls.succeeded && tls.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "\(8 * Self.mib)", "\(tls)")

        let plain = try TLSFiles.nbdinfoSize("nbd+unix:///disk?socket=\(directory.socketPath)")
        #expect(!plain.succeeded)
        #expect(plain.stderr.contains("TLS"), "\(plain)")

        // LIST, INFO and LIST_META_CONTEXT in plaintext: only TLS_REQD errors, nothing about the export.
        let report = try TLSFiles.probe("plainlist", socket: directory.socketPath, certificates: files.certificates)
        let bytes = report["bytes"] as? String ?? ""
        #expect(!bytes.isEmpty)
        #expect(!bytes.contains("6469736b"), "the export name 'disk' leaked: \(bytes)")
        #expect(!bytes.contains("00800000"), "the export size leaked: \(bytes)")
        #expect(bytes.components(separatedBy: "80000005").count - 1 == 3, "three TLS_REQD replies: \(bytes)")

        let qemu = try ExternalTool.run(
            "qemu-img",
            [
                "info", "--object", "tls-creds-x509,id=tls0,dir=\(files.certificates),endpoint=client", "--image-opts",
                "driver=nbd,server.type=unix,server.path=\(directory.socketPath),export=disk,tls-creds=tls0,tls-hostname=localhost",
            ])
        #expect(qemu.succeeded && qemu.stdout.contains("8 MiB"), "\(qemu)")
        #expect(try TLSFiles.nbdinfoSize(uri).succeeded, "still serving after the refused clients")
        try server.stop()
    }

    @Test("TLS on: plaintext clients are still served, TLS clients too")
    func tlsOn() throws {
        let directory = try TestDirectory()
        let files = try TLSFiles(in: directory)
        let server = try serve(["--tls", "on", "--tls-certificates", files.certificates], files: files, in: directory)
        #expect(try TLSFiles.nbdinfoSize("nbd+unix:///disk?socket=\(directory.socketPath)").succeeded)
        #expect(try TLSFiles.nbdinfoSize(TLSFiles.x509URI(socket: directory.socketPath, certificates: files.certificates)).succeeded)
        try server.stop()
    }

    @Test("PSK: nbdinfo and qemu-img with the right key; a wrong key, an unknown identity and one not on --tls-allow are refused")
    func psk() throws {
        let directory = try TestDirectory()
        let files = try TLSFiles(in: directory)
        let server = try serve(["--tls", "require", "--tls-psk", files.pskFile], files: files, in: directory)
        let socket = directory.socketPath
        let good = try TLSFiles.nbdinfoSize(TLSFiles.pskURI(socket: socket, user: "alice", file: files.pskFile))
        #expect(good.succeeded, "\(good)")
        let qemu = try ExternalTool.run(
            "qemu-img",
            [
                "info", "--object", "tls-creds-psk,id=tls0,dir=\(files.pskDirectory),endpoint=client,username=alice",
                "--image-opts", "driver=nbd,server.type=unix,server.path=\(socket),export=disk,tls-creds=tls0,tls-hostname=localhost",
            ])
        #expect(qemu.succeeded, "\(qemu)")

        #expect(!(try TLSFiles.nbdinfoSize(TLSFiles.pskURI(socket: socket, user: "alice", file: files.wrongPSKFile)).succeeded))
        #expect(!(try TLSFiles.nbdinfoSize(TLSFiles.pskURI(socket: socket, user: "bob", file: files.unknownPSKFile)).succeeded))
        #expect(server.waitForLog("unknown PSK identity 'bob'"), "\(server.serverLog)")
        // Logged inside swift-nio-ssl's PSK callback, yet with the connection's id and peer.
        let refusal = server.serverLog.split(separator: "\n").first { $0.contains("unknown PSK identity 'bob'") }
        #expect(refusal?.contains(/\sconnection=\d+\s/) == true, "\(server.serverLog)")
        #expect(try TLSFiles.nbdinfoSize(TLSFiles.pskURI(socket: socket, user: "alice", file: files.pskFile)).succeeded)
        try server.stop()

        let restricted = try TestDirectory()
        let limited = try serve(
            ["--tls", "require", "--tls-psk", files.pskFile, "--tls-allow", "carol"], files: files, in: restricted,
            image: directory.file("disk.img"))
        #expect(!(try TLSFiles.nbdinfoSize(TLSFiles.pskURI(socket: restricted.socketPath, user: "alice", file: files.pskFile)).succeeded))
        #expect(limited.waitForLog("PSK identity 'alice' is not on --tls-allow"), "\(limited.serverLog)")
        try limited.stop()
    }

    @Test("mutual TLS: the CA's client with an allowed subject gets in (nbdinfo, qemu-io); another CA's client and a subject not allowed do not")
    func mutualTLS() throws {
        let directory = try TestDirectory()
        let files = try TLSFiles(in: directory)
        let server = try serve(
            ["--tls", "require", "--tls-certificates", files.certificates, "--tls-verify-peer", "--tls-allow", TLSFiles.clientSubject],
            files: files, in: directory)
        let socket = directory.socketPath
        #expect(try TLSFiles.nbdinfoSize(TLSFiles.x509URI(socket: socket, certificates: files.certificates)).succeeded)
        let io = try ExternalTool.run(
            "qemu-io",
            [
                "--object", "tls-creds-x509,id=tls0,dir=\(files.certificates),endpoint=client", "--image-opts",
                "driver=nbd,server.type=unix,server.path=\(socket),export=disk,tls-creds=tls0,tls-hostname=localhost", "-c", "read 0 512",
            ])
        #expect(io.succeeded && io.stdout.contains("read 512/512 bytes"), "\(io)")

        // The stranger trusts our CA for the server but presents a certificate of its own CA.
        let strangerClient = directory.file("stranger-client")
        try FileManager.default.createDirectory(atPath: strangerClient, withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: files.certificates + "/ca-cert.pem", toPath: strangerClient + "/ca-cert.pem")
        for name in ["client-cert.pem", "client-key.pem"] {
            try FileManager.default.copyItem(atPath: files.stranger + "/" + name, toPath: strangerClient + "/" + name)
        }
        #expect(!(try TLSFiles.nbdinfoSize(TLSFiles.x509URI(socket: socket, certificates: strangerClient)).succeeded))
        #expect(server.waitForLog("TLS handshake failed"), "\(server.serverLog)")
        #expect(try TLSFiles.nbdinfoSize(TLSFiles.x509URI(socket: socket, certificates: files.certificates)).succeeded)
        try server.stop()

        let other = try TestDirectory()
        let narrow = try serve(
            ["--tls", "require", "--tls-certificates", files.certificates, "--tls-verify-peer", "--tls-allow", "CN=someone-else,O=Tidemark"],
            files: files, in: other, image: directory.file("disk.img"))
        #expect(!(try TLSFiles.nbdinfoSize(TLSFiles.x509URI(socket: other.socketPath, certificates: files.certificates)).succeeded))
        #expect(narrow.waitForLog("client '\(TLSFiles.clientSubject)' is not on --tls-allow"), "\(narrow.serverLog)")
        try narrow.stop()
    }

    @Test("attacks: options injected before STARTTLS are not honoured after it; bytes after STARTTLS go to TLS; garbage; one-byte segments; a stalled TLS handshake is cut at the deadline")
    func attacks() throws {
        let directory = try TestDirectory()
        let files = try TLSFiles(in: directory)
        let server = try serve(
            ["--tls", "on", "--tls-certificates", files.certificates, "--handshake-timeout", "2"], files: files, in: directory)
        let socket = directory.socketPath
        let goodURI = TLSFiles.x509URI(socket: socket, certificates: files.certificates)

        // CVE-2021-3716: STRUCTURED_REPLY ACKed in plaintext, then STARTTLS: the READ reply is simple.
        let injected = try TLSFiles.probe("inject", socket: socket, certificates: files.certificates)
        #expect(injected["sr_before_tls"] as? [Int] == [1])
        #expect(injected["reply_magic"] as? Int == 0x6744_6698, "structured replies survived STARTTLS: \(injected)")
        #expect(try TLSFiles.nbdinfoSize(goodURI).succeeded)

        // Options in the STARTTLS segment are the ClientHello to the server: the ACK, then a TLS alert, never an option reply.
        let same = try TLSFiles.probe("samesegment", socket: socket, certificates: files.certificates)
        let bytes = same["bytes"] as? String ?? ""
        let ack = "0003e889045565a9" + "00000005" + "00000001" + "00000000"
        #expect(bytes.hasPrefix(ack), "\(bytes)")
        #expect(!bytes.dropFirst(ack.count).contains("0003e889045565a9"), "an option after STARTTLS was answered: \(bytes)")
        #expect(same["closed"] as? Bool == true)
        #expect(try TLSFiles.nbdinfoSize(goodURI).succeeded)

        let garbage = try TLSFiles.probe("garbage", socket: socket, certificates: files.certificates)
        #expect(garbage["closed"] as? Bool == true)
        #expect(!(garbage["bytes"] as? String ?? "").contains("0003e889045565a9"))
        #expect(try TLSFiles.nbdinfoSize(goodURI).succeeded)

        let split = try TLSFiles.probe("split", socket: socket, certificates: files.certificates)
        #expect(split["reply_magic"] as? Int == 0x6744_6698)
        #expect((split["bytes_sent_one_by_one"] as? Int ?? 0) > 200)
        let expected = ImageFile.pattern(count: 8 * Self.mib, offset: 0, seed: 7).prefix(4096)
        #expect(split["data"] as? String == expected.map { String(format: "%02x", $0) }.joined(), "data read through split records")

        // Half a record header, then silence: the 2 s handshake deadline closes it, and others are served meanwhile.
        let stallStarted = Date()
        let stalled = BackgroundProbe(mode: "stall", socket: socket, certificates: files.certificates)
        usleep(300_000)
        #expect(try TLSFiles.nbdinfoSize(goodURI).succeeded)
        let stall = try stalled.wait()
        let closedAfter = stall["closed_after"] as? Double ?? 99
        #expect(closedAfter >= 1 && closedAfter < 6, "stalled TLS handshake closed after \(closedAfter) s")
        #expect(Date().timeIntervalSince(stallStarted) < 20)
        #expect(server.waitForLog("no export chosen within 2 s"))
        #expect(try TLSFiles.nbdinfoSize(goodURI).succeeded)
        #expect(server.isRunning)
        try server.stop()
    }

    @Test("serve refuses TLS options that do not fit together or files that are missing, saying what to do")
    func serveOptionErrors() throws {
        let directory = try TestDirectory()
        let image = directory.file("disk.img")
        try ImageFile.createSparse(image, size: Self.mib)
        let cases: [([String], String)] = [
            (["--tls", "require"], "needs credentials"),
            (["--tls-certificates", directory.path], "has no effect with --tls off"),
            (["--tls", "require", "--tls-psk", directory.file("none.psk")], "none.psk: no such file"),
            (["--tls", "require", "--tls-certificates", directory.path], "server-cert.pem: no such file (the server certificate)"),
            (["--tls", "on", "--tls-psk", image, "--tls-verify-peer"], "--tls-verify-peer checks client certificates"),
        ]
        for (arguments, message) in cases {
            let result = try ControlPrograms.tidemark(["serve", image, "--unix", directory.socketPath] + arguments)
            #expect(!result.succeeded, "\(arguments) was accepted")
            #expect(result.stderr.contains(message), "\(arguments): \(result.stderr)")
        }
        try Data("alice:zz\n".utf8).write(to: URL(fileURLWithPath: directory.file("bad.psk")))
        let bad = try ControlPrograms.tidemark(
            ["serve", image, "--unix", directory.socketPath, "--tls", "require", "--tls-psk", directory.file("bad.psk")])
        #expect(bad.stderr.contains("bad.psk:1: key is not hexadecimal"), "\(bad)")
    }

    @Test("SIGHUP reloads the certificates: a broken file keeps the old ones and says so; an open TLS connection survives")
    func reloadOnSIGHUP() throws {
        let directory = try TestDirectory()
        let files = try TLSFiles(in: directory)
        let server = try serve(["--tls", "require", "--tls-certificates", files.certificates], files: files, in: directory)
        let open = try NBDConnection(
            NBDConnectionConfiguration(exportName: "disk", tls: NBDClientTLS(certificatesDirectory: files.certificates)))
        try open.connect(unixSocket: directory.socketPath)
        let certificate = files.certificates + "/server-cert.pem"
        let good = try Data(contentsOf: URL(fileURLWithPath: certificate))
        try Data("not a certificate".utf8).write(to: URL(fileURLWithPath: certificate))
        kill(server.process.processIdentifier, SIGHUP)
        #expect(server.waitForLog("TLS credentials not reloaded"), "\(server.serverLog)")
        #expect(try TLSFiles.nbdinfoSize(TLSFiles.x509URI(socket: directory.socketPath, certificates: files.certificates)).succeeded)
        try good.write(to: URL(fileURLWithPath: certificate))
        kill(server.process.processIdentifier, SIGHUP)
        #expect(server.waitForLog("TLS credentials reloaded"), "\(server.serverLog)")
        #expect(try TLSFiles.nbdinfoSize(TLSFiles.x509URI(socket: directory.socketPath, certificates: files.certificates)).succeeded)
        #expect(try open.pread(count: 512, offset: 0) == Array(ImageFile.pattern(count: 512, offset: 0, seed: 7)))
        try open.shutdown()
        #expect(server.isRunning)
        try server.stop()
    }

    @Test("ca-crl.pem must be signed by the CA: serve refuses another CA's CRL; SIGHUP with a forged one keeps the revocations in force")
    func revocationListSignature() throws {
        let directory = try TestDirectory()
        let files = try TLSFiles(in: directory)
        let image = directory.file("disk.img")
        try ImageFile.createFilled(image, size: 8 * Self.mib, seed: 7)
        let crl = files.certificates + "/ca-crl.pem"
        // A client folder without the server's CRL, so only the server judges it.
        let client = directory.file("client")
        try FileManager.default.createDirectory(atPath: client, withIntermediateDirectories: true)
        for name in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
            try FileManager.default.copyItem(atPath: files.certificates + "/" + name, toPath: client + "/" + name)
        }

        // Another CA's list (it would revoke nothing of ours): the server does not start.
        try TLSFiles.writeCRL(crl, caDirectory: files.stranger, revoking: nil, scratch: directory)
        let refused = try ControlPrograms.tidemark(
            ["serve", image, "--unix", directory.socketPath, "--tls", "require", "--tls-certificates", files.certificates],
            timeout: 30)
        #expect(!refused.succeeded)
        #expect(
            refused.stderr.contains("\(crl) is not signed by the CA in \(files.certificates)/ca-cert.pem"), "\(refused)")

        // Our CA's list revoking the client: the server starts and refuses that client.
        try TLSFiles.writeCRL(crl, caDirectory: files.certificates, revoking: client + "/client-cert.pem", scratch: directory)
        let server = try serve(
            ["--tls", "require", "--tls-certificates", files.certificates, "--tls-verify-peer"], files: files, in: directory,
            image: image)
        let uri = TLSFiles.x509URI(socket: directory.socketPath, certificates: client)
        #expect(!(try TLSFiles.nbdinfoSize(uri).succeeded))
        #expect(server.waitForLog("is revoked by ca-crl.pem"), "\(server.serverLog)")

        // A forged, empty list (another CA's key): not reloaded, the client stays revoked.
        try TLSFiles.writeCRL(crl, caDirectory: files.stranger, revoking: nil, scratch: directory)
        kill(server.process.processIdentifier, SIGHUP)
        #expect(server.waitForLog("TLS credentials not reloaded"), "\(server.serverLog)")
        #expect(server.serverLog.contains("ca-crl.pem is not signed by the CA in"), "\(server.serverLog)")
        #expect(!(try TLSFiles.nbdinfoSize(uri).succeeded))
        #expect(server.waitForLog("is revoked by ca-crl.pem", occurrences: 2), "\(server.serverLog)")

        // Our CA's empty list: reloaded, the client gets in.
        try TLSFiles.writeCRL(crl, caDirectory: files.certificates, revoking: nil, scratch: directory)
        kill(server.process.processIdentifier, SIGHUP)
        #expect(server.waitForLog("TLS credentials reloaded"), "\(server.serverLog)")
        #expect(try TLSFiles.nbdinfoSize(uri).succeeded)
        #expect(server.isRunning)
        try server.stop()
    }

    /// swift-nio-ssl encrypts all of a flush's writes into one buffer and keeps its capacity
    /// for the connection's life, and the channel's writability cannot see what waits in
    /// front of TLS. Before replies went to TLS in bounded flushes under the channel's
    /// writability, this load made the peak RSS grow by 417 MiB over TLS against 64 MiB in
    /// plaintext (debug build); since, 41 MiB.
    @Test("8 pipelined 32 MiB READs over TLS: the same data as in plaintext, and peak RSS grows at most 32 MiB more")
    func largeReadsMemory() throws {
        let directory = try TestDirectory()
        let files = try TLSFiles(in: directory)
        let image = directory.file("large.img")
        try ImageFile.createFilled(image, size: 128 * Self.mib, seed: 11)
        let script = RepositoryPaths.file("Tests/Tools/large_reads.py")
        /// Peak RSS growth of a fresh server under the load, and what the client read.
        func run(_ arguments: [String], uri: String, certificates: [String] = []) throws -> (growth: Int, read: String) {
            let server = try TidemarkProcess.serve(image: image, in: directory, extraArguments: arguments)
            let pid = server.process.processIdentifier
            let before = try ProcessStatus.residentBytes(of: pid)
            let result = try ExternalTool.check(
                "/usr/bin/python3", [script, uri, "\(32 * Self.mib)", "8", "3"] + certificates, timeout: 120)
            let peak = try ProcessStatus.peakResidentBytes(of: pid)
            try server.stop()
            return (peak - before, result.stdout)
        }
        let plain = try run([], uri: "nbd+unix:///disk?socket=\(directory.socketPath)")
        let tls = try run(
            ["--tls", "require", "--tls-certificates", files.certificates],
            uri: "nbds+unix:///disk?socket=\(directory.socketPath)", certificates: [files.certificates])
        print("32 MiB reads x 8 x 3: peak RSS growth \(plain.growth >> 20) MiB plaintext, \(tls.growth >> 20) MiB TLS")
        #expect(plain.read.contains("\"bytes\": \(3 * 8 * 32 * Self.mib)"), "\(plain.read)")
        #expect(tls.read == plain.read, "TLS read other data than plaintext")
        #expect(tls.growth <= plain.growth + 32 * Self.mib, "TLS peak RSS growth \(tls.growth >> 20) MiB, plaintext \(plain.growth >> 20) MiB")
    }

    @Test("fio's nbd engine over nbds:// (TLS 1.3, X.509): random writes at QD16 verified with crc32c, and the file agrees")
    func fioOverTLS() throws {
        let directory = try TestDirectory()
        let files = try TLSFiles(in: directory)
        let server = try serve(["--tls", "require", "--tls-certificates", files.certificates], files: files, in: directory)
        // fio's engine refuses libnbd's tls-certificates= (a local file named in a URI):
        // libnbd finds the CA in $HOME/.pki/libnbd instead, as the bench's fio does.
        let home = directory.file("home")
        try FileManager.default.createDirectory(atPath: home + "/.pki", withIntermediateDirectories: true)
        try FileManager.default.createSymbolicLink(atPath: home + "/.pki/libnbd", withDestinationPath: files.certificates)
        let json = try FioTests.fio(
            "nbds+unix:///disk?socket=\(directory.socketPath)", in: directory,
            ["--name=randwrite", "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=8m", "--randseed=7"],
            environment: ["HOME": home])
        #expect(FioTests.jobErrors(json) == [0])
        #expect(FioTests.ioBytes(json, "write") == 8 * Self.mib)
        // fio verified through TLS; a copy over TLS is the image file byte for byte.
        try Self.expectCopyOverTLSMatchesImage(files: files, in: directory)
        try server.stop()
    }

    /// nbdcopy of the export over TLS into a file holds what the served image holds.
    static func expectCopyOverTLSMatchesImage(files: TLSFiles, in directory: TestDirectory) throws {
        let copy = directory.file("copy.raw")
        try ExternalTool.check("nbdcopy", [TLSFiles.x509URI(socket: directory.socketPath, certificates: files.certificates), copy])
        #expect(try ImageFile.sha256(copy) == ImageFile.sha256(directory.file("disk.img")))
    }

    @Test("nbdcopy over TLS copies the export byte-exact")
    func nbdcopy() throws {
        let directory = try TestDirectory()
        let files = try TLSFiles(in: directory)
        let server = try serve(["--tls", "require", "--tls-certificates", files.certificates], files: files, in: directory)
        try Self.expectCopyOverTLSMatchesImage(files: files, in: directory)
        try server.stop()
    }
}

/// A probe running on another thread while the test goes on.
final class BackgroundProbe: @unchecked Sendable {
    private let done = DispatchSemaphore(value: 0)
    private var output: Result<String, any Error> = .failure(HarnessError("not finished"))

    init(mode: String, socket: String, certificates: String) {
        DispatchQueue.global().async {
            do {
                let report = try TLSFiles.probe(mode, socket: socket, certificates: certificates)
                self.output = .success(String(decoding: try JSONSerialization.data(withJSONObject: report), as: UTF8.self))
            } catch {
                self.output = .failure(error)
            }
            self.done.signal()
        }
    }

    func wait() throws -> [String: Any] {
        done.wait()
        let text = try output.get()
        return (try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any]) ?? [:]
    }
}
