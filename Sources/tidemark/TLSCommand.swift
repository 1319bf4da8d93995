import ArgumentParser

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif

/// `tidemark tls init DIR`: a CA, a server and a client certificate in the layout qemu-nbd,
/// nbdkit, libnbd and `serve --tls-certificates` read, made with openssl.
struct TLSCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tls",
        abstract: "Make TLS certificates for NBD.",
        subcommands: [TLSInitCommand.self]
    )
}

/// Makes `ca-cert.pem`/`ca-key.pem`, `server-cert.pem`/`server-key.pem` and
/// `client-cert.pem`/`client-key.pem` in DIR. The server directory of qemu-nbd and nbdkit
/// and the client directory of libnbd and qemu share these names, so DIR serves both on
/// one host; across hosts, copy `ca-cert.pem` and the `client-*` files to the client.
///
/// The extensions are the ones gnutls (qemu, libnbd) checks: the CA has basicConstraints
/// CA:TRUE and keyCertSign; the server and client certificates have digitalSignature and
/// keyEncipherment (critical) and serverAuth or clientAuth; the server certificate names
/// every `--hosts` entry as a subjectAltName, which clients check against the host they
/// connect to.
struct TLSInitCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "init",
        abstract: "Make a CA, a server and a client certificate in DIR (needs openssl).",
        discussion: """
            Serve with `tidemark serve --tls require --tls-certificates DIR`; connect with \
            `nbdinfo nbds://HOST/EXPORT?tls-certificates=DIR` or qemu's \
            `--object tls-creds-x509,id=tls0,dir=DIR,endpoint=client`. For mutual TLS add \
            --tls-verify-peer, and --tls-allow with the client subject this command prints. \
            Existing files are not overwritten.
            """
    )

    @Argument(help: "Directory for the certificates (created if missing).")
    var directory: String

    @Option(
        parsing: .upToNextOption,
        help: ArgumentHelp(
            "Host names and IP addresses clients use to reach the server (default: localhost 127.0.0.1 ::1 and this host's name).",
            valueName: "HOST"))
    var hosts: [String] = []

    @Option(help: "Common name of the client certificate.")
    var clientName: String = "tidemark-client"

    @Option(help: "Organization in every subject.")
    var organization: String = "Tidemark"

    @Option(help: "Days the certificates are valid.")
    var days: Int = 3650

    func validate() throws {
        guard (1...36_500).contains(days) else { throw ValidationError("--days must be 1 to 36500") }
        for text in [clientName, organization] + hosts where text.isEmpty || text.contains(where: { "/,=\\\n\"".contains($0) }) {
            throw ValidationError("'\(text)': names may not be empty or contain / , = \\ \" or newlines")
        }
    }

    func run() throws {
        let fileManager = FileManager.default
        try fileManager.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let names = ["ca-key.pem", "ca-cert.pem", "server-key.pem", "server-cert.pem", "client-key.pem", "client-cert.pem"]
        for name in names where fileManager.fileExists(atPath: path(name)) {
            throw ValidationError("\(path(name)) exists; remove the old certificates first or choose another DIR")
        }
        let serverHosts = hosts.isEmpty ? defaultHosts() : hosts
        // Scratch files (configs, requests, serial) beside the certificates, removed after.
        var template = Array((directory + "/.tls-init-XXXXXX").utf8CString)
        let made = template.withUnsafeMutableBufferPointer { buffer -> UnsafeMutablePointer<CChar>? in
            guard let base = buffer.baseAddress else { return nil }
            return mkdtemp(base)
        }
        guard made != nil else {
            throw ValidationError("cannot create a scratch folder in \(directory): \(String(cString: strerror(errno)))")
        }
        let work = URL(fileURLWithPath: String(decoding: template.dropLast().map { UInt8(bitPattern: $0) }, as: UTF8.self))
        defer { try? fileManager.removeItem(at: work) }

        try makeKey("ca-key.pem")
        let caConfig = work.appendingPathComponent("ca.cnf").path
        try write(
            """
            [req]
            distinguished_name = dn
            prompt = no
            x509_extensions = ext
            [dn]
            O = \(organization)
            CN = \(organization) NBD CA
            [ext]
            basicConstraints = critical, CA:TRUE
            keyUsage = critical, keyCertSign, cRLSign
            subjectKeyIdentifier = hash
            """, to: caConfig)
        try openssl([
            "req", "-new", "-x509", "-key", path("ca-key.pem"), "-out", path("ca-cert.pem"), "-days", "\(days)",
            "-sha256", "-config", caConfig,
        ])

        let altNames = serverHosts.enumerated().map { index, host in
            (isIPAddress(host) ? "IP.\(index) = " : "DNS.\(index) = ") + host
        }
        try issue(
            "server", commonName: serverHosts.first ?? "localhost", usage: "serverAuth",
            extra: "subjectAltName = @alt\n[alt]\n" + altNames.joined(separator: "\n"), work: work)
        try issue("client", commonName: clientName, usage: "clientAuth", extra: "", work: work)

        print("made \(directory)/{ca,server,client}-{cert,key}.pem (server names: \(serverHosts.joined(separator: ", ")))")
        print("client subject for --tls-allow: CN=\(clientName),O=\(organization)")
    }

    private func issue(_ role: String, commonName: String, usage: String, extra: String, work: URL) throws {
        try makeKey("\(role)-key.pem")
        let config = work.appendingPathComponent("\(role).cnf").path
        try write(
            """
            [req]
            distinguished_name = dn
            prompt = no
            [dn]
            O = \(organization)
            CN = \(commonName)
            [ext]
            basicConstraints = critical, CA:FALSE
            keyUsage = critical, digitalSignature, keyEncipherment
            extendedKeyUsage = \(usage)
            subjectKeyIdentifier = hash
            authorityKeyIdentifier = keyid
            \(extra)
            """, to: config)
        let request = work.appendingPathComponent("\(role).csr").path
        try openssl(["req", "-new", "-key", path("\(role)-key.pem"), "-out", request, "-config", config])
        try openssl([
            "x509", "-req", "-in", request, "-CA", path("ca-cert.pem"), "-CAkey", path("ca-key.pem"),
            "-CAcreateserial", "-CAserial", work.appendingPathComponent("ca.srl").path,
            "-out", path("\(role)-cert.pem"), "-days", "\(days)", "-sha256", "-extfile", config, "-extensions", "ext",
        ])
    }

    private func makeKey(_ name: String) throws {
        try openssl(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:3072", "-out", path(name)])
        _ = chmod(path(name), 0o600)
    }

    private func path(_ name: String) -> String { directory + "/" + name }

    private func write(_ text: String, to path: String) throws {
        try Data((text + "\n").utf8).write(to: URL(fileURLWithPath: path))
    }

    private func defaultHosts() -> [String] {
        var result = ["localhost", "127.0.0.1", "::1"]
        var buffer = [CChar](repeating: 0, count: 256)
        if gethostname(&buffer, buffer.count - 1) == 0 {
            let name = String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            if !name.isEmpty && !result.contains(name) { result.append(name) }
        }
        return result
    }

    private func isIPAddress(_ host: String) -> Bool {
        host.contains(":") || (host.split(separator: ".").count == 4 && host.allSatisfy { $0.isNumber || $0 == "." })
    }

    /// Runs `openssl ARGUMENTS` (from PATH) with stdin from /dev/null; its output is shown
    /// only when it fails.
    private func openssl(_ arguments: [String]) throws {
        var ends: [Int32] = [0, 0]
        guard pipe(&ends) == 0 else { throw ValidationError("cannot create a pipe: \(String(cString: strerror(errno)))") }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_adddup2(&actions, ends[1], 1)
        posix_spawn_file_actions_adddup2(&actions, ends[1], 2)
        posix_spawn_file_actions_addclose(&actions, ends[0])
        posix_spawn_file_actions_addclose(&actions, ends[1])
        let argv: [UnsafeMutablePointer<CChar>?] = (["openssl"] + arguments).map { strdup($0) } + [nil]
        defer { for argument in argv { free(argument) } }
        var pid = pid_t()
        let spawned = posix_spawnp(&pid, "openssl", &actions, nil, argv, environ)
        close(ends[1])
        guard spawned == 0 else {
            close(ends[0])
            throw ValidationError("cannot run openssl (install Debian's openssl package): \(String(cString: strerror(spawned)))")
        }
        var output: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let count = chunk.withUnsafeMutableBytes { read(ends[0], $0.baseAddress, $0.count) }
            if count > 0 {
                if output.count < 1 << 16 { output += chunk[0..<count] }
            } else if count < 0 && errno == EINTR {
                continue
            } else {
                break
            }
        }
        close(ends[0])
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        // WIFEXITED and WEXITSTATUS, which Swift does not import.
        guard status & 0x7f == 0, (status >> 8) & 0xff == 0 else {
            throw ValidationError("openssl \(arguments.first ?? "") failed: \(String(decoding: output, as: UTF8.self))")
        }
    }
}
