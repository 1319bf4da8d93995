import ArgumentParser
import BlockStorage
import DirtyTracking

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// `tidemark bitmap …`: manage the persistent bitmaps of an image no server is serving.
struct BitmapCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bitmap",
        abstract: "Manage the persistent bitmaps of an image that no server is serving.",
        discussion: """
            Acts on the sidecar store IMAGE.tidemark/ directly. While a server serves the \
            image it holds the store, and these commands refuse to touch it.
            """,
        subcommands: [Add.self, Remove.self, Clear.self, Enable.self, Disable.self, Merge.self, List.self, Dump.self]
    )

    /// The image argument every subcommand takes.
    struct ImageOptions: ParsableArguments {
        @Argument(help: "The raw image whose bitmaps to manage.")
        var image: String

        /// Opens the store, runs `body` on its tracker, then saves and releases it cleanly.
        func withTracker<Result>(_ body: (DirtyTracker) throws -> Result) throws -> Result {
            let size = try RawImage(path: image, readOnly: true).size
            let (store, contents) = try BitmapStore.open(imagePath: image, imageSize: size)
            let tracker = try DirtyTracker(store: store, contents: contents)
            // A refused operation still leaves the store marked as cleanly closed.
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
    }

    struct Add: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Add a persistent bitmap.")
        @OptionGroup var options: ImageOptions
        @Argument(help: "Bitmap name (1 to 1023 bytes).") var name: String
        @Option(help: "Bytes per bit: a power of two from 512 to 2G (e.g. 64K).") var granularity: String = "64K"
        @Flag(help: "Create it without recording writes.") var disabled = false

        func run() throws {
            guard let bytes = ByteSize.parse(granularity) else {
                throw ValidationError("cannot read granularity '\(granularity)'")
            }
            try options.withTracker { tracker in
                try tracker.add(name: name, granularity: bytes, persistent: true, recording: !disabled)
            }
        }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Remove a bitmap.")
        @OptionGroup var options: ImageOptions
        @Argument var name: String
        func run() throws { try options.withTracker { try $0.remove(name: name) } }
    }

    struct Clear: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Clear every bit of a bitmap.")
        @OptionGroup var options: ImageOptions
        @Argument var name: String
        func run() throws { try options.withTracker { try $0.clear(name: name) } }
    }

    struct Enable: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Start recording writes into a bitmap.")
        @OptionGroup var options: ImageOptions
        @Argument var name: String
        func run() throws { try options.withTracker { try $0.setRecording(name: name, true) } }
    }

    struct Disable: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Stop recording writes into a bitmap.")
        @OptionGroup var options: ImageOptions
        @Argument var name: String
        func run() throws { try options.withTracker { try $0.setRecording(name: name, false) } }
    }

    struct Merge: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "OR source bitmaps into a target (all or nothing).")
        @OptionGroup var options: ImageOptions
        @Argument var target: String
        @Argument(help: "Bitmaps to merge into the target.") var sources: [String]
        func run() throws { try options.withTracker { try $0.merge(target: target, sources: sources) } }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List bitmaps with their flags and dirty counts.")
        @OptionGroup var options: ImageOptions
        @Flag(help: "Print JSON.") var json = false

        func run() throws {
            let bitmaps = try options.withTracker { $0.query() }
            if json {
                try printJSON(bitmaps)
                return
            }
            for bitmap in bitmaps {
                print(
                    "\(bitmap.name)\tgranularity=\(bitmap.granularity)\tcount=\(bitmap.count)\trecording=\(bitmap.recording)\tpersistent=\(bitmap.persistent)\tgeneration=\(bitmap.generation)")
            }
        }
    }

    struct Dump: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Print a bitmap's dirty and clean extents (as nbdinfo --map does).")
        @OptionGroup var options: ImageOptions
        @Argument var name: String
        @Flag(help: "Print JSON.") var json = false

        func run() throws {
            let extents = try options.withTracker { tracker in
                try tracker.extents(name: name, offset: 0, length: tracker.size, maximumExtents: Int.max)
            }
            if json {
                try printJSON(extents)
                return
            }
            for extent in extents {
                let flag = extent.dirty ? 1 : 0
                print("\(extent.offset)\t\(extent.length)\t\(flag)\t\(extent.dirty ? "dirty" : "clean")")
            }
        }
    }
}

/// Prints a value as pretty JSON on stdout.
func printJSON(_ value: some Encodable) throws {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
    let data = try encoder.encode(value)
    print(String(decoding: data, as: UTF8.self))
}
