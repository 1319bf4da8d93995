import Foundation

/// The outcome of running an external program.
struct ToolResult: CustomStringConvertible {
    let command: String
    let status: Int32
    let stdout: String
    let stderr: String

    var succeeded: Bool { status == 0 }

    var description: String {
        "`\(command)` exited \(status)\nstdout:\n\(stdout)\nstderr:\n\(stderr)"
    }
}

/// Runs the real client tools (nbdinfo, qemu-img, qemu-io, nbdcopy, fio) against the server.
///
/// Interop is the point of these tests, so a missing tool is a failure, not a skip: the
/// lookup throws and the test fails with the tool's name.
enum ExternalTool {
    /// Absolute path of `name` found on `PATH` (plus the usual system directories), or
    /// `name` itself when it is an absolute path.
    static func locate(_ name: String) throws -> String {
        // An absolute path (an installed binary under test) is taken as it is.
        if name.hasPrefix("/") {
            guard FileManager.default.isExecutableFile(atPath: name) else {
                throw HarnessError("`\(name)` is not an executable file")
            }
            return name
        }
        let environmentPath = ProcessInfo.processInfo.environment["PATH"] ?? ""
        let directories = environmentPath.split(separator: ":").map(String.init) + ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
        for directory in directories {
            let candidate = directory + "/" + name
            if FileManager.default.isExecutableFile(atPath: candidate) {
                return candidate
            }
        }
        throw HarnessError("required tool `\(name)` is not installed (run scripts/setup)")
    }

    /// Runs `name` with `arguments` and waits for it, killing it after `timeout` seconds.
    /// Output goes to files, not pipes, so a chatty tool can never block on a full pipe.
    /// `currentDirectory` keeps tools that drop files in their working directory (fio)
    /// out of the repository.
    @discardableResult
    static func run(
        _ name: String, _ arguments: [String], timeout: TimeInterval = 120,
        environment: [String: String] = [:], currentDirectory: String? = nil
    ) throws -> ToolResult {
        let executable = try locate(name)
        let directory = try TestDirectory()
        let outPath = directory.file("stdout")
        let errPath = directory.file("stderr")
        _ = FileManager.default.createFile(atPath: outPath, contents: nil)
        _ = FileManager.default.createFile(atPath: errPath, contents: nil)
        guard let out = FileHandle(forWritingAtPath: outPath), let err = FileHandle(forWritingAtPath: errPath) else {
            throw HarnessError("cannot open output files for \(name)")
        }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        process.standardOutput = out
        process.standardError = err
        process.standardInput = FileHandle.nullDevice
        if let currentDirectory {
            process.currentDirectoryURL = URL(fileURLWithPath: currentDirectory)
        }
        if !environment.isEmpty {
            process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        }
        let command = ([name] + arguments).joined(separator: " ")
        try process.run()
        let deadline = Date().addingTimeInterval(timeout)
        while process.isRunning && Date() < deadline {
            usleep(5_000)
        }
        if process.isRunning {
            process.killTree()
            try? out.close()
            try? err.close()
            let partial = (try? String(contentsOfFile: errPath, encoding: .utf8)) ?? ""
            throw HarnessError("`\(command)` did not finish within \(Int(timeout)) s; stderr:\n\(partial)")
        }
        process.waitUntilExit()
        try? out.close()
        try? err.close()
        return ToolResult(
            command: command,
            status: process.terminationStatus,
            stdout: (try? String(contentsOfFile: outPath, encoding: .utf8)) ?? "",
            stderr: (try? String(contentsOfFile: errPath, encoding: .utf8)) ?? ""
        )
    }

    /// Like `run`, but a non-zero exit status is an error carrying the tool's output.
    @discardableResult
    static func check(
        _ name: String, _ arguments: [String], timeout: TimeInterval = 120,
        environment: [String: String] = [:], currentDirectory: String? = nil
    ) throws -> ToolResult {
        let result = try run(name, arguments, timeout: timeout, environment: environment, currentDirectory: currentDirectory)
        guard result.succeeded else {
            throw HarnessError(result.description)
        }
        return result
    }
}
