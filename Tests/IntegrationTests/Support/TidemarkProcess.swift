import Foundation
import NBDClient

/// A running `tidemark serve` process: the real server binary under test.
///
/// The binary is `$TIDEMARK_BIN` if set (scripts/test sets it), else
/// `<package root>/.build/debug/tidemark`. The server reports readiness by printing one
/// `listening on URI` line per listener on stdout; `init` waits for those lines, so a test
/// can connect as soon as it returns. The server's stderr goes to `server.log` in the
/// test's directory and is included in startup failures.
///
/// Tests use Unix sockets in their own directory (`--port 0` is not part of the CLI
/// contract), and ``stop(signal:timeout:)`` checks the graceful-stop contract: SIGTERM or
/// SIGINT, in-flight requests finish, exit status 0. A process still running when the
/// value is released is killed.
final class TidemarkProcess: @unchecked Sendable {
    /// How the process ended.
    struct Termination: Equatable, CustomStringConvertible {
        let exited: Bool
        let status: Int32

        var description: String {
            exited ? "exit status \(status)" : "killed by signal \(status)"
        }

        static let success = Termination(exited: true, status: 0)
    }

    static var binaryPath: String {
        if let path = ProcessInfo.processInfo.environment["TIDEMARK_BIN"], !path.isEmpty {
            return path
        }
        // Tests/IntegrationTests/Support/TidemarkProcess.swift → package root.
        var root = URL(fileURLWithPath: #filePath)
        for _ in 0..<4 { root.deleteLastPathComponent() }
        return root.appendingPathComponent(".build/debug/tidemark").path
    }

    let process = Process()
    let arguments: [String]
    let logPath: String
    private let lock = NSLock()
    private var outputBuffer = Data()
    private var outputLines: [String] = []

    /// Starts `tidemark ARGUMENTS` and waits until it announced `expectedListeners`
    /// listeners (0: returns at once). A `launcher` (e.g. `["/usr/bin/prlimit",
    /// "--nofile=64:64"]`) is run instead, with the binary and the arguments after its own;
    /// it must exec the binary, so that the process is the server. `environment` is added
    /// to the test's own.
    init(
        arguments: [String], directory: TestDirectory, expectedListeners: Int = 1,
        startupTimeout: TimeInterval = 30, launcher: [String] = [], environment: [String: String] = [:]
    ) throws {
        self.arguments = arguments
        logPath = directory.file("server.log")
        let binary = Self.binaryPath
        guard FileManager.default.isExecutableFile(atPath: binary) else {
            throw HarnessError("server binary \(binary) not found: build it (swift build) or set TIDEMARK_BIN")
        }
        _ = FileManager.default.createFile(atPath: logPath, contents: nil)
        guard let log = FileHandle(forWritingAtPath: logPath) else {
            throw HarnessError("cannot open \(logPath)")
        }
        let stdout = Pipe()
        if let program = launcher.first {
            guard FileManager.default.isExecutableFile(atPath: program) else {
                throw HarnessError("required program \(program) is not installed (run scripts/setup)")
            }
            process.executableURL = URL(fileURLWithPath: program)
            process.arguments = Array(launcher.dropFirst()) + [binary] + arguments
        } else {
            process.executableURL = URL(fileURLWithPath: binary)
            process.arguments = arguments
        }
        process.standardOutput = stdout
        process.standardError = log
        process.standardInput = FileHandle.nullDevice
        if !environment.isEmpty {
            process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        }
        stdout.fileHandleForReading.readabilityHandler = { [weak self] handle in
            let data = handle.availableData
            guard !data.isEmpty else {
                handle.readabilityHandler = nil
                return
            }
            self?.consume(data)
        }
        try process.run()
        try? log.close()

        let deadline = Date().addingTimeInterval(startupTimeout)
        while listeners.count < expectedListeners {
            if !process.isRunning {
                process.waitUntilExit()
                throw HarnessError(
                    "tidemark \(arguments.joined(separator: " ")) exited during startup "
                        + "(\(termination)); stdout:\n\(output)\nstderr:\n\(serverLog)")
            }
            if Date() > deadline {
                process.killTree()
                throw HarnessError(
                    "tidemark \(arguments.joined(separator: " ")) did not announce \(expectedListeners) "
                        + "listener(s) within \(Int(startupTimeout)) s; stdout:\n\(output)\nstderr:\n\(serverLog)")
            }
            usleep(5_000)
        }
    }

    /// Serves `image` as `name` on the directory's Unix socket, plus `extraArguments`.
    static func serve(
        image: String, name: String = "disk", in directory: TestDirectory, extraArguments: [String] = []
    ) throws -> TidemarkProcess {
        try TidemarkProcess(
            arguments: ["serve", image, "--name", name, "--unix", directory.socketPath] + extraArguments,
            directory: directory
        )
    }

    /// Serves `image` as `name` on `127.0.0.1` and a TCP port picked at random from a high
    /// range, retrying with another port when the server cannot start (the port may be
    /// taken: `--port 0` is not part of the CLI contract).
    static func serveTCP(
        image: String, name: String = "disk", in directory: TestDirectory, extraArguments: [String] = [],
        attempts: Int = 8
    ) throws -> (server: TidemarkProcess, port: Int) {
        var lastError: (any Error)?
        for _ in 0..<attempts {
            let port = Int.random(in: 20_000..<60_000)
            do {
                let server = try TidemarkProcess(
                    arguments: ["serve", image, "--name", name, "--bind", "127.0.0.1", "--port", String(port)]
                        + extraArguments,
                    directory: directory)
                return (server, port)
            } catch {
                lastError = error
            }
        }
        throw HarnessError("could not start a TCP listener in \(attempts) attempts; last error: \(lastError.map { "\($0)" } ?? "none")")
    }

    deinit {
        if process.isRunning {
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
    }

    // MARK: - Output

    private func consume(_ data: Data) {
        lock.lock()
        defer { lock.unlock() }
        outputBuffer.append(data)
        while let newline = outputBuffer.firstIndex(of: UInt8(ascii: "\n")) {
            let line = String(decoding: outputBuffer[outputBuffer.startIndex..<newline], as: UTF8.self)
            outputLines.append(line)
            outputBuffer.removeSubrange(outputBuffer.startIndex...newline)
        }
    }

    /// Everything the server printed on stdout so far.
    var output: String {
        lock.lock()
        defer { lock.unlock() }
        return outputLines.joined(separator: "\n")
    }

    /// The server's stderr so far.
    var serverLog: String {
        (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? ""
    }

    /// The URIs from the `listening on URI` lines, in order.
    var listeners: [String] {
        lock.lock()
        defer { lock.unlock() }
        let prefix = "listening on "
        return outputLines.compactMap { line in
            guard let range = line.range(of: prefix) else { return nil }
            return String(line[range.upperBound...]).trimmingCharacters(in: .whitespaces)
        }
    }

    /// The first listener's URI.
    var uri: String {
        listeners.first ?? ""
    }

    /// The Unix socket of the first `nbd+unix` listener.
    var socketPath: String? {
        for listener in listeners {
            guard listener.hasPrefix("nbd+unix:"), let components = URLComponents(string: listener) else { continue }
            if let socket = components.queryItems?.first(where: { $0.name == "socket" })?.value {
                return socket
            }
        }
        return nil
    }

    /// `nbd+unix:///EXPORT?socket=PATH` for another export on the same socket.
    func unixURI(export: String) throws -> String {
        guard let socketPath else { throw HarnessError("server has no Unix listener: \(listeners)") }
        return "nbd+unix:///\(export)?socket=\(socketPath)"
    }

    // MARK: - Clients

    /// A libnbd connection to `export` over the Unix socket, configured by `configure`.
    func connect(
        export: String? = nil, _ configure: (inout NBDConnectionConfiguration) -> Void = { _ in }
    ) throws -> NBDConnection {
        guard let socketPath else { throw HarnessError("server has no Unix listener: \(listeners)") }
        var configuration = NBDConnectionConfiguration()
        if let export { configuration.exportName = export }
        configure(&configuration)
        let connection = try NBDConnection(configuration)
        try connection.connect(unixSocket: socketPath)
        return connection
    }

    // MARK: - Stopping

    var isRunning: Bool { process.isRunning }

    var termination: Termination {
        Termination(exited: process.terminationReason == .exit, status: process.terminationStatus)
    }

    /// Sends `signal` and waits for the process to end; throws if it outlives `timeout`
    /// (the process is then killed).
    @discardableResult
    func stop(signal: Int32 = SIGTERM, timeout: TimeInterval = 30) throws -> Termination {
        if process.isRunning {
            kill(process.processIdentifier, signal)
        }
        try waitForExit(timeout: timeout)
        return termination
    }

    /// Waits for the process to end on its own.
    func waitForExit(timeout: TimeInterval) throws {
        let deadline = Date().addingTimeInterval(timeout)
        while process.isRunning && Date() < deadline {
            usleep(5_000)
        }
        if process.isRunning {
            process.killTree()
            throw HarnessError("tidemark did not exit within \(Int(timeout)) s; stderr:\n\(serverLog)")
        }
        process.waitUntilExit()
    }
}
