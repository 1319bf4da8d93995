import ArgumentParser
import FoundationEssentials
import TidemarkBackup

/// `tidemark verify DIR`: every recorded checksum against the chain, and `qemu-img check`.
struct VerifyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify",
        abstract: "Check every backup of a chain against its manifest (and with qemu-img check when installed).")

    @Argument(help: "Backup directory.") var directory: String
    @Flag(help: "Print the report as JSON on stdout.") var json = false

    func run() throws {
        let report = try ChainVerifier(directory: directory).run()
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
            print(String(decoding: try encoder.encode(report), as: UTF8.self))
        } else {
            for problem in report.problems { print("MISMATCH \(problem)") }
            let qemu = report.qemuImgAvailable
                ? "qemu-img check passed on \(report.qemuImgChecked.count) of \(report.backups) files"
                : "qemu-img not installed, its check was skipped"
            print("\(report.backups) backups, \(report.extentsChecked) extents (\(ProgressDisplay.bytes(report.bytesChecked))) checked; \(qemu)")
            print(report.isGood ? "chain OK" : "chain BAD: \(report.problems.count) problem(s)")
        }
        if !report.isGood { throw ExitCode(1) }
    }
}
