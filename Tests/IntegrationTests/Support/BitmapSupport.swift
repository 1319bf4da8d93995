import Foundation
import NBDClient

#if canImport(Glibc)
import Glibc
#endif

/// Helpers for the dirty-bitmap interop tests: extent maps, `nbdinfo --map` parsing, the
/// QEMU reference servers and the sidecar store.

/// One extent of a metadata context with absolute offsets: `nbdinfo --map`'s columns.
struct BitmapExtent: Equatable, CustomStringConvertible {
    var offset: UInt64
    var length: UInt64
    var flags: UInt32

    init(_ offset: UInt64, _ length: UInt64, _ flags: UInt32) {
        self.offset = offset
        self.length = length
        self.flags = flags
    }

    var end: UInt64 { offset + length }
    var description: String { "[\(offset), +\(length)) flags \(flags)" }
}

enum BitmapMaps {
    static let kib: UInt64 = 1024
    static let mib: UInt64 = 1 << 20
    static let dirty: UInt32 = 1

    static func context(_ bitmap: String) -> String { "qemu:dirty-bitmap:" + bitmap }

    /// Joins neighbours with equal flags (servers and nbdinfo may or may not).
    static func merged(_ extents: [BitmapExtent]) -> [BitmapExtent] {
        var result: [BitmapExtent] = []
        for extent in extents where extent.length > 0 {
            if let last = result.last, last.flags == extent.flags, last.end == extent.offset {
                result[result.count - 1].length += extent.length
            } else {
                result.append(extent)
            }
        }
        return result
    }

    /// The full map of `[0, size)` for dirty byte runs: clean (0) between them.
    static func bitmapMap(dirty runs: [(UInt64, UInt64)], size: UInt64) -> [BitmapExtent] {
        var result: [BitmapExtent] = []
        var position: UInt64 = 0
        for (offset, length) in runs.sorted(by: { $0.0 < $1.0 }) {
            if offset > position { result.append(BitmapExtent(position, offset - position, 0)) }
            result.append(BitmapExtent(offset, length, dirty))
            position = offset + length
        }
        if position < size { result.append(BitmapExtent(position, size - position, 0)) }
        return merged(result)
    }

    /// Absolute extents from a block-status reply list starting at `offset`.
    static func absolute(_ extents: [NBDExtent], from offset: UInt64) -> [BitmapExtent] {
        var position = offset
        return extents.map { extent in
            defer { position += UInt64(extent.length) }
            return BitmapExtent(position, UInt64(extent.length), extent.flags)
        }
    }

    /// Follows block status for `context` over `[0, size)` (servers may stop short) and
    /// returns its merged extents, clipped to the range.
    static func map(_ connection: NBDConnection, context: String, size: UInt64) throws -> [BitmapExtent] {
        var result: [BitmapExtent] = []
        var position: UInt64 = 0
        while position < size {
            let count = min(size - position, UInt64(UInt32.max) & ~4095)
            let status = try connection.blockStatus(count: count, offset: position)
            guard let extents = status[context], !extents.isEmpty else {
                throw HarnessError("block status at \(position) returned no \(context) extents: \(status.keys.sorted())")
            }
            for extent in absolute(extents, from: position) {
                guard extent.length > 0 else { throw HarnessError("zero-length \(context) extent at \(extent.offset)") }
                let clipped = BitmapExtent(extent.offset, min(extent.length, size - extent.offset), extent.flags)
                result.append(clipped)
                position = clipped.end
                if position >= size { break }
            }
        }
        return merged(result)
    }

    /// Parses `nbdinfo --map` output: `offset length type description` per line.
    static func parseNBDInfoMap(_ output: String) throws -> [(extent: BitmapExtent, description: String)] {
        try output.split(separator: "\n").compactMap { line in
            let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            guard !fields.isEmpty else { return nil }
            guard fields.count >= 4, let offset = UInt64(fields[0]), let length = UInt64(fields[1]),
                let type = UInt32(fields[2])
            else { throw HarnessError("unexpected nbdinfo --map line: '\(line)'") }
            return (BitmapExtent(offset, length, type), fields[3...].joined(separator: " "))
        }
    }

    /// `nbdinfo --map[=CONTEXT] URI`, parsed and merged; descriptions checked against the flags.
    static func nbdinfoMap(uri: String, context: String? = nil) throws -> (text: String, extents: [BitmapExtent]) {
        let option = context.map { "--map=" + $0 } ?? "--map"
        let result = try ExternalTool.check("nbdinfo", [option, uri], timeout: 60)
        let entries = try parseNBDInfoMap(result.stdout)
        for entry in entries {
            let expected: String
            switch (context?.hasPrefix("qemu:dirty-bitmap:") ?? false, entry.extent.flags) {
            case (true, 0): expected = "clean"
            case (true, 1): expected = "dirty"
            case (false, 0): expected = "data"
            case (false, 3): expected = "hole,zero"
            case (false, 2): expected = "zero"
            case (false, 1): expected = "hole"
            default: expected = "?"
            }
            if entry.description != expected {
                throw HarnessError("nbdinfo described \(entry.extent) as '\(entry.description)', expected '\(expected)':\n\(result.stdout)")
            }
        }
        return (result.stdout, merged(entries.map(\.extent)))
    }

    /// The file's allocation as `base:allocation` should report it, from SEEK_DATA/SEEK_HOLE
    /// on the file itself (data 0, hole 3 = HOLE|ZERO).
    static func fileAllocation(_ path: String) throws -> [BitmapExtent] {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { throw HarnessError("open \(path): errno \(errno)") }
        defer { close(fd) }
        let size = UInt64(lseek(fd, 0, SEEK_END))
        var result: [BitmapExtent] = []
        var position: UInt64 = 0
        while position < size {
            let data = lseek(fd, off_t(position), 3 /* SEEK_DATA, hidden by Glibc's module */)
            if data < 0 {
                result.append(BitmapExtent(position, size - position, 3))
                break
            }
            if UInt64(data) > position {
                result.append(BitmapExtent(position, UInt64(data) - position, 3))
                position = UInt64(data)
                continue
            }
            let hole = UInt64(max(lseek(fd, off_t(position), 4 /* SEEK_HOLE */), off_t(position + 1)))
            let end = min(hole, size)
            result.append(BitmapExtent(position, end - position, 0))
            position = end
        }
        return merged(result)
    }

    /// The dirty runs of a map.
    static func dirtyRuns(_ extents: [BitmapExtent]) -> [BitmapExtent] {
        extents.filter { $0.flags & dirty != 0 }
    }

    /// True when every byte of `[offset, offset+length)` is in a dirty extent of `map`.
    static func isDirty(_ map: [BitmapExtent], offset: UInt64, length: UInt64) -> Bool {
        var position = offset
        for extent in map where extent.flags & dirty != 0 && extent.offset <= position && position < extent.end {
            position = extent.end
            if position >= offset + length { return true }
        }
        return position >= offset + length
    }
}

// MARK: - The sidecar store

enum BitmapStoreFiles {
    static func directory(image: String) -> String { image + ".tidemark" }
    static func statePath(image: String) -> String { directory(image: image) + "/state.json" }

    /// `IMAGE.tidemark/state.json`, parsed.
    static func state(image: String) throws -> [String: Any] {
        let path = statePath(image: image)
        guard let data = FileManager.default.contents(atPath: path) else { throw HarnessError("cannot read \(path)") }
        guard let object = try JSONSerialization.jsonObject(with: data) as? [String: Any] else {
            throw HarnessError("\(path) is not a JSON object: \(String(decoding: data, as: UTF8.self))")
        }
        return object
    }
}

// MARK: - Reference servers

/// A QEMU program serving NBD on a Unix socket (qemu-nbd, qemu-storage-daemon), killed when
/// released. Output goes to files in `directory`.
final class BitmapReferenceServer: @unchecked Sendable {
    let process = Process()
    let socketPath: String
    let name: String
    let stdoutPath: String
    let stderrPath: String
    private let input: Pipe?

    /// Starts `program arguments` and waits until `socketPath` accepts connections and
    /// `ready(stdout)` holds.
    init(
        _ program: String, _ arguments: [String], socketPath: String, directory: TestDirectory,
        stdinLines: [String]? = nil, timeout: TimeInterval = 30, ready: (String) throws -> Bool = { _ in true }
    ) throws {
        self.name = program
        self.socketPath = socketPath
        // The program may be an absolute path (qemu 10's tools under .tools/qemu-10).
        let baseName = URL(fileURLWithPath: program).lastPathComponent
        stdoutPath = directory.file(baseName + ".out")
        stderrPath = directory.file(baseName + ".err")
        let executable = try ExternalTool.locate(program)
        _ = FileManager.default.createFile(atPath: stdoutPath, contents: nil)
        _ = FileManager.default.createFile(atPath: stderrPath, contents: nil)
        guard let out = FileHandle(forWritingAtPath: stdoutPath), let err = FileHandle(forWritingAtPath: stderrPath) else {
            throw HarnessError("cannot open output files for \(program)")
        }
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        process.standardOutput = out
        process.standardError = err
        if stdinLines != nil {
            let pipe = Pipe()
            process.standardInput = pipe
            input = pipe
        } else {
            process.standardInput = FileHandle.nullDevice
            input = nil
        }
        try process.run()
        try? out.close()
        try? err.close()
        if let stdinLines, let input {
            // Kept open: QEMU's stdio monitor exits on EOF.
            input.fileHandleForWriting.write(Data(stdinLines.map { $0 + "\n" }.joined().utf8))
        }
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            if !process.isRunning {
                throw HarnessError("\(program) \(arguments.joined(separator: " ")) exited (\(process.terminationStatus)):\n\(log)")
            }
            if Self.accepts(socketPath), try ready(stdout) { break }
            if Date() > deadline {
                throw HarnessError("\(program) was not ready within \(Int(timeout)) s:\n\(log)")
            }
            usleep(20_000)
        }
    }

    var stdout: String { (try? String(contentsOfFile: stdoutPath, encoding: .utf8)) ?? "" }
    var stderr: String { (try? String(contentsOfFile: stderrPath, encoding: .utf8)) ?? "" }
    var log: String { "stdout:\n\(stdout)\nstderr:\n\(stderr)" }

    func uri(export: String) -> String { "nbd+unix:///\(export)?socket=\(socketPath)" }

    /// Kills the server. Its state no longer matters once the map was taken (qemu-nbd
    /// exports read-only, the storage daemon's bitmap is not persistent), and qemu-nbd
    /// started from the test runner can take 10 s or more to act on SIGTERM.
    func stop() {
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
        try? input?.fileHandleForWriting.close()
    }

    deinit { stop() }

    /// True when a Unix socket at `path` accepts a connection.
    static func accepts(_ path: String) -> Bool {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { return false }
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: bytes) }
        return withUnsafePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) == 0
            }
        }
    }

    /// `qemu-nbd -t -r -k SOCK -f FORMAT -B BITMAP -x EXPORT IMAGE`: a read-only export of
    /// an image's persistent bitmap.
    static func qemuNBD(
        image: String, format: String, bitmap: String, export: String, directory: TestDirectory,
        release: QemuRelease = .qemu7
    ) throws -> BitmapReferenceServer {
        let socket = directory.file("qemu-nbd.sock")
        return try BitmapReferenceServer(
            try release.tool("qemu-nbd"), ["-t", "-r", "-k", socket, "-f", format, "-B", bitmap, "-x", export, image],
            socketPath: socket, directory: directory)
    }

    /// qemu-storage-daemon serving a raw image writable, with a non-persistent bitmap added
    /// over QMP before the export, so writes over NBD are recorded as QEMU records them.
    /// Discards are passed down (`discard=unmap`) so they are recorded too, as Tidemark does.
    static func storageDaemon(
        rawImage: String, bitmap: String, granularity: UInt64 = 65536, export: String, directory: TestDirectory,
        release: QemuRelease = .qemu7
    ) throws -> BitmapReferenceServer {
        let socket = directory.file("qsd.sock")
        let commands = [
            #"{"execute":"qmp_capabilities"}"#,
            #"{"execute":"block-dirty-bitmap-add","arguments":{"node":"fmt","name":"\#(bitmap)","granularity":\#(granularity)}}"#,
            #"{"execute":"block-export-add","arguments":{"type":"nbd","id":"e0","node-name":"fmt","name":"\#(export)","writable":true,"bitmaps":["\#(bitmap)"]}}"#,
        ]
        return try BitmapReferenceServer(
            try release.tool("qemu-storage-daemon"),
            [
                "--blockdev", "driver=file,filename=\(rawImage),node-name=proto,discard=unmap",
                "--blockdev", "driver=raw,file=proto,node-name=fmt,discard=unmap",
                "--nbd-server", "addr.type=unix,addr.path=\(socket)",
                "--chardev", "stdio,id=qmp", "--monitor", "chardev=qmp",
            ],
            socketPath: socket, directory: directory, stdinLines: commands
        ) { output in
            if output.contains("\"error\"") { throw HarnessError("QMP command failed:\n\(output)") }
            return output.components(separatedBy: "\"return\"").count - 1 >= commands.count
        }
    }
}

// MARK: - Image comparison

enum BitmapImages {
    /// Indices of the `granule`-byte blocks where the two files differ (a missing tail
    /// counts as zeroes).
    static func differingGranules(_ first: String, _ second: String, granule: Int) throws -> [Int] {
        guard let a = FileHandle(forReadingAtPath: first), let b = FileHandle(forReadingAtPath: second) else {
            throw HarnessError("cannot open \(first) or \(second)")
        }
        defer {
            try? a.close()
            try? b.close()
        }
        let chunk = granule * 128
        var result: [Int] = []
        var base = 0
        while true {
            var left = [UInt8](try a.read(upToCount: chunk) ?? Data())
            var right = [UInt8](try b.read(upToCount: chunk) ?? Data())
            if left.isEmpty && right.isEmpty { break }
            let count = max(left.count, right.count)
            left += [UInt8](repeating: 0, count: count - left.count)
            right += [UInt8](repeating: 0, count: count - right.count)
            left.withUnsafeBytes { l in
                right.withUnsafeBytes { r in
                    var start = 0
                    while start < count {
                        let length = min(granule, count - start)
                        if memcmp(l.baseAddress! + start, r.baseAddress! + start, length) != 0 {
                            result.append((base + start) / granule)
                        }
                        start += granule
                    }
                }
            }
            base += count
        }
        return result
    }
}
