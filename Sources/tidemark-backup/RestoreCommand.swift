import ArgumentParser
import FoundationEssentials
import NBDClient
import TidemarkBackup

/// `tidemark restore DIR [--at POINT] OUT`: a raw image (or an NBD export) from a chain.
struct RestoreCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "restore",
        abstract: "Write the disk as a backup chain holds it at one point to a raw image or an NBD export.",
        discussion: """
            Live restore (run by tidemark, which serves while it restores): tidemark restore --live \
            DIR[@POINT] TARGET [--rate BYTES_PER_SECOND] [serve options: --unix, --name, --control, …] \
            serves TARGET at once as a writable export while it is filled from the chain in the \
            background; progress survives a restart (TARGET.restore-map).
            """)

    @Argument(help: "Backup directory.") var directory: String
    @Option(help: "Chain point: index (0 = the full backup), checkpoint name or file name (default: the newest).")
    var at: String?
    @Argument(help: "Output: a raw image file (written sparse), or an NBD URI.") var output: String
    @Flag(help: "Print a JSON summary on stdout.") var json = false
    @OptionGroup var tls: ClientTLSOptions

    func validate() throws {
        if tls.settings != nil && !RestoreJob.isNBDURI(output) {
            throw ValidationError("--tls-certificates, --tls-psk and --tls-username apply to an NBD output only")
        }
        try tls.validate(uri: output)
    }

    func run() throws {
        let result = try RestoreJob(directory: directory, point: at, output: output, tls: tls.settings).run()
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
            print(String(decoding: try encoder.encode(result), as: UTF8.self))
        } else {
            ProgressDisplay.writeError(
                "restored backup \(result.index) (\(result.name)) to \(result.output): "
                    + "\(ProgressDisplay.bytes(result.bytesWritten)) of data, \(ProgressDisplay.bytes(result.virtualSize)) disk\n")
        }
    }
}
