import ArgumentParser

/// The `tidemark` command line: an NBD server for incremental backup.
@main
struct TidemarkCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tidemark",
        abstract: "An NBD server that records every write in dirty bitmaps for incremental backup.",
        version: "0.1.0",
        subcommands: [
            ServeCommand.self, BitmapCommand.self, CheckpointCommand.self, QueryCommand.self,
            BackupCommandListing.self, RestoreCommandListing.self, VerifyCommandListing.self,
        ]
    )

    static func main() async {
        BackupForwarding.execIfRequested(CommandLine.arguments)
        await main(nil)
    }
}
