import ArgumentParser
import DirtyTracking
import QMPWire
import TidemarkControl

/// `tidemark checkpoint create|complete|abort`: the one-step checkpoint on a running server.
struct CheckpointCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "checkpoint",
        abstract: "Freeze a bitmap into a read-only increment, then complete or abort it.",
        discussion: """
            create: the bitmap's content becomes increment NAME (exported as \
            qemu:dirty-bitmap:NAME) and the bitmap keeps recording from empty, or stops with \
            --consume; with --view, the image as it is at that instant is exported read-only \
            as EXPORT@NAME while writers go on. complete: the backup succeeded, the increment is released. abort: the \
            backup failed, the increment is merged back so no change is lost.
            """,
        subcommands: [Create.self, Complete.self, Abort.self]
    )

    struct Connection: ParsableArguments {
        @Option(help: "Control socket of the running server.") var control: String
        @Option(help: "Export (node) name.") var export: String = "disk"
        @Flag(help: "Print the reply as JSON.") var json = false

        func execute(_ command: String, _ arguments: [String: JSONValue]) throws -> JSONValue {
            var withNode = arguments
            withNode["node"] = .string(export)
            return try QMPClient(socketPath: control).execute(command, .object(withNode))
        }
    }

    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "create", abstract: "Create a checkpoint of a bitmap.")
        @OptionGroup var connection: Connection
        @Option(help: "The bitmap to checkpoint.") var bitmap: String
        @Option(help: "Name of the checkpoint and its increment (default: c1, c2, …).") var name: String?
        @Flag(help: "End tracking instead of restarting it from empty.") var consume = false
        @Flag(
            help: ArgumentHelp(
                "Open a point-in-time view: read-only exports EXPORT@NAME (the image at the checkpoint) and EXPORT@NAME.changes (its base:allocation is the increment).",
                discussion: "The view closes when the checkpoint completes or aborts."))
        var view = false

        func run() throws {
            var arguments: [String: JSONValue] = [
                "bitmap": .string(bitmap), "consume": .bool(consume),
                // The command line exits right away; a disconnect here is not a failed backup.
                "abort-on-disconnect": false,
            ]
            if let name { arguments["name"] = .string(name) }
            if view { arguments["view"] = true }
            let reply = try connection.execute("checkpoint-create", arguments)
            if connection.json {
                print(reply.serialized())
            } else if case .string(let created)? = reply["name"] {
                // One line: the checkpoint, then its view exports when one was opened.
                let views = ["view", "changes-view"].compactMap { key -> String? in
                    if case .string(let name)? = reply[key] { return name }
                    return nil
                }
                print(([created] + views).joined(separator: "\t"))
            }
        }
    }

    struct Complete: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "complete", abstract: "The backup succeeded: release the increment.")
        @OptionGroup var connection: Connection
        @Argument(help: "Checkpoint name.") var name: String
        func run() throws { _ = try connection.execute("checkpoint-complete", ["name": .string(name)]) }
    }

    struct Abort: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "abort", abstract: "The backup failed: merge the increment back.")
        @OptionGroup var connection: Connection
        @Argument(help: "Checkpoint name.") var name: String
        func run() throws { _ = try connection.execute("checkpoint-abort", ["name": .string(name)]) }
    }
}

/// `tidemark query`: exports and bitmaps of a running server.
struct QueryCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "query", abstract: "Show a running server's exports and their bitmaps.")
    @Option(help: "Control socket of the running server.") var control: String
    @Flag(help: "Print JSON (query-named-block-nodes).") var json = false

    func run() throws {
        let nodes = try QMPClient(socketPath: control).execute("query-named-block-nodes")
        if json {
            print(nodes.serialized())
            return
        }
        guard case .array(let list) = nodes else { return }
        for node in list {
            guard case .string(let name)? = node["node-name"] else { continue }
            var line = "export \(name)"
            if case .string(let file)? = node["file"] { line += "\tfile=\(file)" }
            if case .bool(let readOnly)? = node["ro"] { line += "\tread-only=\(readOnly)" }
            print(line)
            if case .array(let bitmaps)? = node["dirty-bitmaps"] {
                for bitmap in bitmaps.compactMap(BitmapInfo.init(json:)) {
                    var entry = "  bitmap \(bitmap.name)\tcount=\(bitmap.count)\tgranularity=\(bitmap.granularity)"
                    entry += "\trecording=\(bitmap.recording)\tbusy=\(bitmap.busy)\tpersistent=\(bitmap.persistent)"
                    entry += "\tgeneration=\(bitmap.generation)"
                    if let origin = bitmap.checkpointOf { entry += "\tcheckpoint-of=\(origin)" }
                    print(entry)
                }
            }
        }
    }
}
