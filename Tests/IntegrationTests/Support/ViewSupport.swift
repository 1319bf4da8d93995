import Foundation
import NBDClient
import Synchronization
import QMPWire

/// Helpers for the point-in-time view tests: checkpoints with views, the nbdcopy pull
/// recipe, whole-export reads and writers that run for the whole test.
enum Views {
    /// The names `checkpoint-create` with `view: true` returned.
    struct Created {
        var checkpoint: String
        var view: String
        var changes: String
        /// Bytes dirty in the checkpoint's increment.
        var count: UInt64
    }

    /// `checkpoint-create` of `bitmap` with a view; checks the reply names both exports.
    static func create(
        _ client: QMPTestClient, node: String = "disk", bitmap: String = "b0", name: String? = nil,
        extra: [String: QMPJSON] = [:]
    ) throws -> Created {
        var arguments: [String: QMPJSON] = ["node": .string(node), "bitmap": .string(bitmap), "view": true]
        if let name { arguments["name"] = .string(name) }
        arguments.merge(extra) { $1 }
        let reply = try client.run("checkpoint-create", .object(arguments))
        guard let checkpoint = reply["name"]?.stringValue, let view = reply["view"]?.stringValue,
            let changes = reply["changes-view"]?.stringValue, let count = reply["count"]?.intValue
        else { throw HarnessError("checkpoint-create with a view returned \(reply)") }
        return Created(checkpoint: checkpoint, view: view, changes: changes, count: UInt64(count))
    }

    /// The recipe: `nbdcopy --destination-is-zero -S 0 --request-size=GRANULARITY CHANGES
    /// -- [ tidemark serve FILE ]` turns the previous copy `file` into the checkpoint's
    /// image. `-S 0` keeps nbdcopy from skipping blocks it read as zeroes (granules that
    /// changed to zeroes); requests of the bitmap's granularity read only the increment.
    static func pullChanges(_ changesURI: String, into file: String, granularity: Int = 65536) throws {
        try ExternalTool.check(
            "nbdcopy",
            [
                "--destination-is-zero", "-S", "0", "--request-size=\(granularity)", changesURI, "--",
                "[", TidemarkProcess.binaryPath, "serve", file, "]",
            ],
            timeout: 120)
    }

    /// Pulls with `nbdinfo --map=qemu:dirty-bitmap:NAME` and libnbd reads from the view,
    /// writing the dirty extents into `file`. Returns the bytes copied.
    @discardableResult
    static func pullWithMap(viewURI: String, connection: NBDConnection, increment: String, into file: String) throws -> UInt64 {
        let map = try BitmapMaps.nbdinfoMap(uri: viewURI, context: BitmapMaps.context(increment))
        guard let handle = FileHandle(forUpdatingAtPath: file) else { throw HarnessError("cannot open \(file)") }
        defer { try? handle.close() }
        var copied: UInt64 = 0
        for extent in map.extents where extent.flags & BitmapMaps.dirty != 0 {
            var offset = extent.offset
            while offset < extent.end {
                let count = Int(min(extent.end - offset, 4 << 20))
                let data = try connection.pread(count: count, offset: offset)
                try handle.seek(toOffset: offset)
                try handle.write(contentsOf: data)
                offset += UInt64(count)
                copied += UInt64(count)
            }
        }
        try handle.synchronize()
        return copied
    }

    /// Every byte of an export, in 4 MiB reads.
    static func readAll(_ connection: NBDConnection) throws -> [UInt8] {
        let size = try connection.size
        var bytes: [UInt8] = []
        bytes.reserveCapacity(Int(size))
        var offset: UInt64 = 0
        while offset < size {
            let count = Int(min(size - offset, 4 << 20))
            bytes += try connection.pread(count: count, offset: offset)
            offset += UInt64(count)
        }
        return bytes
    }

    /// `qemu-img compare` of a raw file with an NBD export: throws with the tool's words
    /// when they differ.
    static func expectIdentical(_ file: String, _ uri: String) throws {
        let result = try ExternalTool.run("qemu-img", ["compare", "-f", "raw", "-F", "raw", file, uri], timeout: 120)
        guard result.status == 0 else { throw HarnessError("\(file) differs from \(uri): \(result.stdout) \(result.stderr)") }
    }

    /// Sidecar files of views beside an image.
    static func sidecars(image: String) throws -> [String] {
        let directory = BitmapStoreFiles.directory(image: image)
        return try FileManager.default.contentsOfDirectory(atPath: directory).filter { $0.hasPrefix("view-") }.sorted()
    }

    /// Writers on their own connections, running random writes, write-zeroes and trims
    /// until stopped; the test's other steps run meanwhile.
    final class Writers: @unchecked Sendable {
        private let stopFlag = Atomic<Bool>(false)
        private let group = DispatchGroup()
        let failures = Failures()
        private let operations = Atomic<Int>(0)

        init(_ connections: [NBDConnection], size: UInt64, maximumLength: Int = 256 << 10) {
            for (index, connection) in connections.enumerated() {
                group.enter()
                Thread { [self] in
                    defer { group.leave() }
                    var generator = SystemRandomNumberGenerator()
                    while !stopFlag.load(ordering: .relaxed) {
                        let length = Int.random(in: 1...(maximumLength / 512), using: &generator) * 512
                        let offset = UInt64.random(in: 0...((size - UInt64(length)) / 512), using: &generator) * 512
                        do {
                            switch Int.random(in: 0..<10, using: &generator) {
                            case 0..<7:
                                let byte = UInt8.random(in: 1...255, using: &generator)
                                try connection.pwrite(ImageFile.constant(byte, count: length), offset: offset)
                            case 7, 8:
                                try connection.zero(count: UInt64(length), offset: offset)
                            default:
                                try connection.trim(count: UInt64(length), offset: offset)
                            }
                        } catch {
                            failures.add("writer \(index): \(error)")
                            return
                        }
                        operations.add(1, ordering: .relaxed)
                    }
                    do {
                        try connection.flush()
                    } catch {
                        failures.add("writer \(index) flush: \(error)")
                    }
                }.start()
            }
        }

        /// Operations acknowledged so far.
        var count: Int { operations.load(ordering: .relaxed) }

        /// Stops the writers and waits until each has flushed.
        func stop() {
            stopFlag.store(true, ordering: .relaxed)
            group.wait()
        }
    }
}
