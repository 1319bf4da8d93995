import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// A program started in the background (output to files), to be killed or awaited: the
/// backup client killed mid-pull, for instance.
final class BackgroundProgram: @unchecked Sendable {
    let process = Process()
    let command: String
    private let directory: TestDirectory
    private let outPath: String
    private let errPath: String

    init(_ executable: String, _ arguments: [String]) throws {
        directory = try TestDirectory()
        outPath = directory.file("stdout")
        errPath = directory.file("stderr")
        _ = FileManager.default.createFile(atPath: outPath, contents: nil)
        _ = FileManager.default.createFile(atPath: errPath, contents: nil)
        guard let out = FileHandle(forWritingAtPath: outPath), let err = FileHandle(forWritingAtPath: errPath) else {
            throw HarnessError("cannot open output files for \(executable)")
        }
        command = ([executable] + arguments).joined(separator: " ")
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        process.standardOutput = out
        process.standardError = err
        process.standardInput = FileHandle.nullDevice
        try process.run()
    }

    deinit {
        if process.isRunning {
            Glibc.kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
    }

    /// Sends `signal` and waits for the end.
    func kill(signal: Int32 = SIGKILL) {
        if process.isRunning { Glibc.kill(process.processIdentifier, signal) }
        process.waitUntilExit()
    }

    /// Waits for the program to end (killing it after `timeout`) and returns its result.
    func wait(timeout: TimeInterval = 300) throws -> ToolResult {
        let deadline = Date().addingTimeInterval(timeout)
        while process.isRunning && Date() < deadline { usleep(5_000) }
        if process.isRunning {
            process.killTree()
            throw HarnessError("`\(command)` did not finish within \(Int(timeout)) s")
        }
        process.waitUntilExit()
        return result
    }

    /// What it printed and how it ended (after it ended).
    var result: ToolResult {
        ToolResult(
            command: command, status: process.terminationStatus,
            stdout: (try? String(contentsOfFile: outPath, encoding: .utf8)) ?? "",
            stderr: (try? String(contentsOfFile: errPath, encoding: .utf8)) ?? "")
    }

    /// True when it was ended by a signal rather than exiting.
    var wasSignalled: Bool { process.terminationReason == .uncaughtSignal }
}
