import ArgumentParser
import BlockStorage
import DirtyTracking
import QMPWire
import TidemarkControl
import TidemarkServer

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import FoundationEssentials
#endif
#if canImport(Glibc)
import Glibc
#endif

/// `tidemark bitmap …`: manage bitmaps through a running server's control socket
/// (`--control SOCK --export NAME`), or in the store of an image no server is serving
/// (`IMAGE` as the first operand), found by `StoreLocator` as the server finds it.
struct BitmapCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bitmap",
        abstract: "Manage dirty bitmaps, on a running server or offline on an image.",
        discussion: """
            With --control, the command goes to that server's QMP socket and acts on --export. \
            Without it, the first operand is an image or block device, and the command acts on \
            its store (refused while a server holds it), found as `tidemark serve` finds it: \
            IMAGE.tidemark/ beside a regular file; for a block device, or with --state-dir, in \
            the state directory (default /var/lib/tidemark), by the disk's identity.
            """,
        subcommands: [Add.self, Remove.self, Clear.self, Enable.self, Disable.self, Merge.self, List.self, Dump.self]
    )

    /// Where a bitmap command acts.
    struct Target: ParsableArguments {
        @Option(help: "Control socket of a running server.")
        var control: String?

        @Option(help: "Export (node) to act on through --control.")
        var export: String = "disk"

        @Option(
            help: ArgumentHelp(
                "Offline: the state directory the server uses (--state-dir of tidemark serve).", valueName: "DIR"))
        var stateDir: String?

        /// Splits operands into the image (offline only) and the rest.
        func split(_ operands: [String], expecting count: Int, usage: String) throws -> (image: String?, rest: [String]) {
            if control != nil && stateDir != nil {
                // Silently ignoring it would let the user believe another store was used.
                throw ValidationError("--state-dir is for offline use; with --control the server uses its own state directory")
            }
            let needed = control == nil ? count + 1 : count
            guard operands.count >= needed else {
                throw ValidationError(control == nil ? "usage: IMAGE \(usage)" : "usage: --control SOCK [--export NAME] \(usage)")
            }
            if control == nil { return (operands[0], Array(operands.dropFirst())) }
            return (nil, operands)
        }

        /// Runs a QMP command on the server.
        func execute(_ command: String, _ arguments: JSONValue) throws -> JSONValue {
            guard let control else { throw ValidationError("--control is required") }
            return try QMPClient(socketPath: control).execute(command, arguments)
        }

        /// Opens the image's store offline, runs `body` on its tracker, then saves and
        /// releases it as cleanly closed, whether or not `body` succeeded.
        func withTracker<Result>(image: String, _ body: (DirtyTracker) throws -> Result) throws -> Result {
            let opened = try RawImage(path: image, readOnly: true)
            let location = StoreLocator(image: opened, stateDirectory: stateDir)
            if let warning = location.warning { Self.printError("warning: \(warning)") }
            let (store, contents) = try location.open(imageSize: opened.size)
            // Damage found and repaired by over-reporting: the user must hear of it.
            for problem in contents.problems {
                Self.printError("error: \(problem) (generation \(contents.generation))")
            }
            let tracker = try DirtyTracker(store: store, contents: contents)
            let result: Result
            do {
                result = try body(tracker)
            } catch {
                try tracker.save(cleanShutdown: true)
                throw error
            }
            try tracker.save(cleanShutdown: true)
            return result
        }

        /// Writes `tidemark: MESSAGE` to stderr.
        static func printError(_ message: String) {
            let line = Array("tidemark: \(message)\n".utf8)
            _ = line.withUnsafeBytes { Glibc.write(2, $0.baseAddress, $0.count) }
        }

        /// Runs a command whose only operand is a bitmap name.
        func runOnName(
            _ operands: [String], command: String, operation: (String) -> BitmapOperation
        ) throws {
            let (image, rest) = try split(operands, expecting: 1, usage: "NAME")
            try run(image, command: command, arguments: ["name": .string(rest[0])], operation: operation(rest[0]))
        }

        /// Runs one bitmap operation, online as `command` or offline as `operation`.
        func run(_ image: String?, command: String, arguments: [String: JSONValue], operation: BitmapOperation) throws {
            if let image {
                try withTracker(image: image) { try $0.perform([operation]) }
            } else {
                var withNode = arguments
                withNode["node"] = .string(export)
                _ = try execute(command, .object(withNode))
            }
        }
    }

    struct Add: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "add", abstract: "Add a bitmap (persistent unless --transient).")
        @OptionGroup var target: Target
        @Argument(help: "[IMAGE] NAME") var operands: [String] = []
        @Option(help: "Bytes per bit: a power of two from 512 to 2G (e.g. 64K).") var granularity: String = "64K"
        @Flag(help: "Create it without recording writes.") var disabled = false
        @Flag(help: "Keep it in memory only (with --control).") var transient = false

        func run() throws {
            let (image, rest) = try target.split(operands, expecting: 1, usage: "NAME")
            guard let bytes = ByteSize.parse(granularity) else {
                throw ValidationError("cannot read granularity '\(granularity)'")
            }
            try target.run(
                image, command: "block-dirty-bitmap-add",
                arguments: [
                    "name": .string(rest[0]), "granularity": .int(Int64(clamping: bytes)),
                    "persistent": .bool(!transient), "disabled": .bool(disabled),
                ],
                operation: .add(name: rest[0], granularity: bytes, persistent: true, recording: !disabled))
        }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "remove", abstract: "Remove a bitmap.")
        @OptionGroup var target: Target
        @Argument(help: "[IMAGE] NAME") var operands: [String] = []
        func run() throws { try target.runOnName(operands, command: "block-dirty-bitmap-remove") { .remove(name: $0) } }
    }

    struct Clear: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "clear", abstract: "Clear every bit of a bitmap.")
        @OptionGroup var target: Target
        @Argument(help: "[IMAGE] NAME") var operands: [String] = []
        func run() throws { try target.runOnName(operands, command: "block-dirty-bitmap-clear") { .clear(name: $0) } }
    }

    struct Enable: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "enable", abstract: "Start recording writes into a bitmap.")
        @OptionGroup var target: Target
        @Argument(help: "[IMAGE] NAME") var operands: [String] = []
        func run() throws { try target.runOnName(operands, command: "block-dirty-bitmap-enable") { .setRecording(name: $0, true) } }
    }

    struct Disable: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "disable", abstract: "Stop recording writes into a bitmap.")
        @OptionGroup var target: Target
        @Argument(help: "[IMAGE] NAME") var operands: [String] = []
        func run() throws { try target.runOnName(operands, command: "block-dirty-bitmap-disable") { .setRecording(name: $0, false) } }
    }

    struct Merge: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "merge", abstract: "OR source bitmaps into a target (all or nothing).")
        @OptionGroup var target: Target
        @Argument(help: "[IMAGE] TARGET SOURCE...") var operands: [String] = []
        func run() throws {
            let (image, rest) = try target.split(operands, expecting: 2, usage: "TARGET SOURCE...")
            let sources = Array(rest.dropFirst())
            try target.run(
                image, command: "block-dirty-bitmap-merge",
                arguments: ["target": .string(rest[0]), "bitmaps": .array(sources.map { .string($0) })],
                operation: .merge(target: rest[0], sources: sources))
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "list", abstract: "List bitmaps with their flags and dirty counts.")
        @OptionGroup var target: Target
        @Argument(help: "[IMAGE]") var operands: [String] = []
        @Flag(help: "Print JSON.") var json = false

        func run() throws {
            let (image, _) = try target.split(operands, expecting: 0, usage: "")
            let bitmaps: [BitmapInfo]
            if let image {
                bitmaps = try target.withTracker(image: image) { $0.query() }
            } else {
                let nodes = try target.execute("query-named-block-nodes", [:])
                guard case .array(let list) = nodes,
                    let node = list.first(where: { $0["node-name"] == .string(target.export) }),
                    case .array(let entries)? = node["dirty-bitmaps"]
                else { throw ValidationError("the server has no export '\(target.export)'") }
                bitmaps = entries.compactMap(BitmapInfo.init(json:))
            }
            if json {
                try printJSON(bitmaps)
                return
            }
            for bitmap in bitmaps {
                var line = "\(bitmap.name)\tgranularity=\(bitmap.granularity)\tcount=\(bitmap.count)"
                line += "\trecording=\(bitmap.recording)\tbusy=\(bitmap.busy)\tpersistent=\(bitmap.persistent)"
                line += "\tgeneration=\(bitmap.generation)"
                if let origin = bitmap.checkpointOf { line += "\tcheckpoint-of=\(origin)" }
                print(line)
            }
        }
    }

    struct Dump: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "dump",
            abstract: "Print an offline image's bitmap extents (as nbdinfo --map prints them).",
            discussion: "On a running server, read them over NBD: nbdinfo --map=qemu:dirty-bitmap:NAME URI.")
        @Argument(help: "IMAGE NAME") var operands: [String] = []
        @Flag(help: "Print JSON.") var json = false
        @Option(
            help: ArgumentHelp("The state directory the server uses (--state-dir of tidemark serve).", valueName: "DIR"))
        var stateDir: String?

        func run() throws {
            guard operands.count == 2 else { throw ValidationError("usage: IMAGE NAME") }
            var target = Target()
            target.stateDir = stateDir
            let extents = try target.withTracker(image: operands[0]) { tracker in
                try tracker.extents(name: operands[1], offset: 0, length: tracker.size, maximumExtents: Int.max)
            }
            if json {
                try printJSON(extents)
                return
            }
            for extent in extents {
                print("\(extent.offset)\t\(extent.length)\t\(extent.dirty ? 1 : 0)\t\(extent.dirty ? "dirty" : "clean")")
            }
        }
    }
}

extension BitmapInfo {
    /// Reads one entry of `query-named-block-nodes`' `dirty-bitmaps`.
    init?(json: JSONValue) {
        guard case .string(let name)? = json["name"], case .int(let count)? = json["count"],
            case .int(let granularity)? = json["granularity"], case .bool(let recording)? = json["recording"],
            case .bool(let busy)? = json["busy"], case .bool(let persistent)? = json["persistent"]
        else { return nil }
        var generation: UInt64 = 0
        if case .int(let value)? = json["generation"] { generation = UInt64(clamping: value) }
        var origin: String?
        if case .string(let value)? = json["checkpoint-of"] { origin = value }
        self.init(
            name: name, count: UInt64(clamping: count), granularity: UInt64(clamping: granularity),
            recording: recording, busy: busy, persistent: persistent, generation: generation, checkpointOf: origin)
    }
}

/// Prints a value as pretty JSON on stdout.
func printJSON(_ value: some Encodable) throws {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
    let data = try encoder.encode(value)
    print(String(decoding: data, as: UTF8.self))
}
