import Foundation
import Testing

/// The unit files in dist/systemd, checked by systemd's own parser (`systemd-analyze
/// verify`, which reports unknown keys and bad values without failing, so any output is a
/// failure here) and its hardening score (`systemd-analyze security --offline`).
@Suite("systemd units")
struct SystemdUnitTests {
    static let units = ["tidemark.service", "tidemark.socket"]

    /// The units copied into `directory`, ExecStart pointing at the binary under test
    /// (verify checks that it exists and is executable), `edit` applied to the service.
    static func installUnits(in directory: TestDirectory, editService: (String) -> String = { $0 }) throws -> [String] {
        try units.map { name in
            var text = try String(contentsOfFile: RepositoryPaths.file("dist/systemd/\(name)"), encoding: .utf8)
            text = text.replacingOccurrences(of: "/usr/local/bin/tidemark", with: TidemarkProcess.binaryPath)
            if name.hasSuffix(".service") { text = editService(text) }
            let path = directory.file(name)
            try text.write(toFile: path, atomically: true, encoding: .utf8)
            return path
        }
    }

    @Test("systemd-analyze verify accepts tidemark.service and tidemark.socket without a single complaint")
    func verify() throws {
        let directory = try TestDirectory()
        let paths = try Self.installUnits(in: directory)
        let result = try ExternalTool.run("systemd-analyze", ["verify", "--man=no"] + paths)
        #expect(result.succeeded && result.stdout.isEmpty && result.stderr.isEmpty, "\(result)")
    }

    @Test("the check is not vacuous: a bad value, an unknown key and a missing binary are all reported")
    func verifyCatchesMistakes() throws {
        let directory = try TestDirectory()
        let paths = try Self.installUnits(in: directory) { service in
            service.replacingOccurrences(of: "ProtectSystem=strict", with: "ProtectSystem=strictly\nProtectEverything=yes")
                .replacingOccurrences(of: TidemarkProcess.binaryPath, with: directory.file("no-such-tidemark"))
        }
        let result = try ExternalTool.run("systemd-analyze", ["verify", "--man=no"] + paths)
        #expect(result.stderr.contains("strictly"), "\(result)")
        #expect(result.stderr.contains("ProtectEverything"), "\(result)")
        #expect(result.stderr.contains("no-such-tidemark"), "\(result)")
    }

    @Test("systemd-analyze security rates the service's exposure at most 3.0 (of 10)")
    func exposure() throws {
        let directory = try TestDirectory()
        let paths = try Self.installUnits(in: directory)
        let service = try #require(paths.first { $0.hasSuffix(".service") })
        let result = try ExternalTool.run(
            "systemd-analyze", ["security", "--offline=yes", "--threshold=30", "--no-pager", service])
        #expect(result.succeeded, "\(result)")
        #expect(result.stdout.contains("Overall exposure level for tidemark.service"), "\(result)")
    }

    @Test("the service and the socket agree: ExecStart runs tidemark serve, the socket activates the service")
    func unitsAgree() throws {
        let service = try String(contentsOfFile: RepositoryPaths.file("dist/systemd/tidemark.service"), encoding: .utf8)
        let socket = try String(contentsOfFile: RepositoryPaths.file("dist/systemd/tidemark.socket"), encoding: .utf8)
        let lines = service.split(separator: "\n").map(String.init)
        #expect(lines.contains("Type=notify"))
        #expect(lines.contains { $0.hasPrefix("ExecStart=/usr/local/bin/tidemark serve ") })
        #expect(lines.contains { $0.hasPrefix("WatchdogSec=") })
        for setting in ["ProtectSystem=strict", "NoNewPrivileges=yes", "PrivateTmp=yes", "StateDirectory=tidemark", "ReadWritePaths=/var/lib/tidemark"] {
            #expect(lines.contains(setting), "missing \(setting)")
        }
        #expect(socket.contains("Accept=no") && socket.contains("Service=tidemark.service"))
    }
}
