import Foundation
import NBDClient

/// Certificates and keys for the TLS tests, made the way a user would: `tidemark tls init`
/// for X.509 (one CA for the server and its clients, another CA for a stranger) and
/// gnutls' `psktool` for PSK files. Missing tools fail the test.
struct TLSFiles {
    let directory: TestDirectory
    /// Server and client files of the trusted CA (qemu/nbdkit/libnbd layout, one folder).
    var certificates: String { directory.file("pki") }
    /// A client of another CA (its own ca-cert.pem, client-cert.pem, client-key.pem).
    var stranger: String { directory.file("stranger") }
    /// `alice` with the server's key (also `keys.psk` in `pskDirectory`, for qemu).
    var pskFile: String { pskDirectory + "/keys.psk" }
    var pskDirectory: String { directory.file("psk") }
    /// `alice` with another key.
    var wrongPSKFile: String { directory.file("wrong.psk") }
    /// `bob`, whom the server does not know.
    var unknownPSKFile: String { directory.file("bob.psk") }

    static let clientSubject = "CN=tidemark-client,O=Tidemark"

    init(in directory: TestDirectory, serverHosts: [String] = []) throws {
        self.directory = directory
        try ControlPrograms.tidemark(["tls", "init", certificates, "--hosts", "localhost", "127.0.0.1"] + serverHosts)
            .requireSuccess()
        try ControlPrograms.tidemark(["tls", "init", stranger, "--organization", "Elsewhere"]).requireSuccess()
        try FileManager.default.createDirectory(atPath: pskDirectory, withIntermediateDirectories: true)
        try ExternalTool.check("psktool", ["-u", "alice", "-p", pskFile])
        try ExternalTool.check("psktool", ["-u", "alice", "-p", wrongPSKFile])
        try ExternalTool.check("psktool", ["-u", "bob", "-p", unknownPSKFile])
    }

    /// `nbds+unix:///EXPORT?socket=…&tls-certificates=DIR`.
    static func x509URI(socket: String, certificates: String, export: String = "disk") -> String {
        "nbds+unix:///\(export)?socket=\(socket)&tls-certificates=\(certificates)"
    }

    /// `nbds+unix://USER@/EXPORT?socket=…&tls-psk-file=FILE`.
    static func pskURI(socket: String, user: String, file: String, export: String = "disk") -> String {
        "nbds+unix://\(user)@/\(export)?socket=\(socket)&tls-psk-file=\(file)"
    }

    /// Runs Tests/Tools/tls_probe.py MODE against `socket` and returns its JSON report.
    static func probe(_ mode: String, socket: String, certificates: String, timeout: TimeInterval = 60) throws -> [String: Any] {
        let script = RepositoryPaths.file("Tests/Tools/tls_probe.py")
        let result = try ExternalTool.check("/usr/bin/python3", [script, mode, socket, certificates], timeout: timeout)
        guard let object = try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any] else {
            throw HarnessError("tls_probe \(mode) printed no JSON object: \(result)")
        }
        return object
    }

    /// Writes a CRL to `output` with gnutls' `certtool`, as qemu's documentation makes
    /// them: signed by the CA whose `ca-cert.pem` and `ca-key.pem` are in `caDirectory` (as
    /// `tidemark tls init` leaves them), revoking the certificate file `revoked` if given.
    static func writeCRL(_ output: String, caDirectory: String, revoking revoked: String?, scratch: TestDirectory) throws {
        let template = scratch.file("crl.template")
        try Data("crl_next_update = 30\ncrl_number = 1\n".utf8).write(to: URL(fileURLWithPath: template))
        var arguments = [
            "--generate-crl", "--load-ca-privkey", caDirectory + "/ca-key.pem", "--load-ca-certificate",
            caDirectory + "/ca-cert.pem", "--template", template, "--outfile", output,
        ]
        if let revoked { arguments += ["--load-certificate", revoked] }
        try ExternalTool.check("certtool", arguments)
    }

    /// The export's size through nbdinfo over `uri`, or the failed run.
    static func nbdinfoSize(_ uri: String) throws -> ToolResult {
        try ExternalTool.run("nbdinfo", ["--size", uri], timeout: 60)
    }
}

extension TidemarkProcess {
    /// Waits up to `timeout` for `text` to appear in the server's log (at least
    /// `occurrences` times).
    func waitForLog(_ text: String, occurrences: Int = 1, timeout: TimeInterval = 10) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if serverLog.components(separatedBy: text).count - 1 >= occurrences { return true }
            usleep(20_000)
        }
        return false
    }
}
