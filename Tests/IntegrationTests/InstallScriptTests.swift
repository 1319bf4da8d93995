import Foundation
import Testing

/// `scripts/install PREFIX` staged with DESTDIR into a temporary directory. The tests use
/// the binaries under test (`TIDEMARK_PREBUILT_DIR` = the directory of `TIDEMARK_BIN`)
/// rather than a release build: SwiftPM holds the build directory's lock while tests run,
/// and a release build takes minutes on a small machine. The release path is the same
/// script minus that variable.
@Suite("Install script")
struct InstallScriptTests {
    @Test("installs both executables, the units (ExecStart = PREFIX/bin/tidemark), man pages and completions; the installed binaries run")
    func stagedInstall() throws {
        let stage = try TestDirectory()
        let prefix = "/opt/tidemark-test"
        let built = URL(fileURLWithPath: TidemarkProcess.binaryPath).deletingLastPathComponent().path
        let result = try ExternalTool.run(
            "bash", [RepositoryPaths.file("scripts/install"), prefix], timeout: 120,
            environment: ["DESTDIR": stage.path, "TIDEMARK_PREBUILT_DIR": built])
        #expect(result.succeeded, "\(result)")
        let root = stage.path + prefix
        let expected = [
            "bin/tidemark", "bin/tidemark-backup",
            "lib/systemd/system/tidemark.service", "lib/systemd/system/tidemark.socket",
            "share/man/man1/tidemark.1", "share/man/man1/tidemark-backup.1",
            "share/bash-completion/completions/tidemark", "share/zsh/site-functions/_tidemark",
            "share/fish/vendor_completions.d/tidemark.fish", "share/doc/tidemark/tidemark.default",
        ]
        for file in expected {
            let attributes = try? FileManager.default.attributesOfItem(atPath: root + "/" + file)
            #expect(((attributes?[.size] as? Int) ?? 0) > 0, "\(file) missing or empty")
        }
        #expect(FileManager.default.isExecutableFile(atPath: root + "/bin/tidemark"))
        #expect(FileManager.default.isExecutableFile(atPath: root + "/bin/tidemark-backup"))

        // The installed binaries run.
        let version = try ExternalTool.check(root + "/bin/tidemark", ["--version"])
        #expect(version.stdout.trimmingCharacters(in: .whitespacesAndNewlines).wholeMatch(of: /\d+\.\d+\.\d+/) != nil, "\(version)")
        let help = try ExternalTool.check(root + "/bin/tidemark", ["serve", "--help"])
        #expect(help.stdout.contains("--log-format"), "\(help)")
        let backupHelp = try ExternalTool.check(root + "/bin/tidemark-backup", ["--help"])
        #expect(backupHelp.stdout.contains("backup"), "\(backupHelp)")

        // The service names the installed binary, by its final path (no DESTDIR in it).
        let service = try String(contentsOfFile: root + "/lib/systemd/system/tidemark.service", encoding: .utf8)
        #expect(service.contains("ExecStart=\(prefix)/bin/tidemark serve "), "\(service)")
        #expect(!service.contains(stage.path) && !service.contains("/usr/local/bin"), "\(service)")

        // Man pages: troff reads them without a warning, and they document the options.
        for page in ["tidemark.1", "tidemark-backup.1"] {
            let path = root + "/share/man/man1/" + page
            let lint = try ExternalTool.run("groff", ["-man", "-z", "-ww", path])
            #expect(lint.succeeded && lint.stderr.isEmpty, "\(page): \(lint)")
        }
        let manual = try String(contentsOfFile: root + "/share/man/man1/tidemark.1", encoding: .utf8)
        #expect(manual.hasPrefix(".TH \"TIDEMARK\" 1"))
        #expect(manual.contains(".SS tidemark serve") && manual.contains("\\-\\-log\\-format"), "\(manual.prefix(2000))")

        // Completions: the bash script parses; zsh and fish name the command.
        try ExternalTool.check("bash", ["-n", root + "/share/bash-completion/completions/tidemark"])
        let zsh = try String(contentsOfFile: root + "/share/zsh/site-functions/_tidemark", encoding: .utf8)
        #expect(zsh.hasPrefix("#compdef tidemark"))
        let fish = try String(contentsOfFile: root + "/share/fish/vendor_completions.d/tidemark.fish", encoding: .utf8)
        #expect(fish.contains("complete -c 'tidemark'"))
    }

    @Test("a relative PREFIX is refused before anything is written")
    func relativePrefix() throws {
        let stage = try TestDirectory()
        let result = try ExternalTool.run(
            "bash", [RepositoryPaths.file("scripts/install"), "relative/prefix"],
            environment: ["DESTDIR": stage.path, "TIDEMARK_PREBUILT_DIR": "/nonexistent"])
        #expect(result.status == 2 && result.stderr.contains("absolute"), "\(result)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: stage.path).isEmpty)
    }
}
