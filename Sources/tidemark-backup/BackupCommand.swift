import ArgumentParser
import FoundationEssentials
import NBDClient
import TidemarkBackup

/// `tidemark backup full|incremental URI DIR`: pull a backup from any NBD server into a
/// qcow2 chain in DIR.
struct BackupCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "backup",
        abstract: "Pull a full or incremental backup from an NBD server into a qcow2 chain.",
        discussion: """
            Each backup is DIR/backup-NNNN.qcow2 (backing file: the previous one) with a manifest \
            DIR/backup-NNNN.json. Works with any server offering qemu:dirty-bitmap contexts \
            (Tidemark, qemu-nbd -B, qemu-storage-daemon). With --control (Tidemark only) the \
            backup creates a checkpoint with a point-in-time view, pulls from the view, and \
            completes the checkpoint, or aborts it on failure.
            """,
        subcommands: [Full.self, Incremental.self]
    )

    /// Options shared by both kinds.
    struct Common: ParsableArguments {
        @Argument(
            help: "NBD URI of the export (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH; nbds:// and nbds+unix:// with TLS).")
        var uri: String
        @Argument(help: "Backup directory (created if missing).") var directory: String
        @Option(help: "Parallel NBD connections (default: one per core, up to 4, when the server allows multi-conn; else 1).")
        var connections: Int?
        @Option(help: "Reads in flight per connection (default: about 16 MiB in flight).") var inFlight: Int?
        @Option(help: "Bytes per read, a multiple of 65536 (default: the server's maximum block size, at most 4 MiB).")
        var requestSize: UInt64?
        @Option(help: "Control socket of a Tidemark server: run the checkpoint cycle (needs --bitmap).")
        var control: String?
        @Option(help: "Export (node) name for --control (default: the URI's export name).") var export: String?
        @Flag(help: "Print a JSON summary on stdout.") var json = false
        @Option(
            help: ArgumentHelp(
                "After the run, write its outcome for node_exporter's textfile collector to PATH (atomically; chain label: DIR).",
                valueName: "PATH"))
        var metricsFile: String?
        @OptionGroup var tls: ClientTLSOptions

        func validate() throws {
            if let connections, !(1...16).contains(connections) {
                throw ValidationError("--connections must be 1 to 16")
            }
            if let inFlight, !(1...256).contains(inFlight) { throw ValidationError("--in-flight must be 1 to 256") }
            if let requestSize, requestSize == 0 || requestSize % 65536 != 0 || requestSize > 32 << 20 {
                throw ValidationError("--request-size must be a multiple of 65536 up to 32 MiB")
            }
            guard NBDURI.exportName(of: uri) != nil else {
                throw ValidationError("'\(uri)' is not an NBD URI (nbd://… or nbd+unix://…)")
            }
            try tls.validate(uri: uri)
        }

        /// Runs the job and records its outcome in `--metrics-file`, if given.
        func run(kind: BackupManifest.Kind, bitmap: String?) throws {
            guard let metricsFile else {
                try runJob(kind: kind, bitmap: bitmap)
                return
            }
            let file = BackupMetricsFile(path: metricsFile)
            let result: BackupJob.Result
            do {
                result = try runJob(kind: kind, bitmap: bitmap)
            } catch {
                do {
                    try file.recordFailure(chain: directory)
                } catch let recordError {
                    ProgressDisplay.writeError("tidemark backup: cannot record the failure in \(metricsFile): \(recordError)\n")
                }
                throw error
            }
            try file.recordSuccess(
                chain: directory, kind: kind.rawValue, bytes: result.bytesCopied, durationSeconds: result.durationSeconds)
        }

        /// Runs the job, through the checkpoint cycle when `--control` is given.
        @discardableResult
        func runJob(kind: BackupManifest.Kind, bitmap: String?) throws -> BackupJob.Result {
            let display = ProgressDisplay(label: "backup \(kind.rawValue)")
            var options = BackupJob.Options(uri: uri, directory: directory, kind: kind, bitmap: bitmap)
            options.connections = connections
            options.window = inFlight
            options.requestSize = requestSize
            options.progress = display.handler
            options.tls = tls.settings
            let result: BackupJob.Result
            if let control {
                guard let bitmap else { throw ValidationError("--control needs --bitmap NAME") }
                let node = export ?? NBDURI.exportName(of: uri) ?? "disk"
                let cycle = BackupCheckpointCycle(controlSocket: control, node: node, bitmap: bitmap)
                result = try cycle.run { checkpoint in
                    guard let viewURI = NBDURI.replacingExport(of: uri, with: checkpoint.view) else {
                        throw BackupError.invalidArgument("cannot build the view's URI from \(uri)")
                    }
                    var fromView = options
                    fromView.uri = viewURI
                    fromView.bitmap = kind == .incremental ? checkpoint.name : nil
                    fromView.recordedBitmap = bitmap
                    fromView.checkpoint = checkpoint.name
                    fromView.checkpointID = checkpoint.id
                    fromView.baseCheckpointID = checkpoint.baseID
                    fromView.baseName = checkpoint.baseName
                    fromView.coveredCheckpointIDs = checkpoint.covers
                    defer { display.finish() }
                    return try BackupJob(options: fromView).run()
                }
            } else {
                defer { display.finish() }
                result = try BackupJob(options: options).run()
            }
            if json {
                let encoder = JSONEncoder()
                encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
                print(String(decoding: try encoder.encode(result), as: UTF8.self))
            } else {
                let seconds = (result.durationSeconds * 100).rounded() / 100
                ProgressDisplay.writeError(
                    "\(result.file): \(kind.rawValue) backup, \(ProgressDisplay.bytes(result.bytesCopied)) copied, "
                        + "\(ProgressDisplay.bytes(result.bytesZeroed)) recorded as zeroes in \(seconds) s\n")
            }
            return result
        }
    }

    struct Full: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "full",
            abstract: "Start a chain: copy every allocated range (holes stay unallocated).")
        @OptionGroup var common: Common
        @Option(help: "With --control: the bitmap to checkpoint, so the next incremental starts here.")
        var bitmap: String?

        func run() throws {
            try common.run(kind: .full, bitmap: bitmap)
        }
    }

    struct Incremental: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "incremental",
            abstract: "Extend the chain with what the bitmap marks dirty.")
        @OptionGroup var common: Common
        @Option(help: "The bitmap whose qemu:dirty-bitmap:NAME context lists the changes (with --control: the live bitmap to checkpoint).")
        var bitmap: String

        func run() throws {
            try common.run(kind: .incremental, bitmap: bitmap)
        }
    }
}
