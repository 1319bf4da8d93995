import ArgumentParser

#if canImport(Glibc)
import Glibc
#endif

/// The `tidemark` command line: an NBD server for incremental backup.
@main
struct TidemarkCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tidemark",
        abstract: "An NBD server that records every write in dirty bitmaps for incremental backup.",
        version: "0.1.0",
        subcommands: [
            ServeCommand.self, BitmapCommand.self, CheckpointCommand.self, QueryCommand.self, TLSCommand.self,
            BackupCommandListing.self, RestoreCommandListing.self, VerifyCommandListing.self,
        ]
    )

    /// SIGPIPE is ignored (and stays so in `tidemark-backup`, which it may exec): a
    /// control-socket command whose server died gets EPIPE and reports it, rather than
    /// dying silently with status 141.
    static func main() async {
        signal(SIGPIPE, SIG_IGN)
        let serveArguments: [String]?
        do {
            serveArguments = try LiveRestoreArguments.serveArguments(Array(CommandLine.arguments.dropFirst()))
        } catch {
            exit(withError: error)
        }
        if let serveArguments {
            await main(serveArguments)
            return
        }
        BackupForwarding.execIfRequested(CommandLine.arguments)
        await main(nil)
    }
}
