import ArgumentParser

#if canImport(Glibc)
import Glibc
#endif

/// The backup client: `backup`, `restore` and `verify`. It is its own executable because it
/// links libnbd, which the server must not load: loading libnbd and its TLS stack cost a
/// captive `tidemark serve` 2.9 ms of every start. `tidemark backup|restore|verify` runs it,
/// so users never type its name.
@main
struct TidemarkBackupCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        // Usage lines read as users type them: `tidemark backup full URI DIR`.
        commandName: "tidemark",
        abstract: "Tidemark's backup client: qcow2 backup chains from any NBD server with dirty bitmaps.",
        subcommands: [BackupCommand.self, RestoreCommand.self, VerifyCommand.self]
    )

    /// A server that dies mid-backup must fail the backup with a message, not kill this
    /// process silently: with SIGPIPE ignored, writing to its dead control or NBD socket
    /// returns EPIPE, which is reported and exits with status 1 (not 141).
    static func main() {
        signal(SIGPIPE, SIG_IGN)
        main(nil)
    }
}
