import Foundation
import NBDClient
import Testing
import QMPWire

#if canImport(Glibc)
import Glibc
#endif

/// Support for the control-plane tests: a JSON value, a small blocking QMP client over a
/// raw Unix socket, a server fixture with `--control`, and runners for `/usr/bin/python3`
/// (qemu.qmp, qmp-shell) and the `tidemark` CLI.

// MARK: - JSON

/// QMP replies and commands as the control plane's own JSON value, so tests can tell a
/// boolean from a number and compare replies exactly. Parsing stays Foundation's decoder,
/// not the server's parser, so a parser bug cannot hide in what the tests read.
typealias QMPJSON = JSONValue

extension JSONValue {
    static func parse(_ text: String) throws -> JSONValue {
        do {
            return try JSONDecoder().decode(JSONValue.self, from: Data(text.utf8))
        } catch {
            throw HarnessError("not JSON: \(error)\n\(text)")
        }
    }

    subscript(index: Int) -> JSONValue? {
        if case .array(let elements) = self, elements.indices.contains(index) { return elements[index] }
        return nil
    }

    var stringValue: String? { if case .string(let value) = self { value } else { nil } }
    var intValue: Int64? { if case .int(let value) = self { value } else { nil } }
    var boolValue: Bool? { if case .bool(let value) = self { value } else { nil } }
    var arrayValue: [JSONValue]? { if case .array(let value) = self { value } else { nil } }
    var objectValue: [String: JSONValue]? { if case .object(let value) = self { value } else { nil } }
}

// MARK: - A raw QMP client

/// An error reply: `{"error": {"class", "desc"}}`.
struct QMPReplyError: Error, Equatable, CustomStringConvertible {
    var errorClass: String
    var desc: String
    var description: String { "\(errorClass): \(desc)" }
}

/// A blocking QMP client written against the wire format only (no Tidemark code), so the
/// tests see exactly the bytes the server sends. Every read has a deadline: a server that
/// stops answering fails the test instead of hanging it.
final class QMPTestClient: @unchecked Sendable {
    let path: String
    private(set) var fd: Int32
    private var buffer: [UInt8] = []
    /// The greeting, as received.
    private(set) var greeting: QMPJSON = .null
    /// Events received while waiting for replies, oldest first.
    var events: [QMPJSON] = []
    private var nextID: Int64 = 1

    /// Connects and reads the greeting; with `negotiate`, runs `qmp_capabilities` too.
    init(path: String, negotiate: Bool = true, timeout: TimeInterval = 10) throws {
        self.path = path
        fd = try Self.connectUnix(path)
        greeting = try receive(timeout: timeout)
        guard greeting["QMP"] != nil else {
            close()
            throw HarnessError("\(path) did not greet like a QMP server: \(greeting)")
        }
        if negotiate {
            let reply = try request(["execute": "qmp_capabilities"], timeout: timeout)
            guard reply["return"] == [:] else { throw HarnessError("qmp_capabilities failed: \(reply)") }
        }
    }

    deinit { close() }

    func close() {
        if fd >= 0 {
            Glibc.close(fd)
            fd = -1
        }
    }

    static func connectUnix(_ path: String) throws -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw HarnessError("socket: errno \(errno)") }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
            Glibc.close(fd)
            throw HarnessError("socket path too long: \(path)")
        }
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: bytes) }
        let result = withUnsafePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        guard result == 0 else {
            let code = errno
            Glibc.close(fd)
            throw HarnessError("cannot connect to \(path): errno \(code)")
        }
        return fd
    }

    // MARK: Sending

    func sendRaw(_ bytes: [UInt8]) throws {
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { raw in
                Glibc.send(fd, raw.baseAddress! + done, raw.count - done, Int32(MSG_NOSIGNAL))
            }
            if n < 0 {
                if errno == EINTR { continue }
                throw HarnessError("send on the QMP socket failed: errno \(errno)")
            }
            done += n
        }
    }

    func sendRaw(_ text: String) throws { try sendRaw(Array(text.utf8)) }

    func send(_ message: QMPJSON) throws { try sendRaw(message.serialized() + "\n") }

    // MARK: Receiving

    /// The next message of any kind (reply or event). Throws on timeout or EOF.
    func receive(timeout: TimeInterval = 10) throws -> QMPJSON {
        guard let message = try receiveIfAny(timeout: timeout) else {
            throw HarnessError("no QMP message within \(timeout) s on \(path)")
        }
        return message
    }

    /// The next message, or nil when none came within `timeout`. Throws on EOF.
    func receiveIfAny(timeout: TimeInterval) throws -> QMPJSON? {
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            if let newline = buffer.firstIndex(of: UInt8(ascii: "\n")) {
                let line = String(decoding: buffer[..<newline], as: UTF8.self)
                buffer.removeSubrange(...newline)
                let trimmed = line.trimmingCharacters(in: .whitespacesAndNewlines)
                if trimmed.isEmpty { continue }
                return try QMPJSON.parse(trimmed)
            }
            let remaining = deadline.timeIntervalSinceNow
            if remaining <= 0 { return nil }
            var descriptor = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ready = poll(&descriptor, 1, Int32(min(remaining * 1000 + 1, 60_000)))
            if ready < 0 {
                if errno == EINTR { continue }
                throw HarnessError("poll failed: errno \(errno)")
            }
            if ready == 0 { continue }
            var chunk = [UInt8](repeating: 0, count: 65536)
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                throw QMPConnectionClosed(detail: "read failed: errno \(errno)")
            }
            if n == 0 { throw QMPConnectionClosed(detail: "the server closed the connection") }
            buffer += chunk[0..<n]
        }
    }

    /// The next message that is not an event (events are queued in `events`).
    func receiveReply(timeout: TimeInterval = 10) throws -> QMPJSON {
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            let message = try receive(timeout: max(0.01, deadline.timeIntervalSinceNow))
            if message["event"] != nil {
                events.append(message)
                continue
            }
            return message
        }
    }

    /// Sends `message` as is and returns the next reply.
    func request(_ message: QMPJSON, timeout: TimeInterval = 10) throws -> QMPJSON {
        try send(message)
        return try receiveReply(timeout: timeout)
    }

    /// Runs a command with a fresh numeric id and returns the whole reply, whose id is checked.
    func execute(_ command: String, _ arguments: QMPJSON? = nil, timeout: TimeInterval = 30) throws -> QMPJSON {
        let id = nextID
        nextID += 1
        var message: [String: QMPJSON] = ["execute": .string(command), "id": .int(id)]
        if let arguments { message["arguments"] = arguments }
        let reply = try request(.object(message), timeout: timeout)
        guard reply["id"] == .int(id) else {
            throw HarnessError("reply to \(command) carries id \(reply["id"].map { "\($0)" } ?? "none"), expected \(id): \(reply)")
        }
        return reply
    }

    /// Runs a command and returns its `return` value; an error reply throws `QMPReplyError`.
    @discardableResult
    func run(_ command: String, _ arguments: QMPJSON? = nil, timeout: TimeInterval = 30) throws -> QMPJSON {
        let reply = try execute(command, arguments, timeout: timeout)
        if let value = reply["return"] { return value }
        if let error = try Self.error(of: reply) { throw error }
        throw HarnessError("reply to \(command) has neither return nor error: \(reply)")
    }

    /// The error of a reply, checked for QMP's shape (`class` and `desc` strings, nothing else).
    static func error(of reply: QMPJSON) throws -> QMPReplyError? {
        guard let error = reply["error"] else { return nil }
        guard case .object(let members) = error, let errorClass = members["class"]?.stringValue,
            let desc = members["desc"]?.stringValue, Set(members.keys) == ["class", "desc"]
        else { throw HarnessError("malformed QMP error: \(reply)") }
        guard reply["return"] == nil else { throw HarnessError("reply has both return and error: \(reply)") }
        return QMPReplyError(errorClass: errorClass, desc: desc)
    }

    /// Runs a command expected to fail, and returns its error.
    func failure(_ command: String, _ arguments: QMPJSON? = nil) throws -> QMPReplyError {
        let reply = try execute(command, arguments)
        guard let error = try Self.error(of: reply) else {
            throw HarnessError("\(command) \(arguments.map { "\($0)" } ?? "") succeeded, expected an error: \(reply)")
        }
        return error
    }

    /// Waits for an event named `name` (taking it from the queue first), matching `filter`.
    func waitForEvent(
        _ name: String, timeout: TimeInterval = 10, where filter: (QMPJSON) -> Bool = { _ in true }
    ) throws -> QMPJSON {
        if let index = events.firstIndex(where: { $0["event"] == .string(name) && filter($0) }) {
            return events.remove(at: index)
        }
        let deadline = Date().addingTimeInterval(timeout)
        while deadline.timeIntervalSinceNow > 0 {
            guard let message = try receiveIfAny(timeout: deadline.timeIntervalSinceNow) else { break }
            if message["event"] == .string(name) && filter(message) { return message }
            if message["event"] != nil { events.append(message) }
        }
        throw HarnessError("no \(name) event within \(timeout) s; other events: \(events)")
    }

    /// Reads whatever arrives within `timeout` (events and replies alike).
    func drain(timeout: TimeInterval) throws -> [QMPJSON] {
        var messages: [QMPJSON] = []
        let deadline = Date().addingTimeInterval(timeout)
        while deadline.timeIntervalSinceNow > 0, let message = try receiveIfAny(timeout: deadline.timeIntervalSinceNow) {
            messages.append(message)
        }
        return messages
    }
}

struct QMPConnectionClosed: Error, CustomStringConvertible {
    let detail: String
    var description: String { "QMP connection closed: \(detail)" }
}

/// Runs `command` expecting the error `desc` of class `errorClass`, recording an issue otherwise.
func expectQMPError(
    _ client: QMPTestClient, _ command: String, _ arguments: QMPJSON? = nil,
    class errorClass: String = "GenericError", _ desc: String,
    sourceLocation: SourceLocation = #_sourceLocation
) {
    do {
        let error = try client.failure(command, arguments)
        #expect(error == QMPReplyError(errorClass: errorClass, desc: desc), "\(command) \(arguments.map { "\($0)" } ?? "")", sourceLocation: sourceLocation)
    } catch {
        Issue.record("\(command) \(arguments.map { "\($0)" } ?? ""): \(error)", sourceLocation: sourceLocation)
    }
}

// MARK: - Server fixture

/// A Tidemark serving one image on a Unix socket with a QMP control socket beside it.
final class ControlFixture: @unchecked Sendable {
    static let defaultSize = 16 << 20

    let directory: TestDirectory
    let image: String
    let controlPath: String
    let server: TidemarkProcess
    let exportName: String
    let size: UInt64

    /// `tidemark serve image.raw --name NAME --unix SOCK --control CTL EXTRA...`, or with
    /// `empty`, `tidemark serve --empty --unix SOCK --control CTL EXTRA...` (the image is
    /// still created, for `block-export-add`). `prepare` runs in the test's directory
    /// before the server starts and returns more arguments (e.g. `--export` of more images).
    init(
        size: Int = ControlFixture.defaultSize, filled: Bool = false, name: String = "disk", empty: Bool = false,
        extraArguments: [String] = [], prepare: ((TestDirectory) throws -> [String])? = nil
    ) throws {
        let directory = try TestDirectory()
        self.directory = directory
        let extraArguments = try extraArguments + (prepare?(directory) ?? [])
        image = directory.file("image.raw")
        controlPath = directory.file("qmp.sock")
        exportName = name
        self.size = UInt64(size)
        if filled {
            try ImageFile.createFilled(image, size: size)
        } else {
            try ImageFile.createSparse(image, size: size)
        }
        if empty {
            server = try TidemarkProcess(
                arguments: ["serve", "--empty", "--unix", directory.socketPath, "--control", controlPath] + extraArguments,
                directory: directory)
        } else {
            server = try TidemarkProcess.serve(
                image: image, name: name, in: directory, extraArguments: ["--control", controlPath] + extraArguments)
        }
    }

    deinit {
        if server.isRunning {
            _ = try? server.stop(signal: SIGKILL, timeout: 10)
        }
    }

    /// A second server on the same image (after `server` stopped), on new sockets, and
    /// the path of its control socket. The caller stops it.
    func restart(extraArguments: [String] = [], suffix: String = "2") throws -> (server: TidemarkProcess, controlPath: String) {
        let control = directory.file("qmp\(suffix).sock")
        let restarted = try TidemarkProcess(
            arguments: ["serve", image, "--unix", directory.file("nbd\(suffix).sock"), "--control", control]
                + extraArguments,
            directory: directory)
        return (restarted, control)
    }

    /// A negotiated QMP client.
    func qmp(negotiate: Bool = true) throws -> QMPTestClient {
        try QMPTestClient(path: controlPath, negotiate: negotiate)
    }

    /// A libnbd connection to `export` (default: this fixture's) with `contexts`.
    func connect(export: String? = nil, contexts: [String] = []) throws -> NBDConnection {
        try server.connect(export: export ?? exportName) { $0.metaContexts = contexts }
    }

    /// `nbd+unix:///EXPORT?socket=SOCK`.
    func uri(export: String? = nil) throws -> String {
        try server.unixURI(export: export ?? exportName)
    }

    /// The bitmap's merged extents read through libnbd (a fresh connection asking for
    /// `qemu:dirty-bitmap:NAME` only).
    func bitmapMap(_ bitmap: String, export: String? = nil) throws -> [BitmapExtent] {
        let context = BitmapMaps.context(bitmap)
        let connection = try connect(export: export, contexts: [context])
        defer { try? connection.shutdown() }
        guard try connection.canMetaContext(context) else {
            throw HarnessError("the server does not offer \(context)")
        }
        return try BitmapMaps.map(connection, context: context, size: connection.size)
    }

    /// True when a fresh connection is offered `qemu:dirty-bitmap:NAME`.
    func offersBitmap(_ bitmap: String, export: String? = nil) throws -> Bool {
        let context = BitmapMaps.context(bitmap)
        let connection = try connect(export: export, contexts: [context])
        defer { try? connection.shutdown() }
        return try connection.canMetaContext(context)
    }

    /// Writes `length` bytes of `byte` at `offset` on a fresh connection.
    func write(_ runs: [(offset: UInt64, length: Int)], byte: UInt8 = 0x5A, export: String? = nil) throws {
        let connection = try connect(export: export)
        defer { try? connection.shutdown() }
        for run in runs {
            try connection.pwrite(ImageFile.constant(byte, count: run.length), offset: run.offset)
        }
    }

    /// `dirty-bitmaps` of the export in `query-named-block-nodes`, keyed by name.
    static func bitmaps(_ client: QMPTestClient, node: String = "disk") throws -> [String: QMPJSON] {
        let nodes = try client.run("query-named-block-nodes")
        guard let entry = nodes.arrayValue?.first(where: { $0["node-name"] == .string(node) }) else {
            throw HarnessError("no node \(node) in \(nodes)")
        }
        guard let list = entry["dirty-bitmaps"]?.arrayValue else { throw HarnessError("node \(node) lacks dirty-bitmaps: \(entry)") }
        var result: [String: QMPJSON] = [:]
        for bitmap in list {
            guard let name = bitmap["name"]?.stringValue else { throw HarnessError("bitmap without a name: \(bitmap)") }
            result[name] = bitmap
        }
        return result
    }
}

// MARK: - External programs

/// Runs programs by absolute path (`/usr/bin/python3`, the tidemark binary), with optional
/// standard input, output to files, and a deadline.
enum ControlPrograms {
    static let python = "/usr/bin/python3"

    @discardableResult
    static func run(
        _ executable: String, _ arguments: [String], stdin: String? = nil, timeout: TimeInterval = 60,
        environment: [String: String] = [:], currentDirectory: String? = nil
    ) throws -> ToolResult {
        guard FileManager.default.isExecutableFile(atPath: executable) else {
            throw HarnessError("required program \(executable) is not installed (run scripts/setup)")
        }
        let directory = try TestDirectory()
        let outPath = directory.file("stdout")
        let errPath = directory.file("stderr")
        let inPath = directory.file("stdin")
        _ = FileManager.default.createFile(atPath: outPath, contents: nil)
        _ = FileManager.default.createFile(atPath: errPath, contents: nil)
        _ = FileManager.default.createFile(atPath: inPath, contents: Data((stdin ?? "").utf8))
        guard let out = FileHandle(forWritingAtPath: outPath), let err = FileHandle(forWritingAtPath: errPath),
            let input = FileHandle(forReadingAtPath: inPath)
        else { throw HarnessError("cannot open files for \(executable)") }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        process.standardOutput = out
        process.standardError = err
        process.standardInput = stdin == nil ? FileHandle.nullDevice : input
        var merged = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        merged["HOME"] = environment["HOME"] ?? directory.path  // qmp-shell writes its history there
        process.environment = merged
        if let currentDirectory { process.currentDirectoryURL = URL(fileURLWithPath: currentDirectory) }
        let command = ([executable] + arguments).joined(separator: " ")
        try process.run()
        let deadline = Date().addingTimeInterval(timeout)
        while process.isRunning && Date() < deadline { usleep(5_000) }
        if process.isRunning {
            process.killTree()
            throw HarnessError(
                "`\(command)` did not finish within \(Int(timeout)) s; stderr:\n"
                    + ((try? String(contentsOfFile: errPath, encoding: .utf8)) ?? ""))
        }
        process.waitUntilExit()
        try? out.close()
        try? err.close()
        try? input.close()
        return ToolResult(
            command: command, status: process.terminationStatus,
            stdout: (try? String(contentsOfFile: outPath, encoding: .utf8)) ?? "",
            stderr: (try? String(contentsOfFile: errPath, encoding: .utf8)) ?? "")
    }

    /// Fails (throws) when `/usr/bin/python3` cannot import qemu.qmp.
    static func requireQEMUQMP() throws {
        let result = try run(python, ["-c", "import qemu.qmp"], timeout: 30)
        guard result.succeeded else {
            throw HarnessError("/usr/bin/python3 cannot import qemu.qmp (run scripts/setup): \(result.stderr)")
        }
    }

    /// Runs a Python script (written to a file) with `arguments`.
    static func python(script: String, _ arguments: [String], stdin: String? = nil, timeout: TimeInterval = 60) throws -> ToolResult {
        let directory = try TestDirectory()
        let path = directory.file("script.py")
        guard FileManager.default.createFile(atPath: path, contents: Data(script.utf8)) else {
            throw HarnessError("cannot write \(path)")
        }
        return try run(python, [path] + arguments, stdin: stdin, timeout: timeout)
    }

    /// `tidemark ARGUMENTS` (the binary under test).
    @discardableResult
    static func tidemark(_ arguments: [String], timeout: TimeInterval = 60) throws -> ToolResult {
        try run(TidemarkProcess.binaryPath, arguments, timeout: timeout)
    }
}

// MARK: - Time

/// Monotonic nanoseconds, comparable across threads.
func monotonicNanoseconds() -> UInt64 {
    var now = timespec()
    clock_gettime(CLOCK_MONOTONIC, &now)
    return UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
}

extension JSONValue {
    /// The keys a checkpoint reply or query entry carries about its lineage.
    static let lineageKeys: Set<String> = ["id", "base", "base-id", "covers", "abort-on-disconnect"]

    /// The object without `keys` (arrays: each element without them), to compare the rest
    /// exactly.
    func removing(_ keys: Set<String>) -> JSONValue {
        switch self {
        case .object(let fields): return .object(fields.filter { !keys.contains($0.key) })
        case .array(let items): return .array(items.map { $0.removing(keys) })
        default: return self
        }
    }

    /// True for a checkpoint id: 32 lowercase hex digits.
    var isCheckpointID: Bool {
        guard case .string(let text) = self else { return false }
        return text.count == 32 && text.allSatisfy { $0.isHexDigit && !$0.isUppercase }
    }
}
