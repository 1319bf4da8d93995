import Foundation
import Testing

/// The `tidemark` command line as a whole: `backup`, `restore` and `verify` run the
/// `tidemark-backup` executable (the one that links libnbd) yet read as tidemark's own.
@Suite("Command line")
struct CommandLineTests {
    @Test("tidemark --help lists the backup commands; backup, restore and verify run tidemark-backup")
    func backupCommandsForward() throws {
        let help = try ControlPrograms.tidemark(["--help"])
        #expect(help.succeeded, "\(help)")
        for command in ["serve", "bitmap", "checkpoint", "backup", "restore", "verify"] {
            #expect(help.stdout.contains("\n  \(command) "), "\(command) missing from:\n\(help.stdout)")
        }
        let cases: [([String], String)] = [
            (["backup", "--help"], "USAGE: tidemark backup <subcommand>"),
            (["backup", "full", "--help"], "USAGE: tidemark backup full"),
            (["help", "restore"], "USAGE: tidemark restore"),
            (["verify", "--help"], "USAGE: tidemark verify <directory>"),
        ]
        for (arguments, usage) in cases {
            let result = try ControlPrograms.tidemark(arguments)
            #expect(result.succeeded, "\(result)")
            #expect(result.stdout.contains(usage), "\(arguments): \(result.stdout)")
        }
        // Errors come from the backup client itself, with its exit status.
        let missing = try ControlPrograms.tidemark(["verify", "/nonexistent/chain"])
        #expect(missing.status != 0 && !missing.stderr.isEmpty, "\(missing)")
    }

    @Test("with no tidemark-backup beside it or on PATH, tidemark backup says what is missing")
    func missingBackupClient() throws {
        let directory = try TestDirectory()
        let lone = directory.file("tidemark")
        try FileManager.default.copyItem(atPath: TidemarkProcess.binaryPath, toPath: lone)
        let result = try ControlPrograms.run(
            lone, ["backup", "full", "nbd+unix:///disk?socket=/nonexistent", directory.file("chain")],
            environment: ["PATH": "/usr/bin:/bin"])
        #expect(result.status == 127, "\(result)")
        #expect(result.stderr.contains("cannot run tidemark-backup"), "\(result)")
        // Everything else still works without it.
        let serveHelp = try ControlPrograms.run(lone, ["serve", "--help"], environment: ["PATH": "/usr/bin:/bin"])
        #expect(serveHelp.succeeded && serveHelp.stdout.contains("USAGE: tidemark serve"), "\(serveHelp)")
    }
}
