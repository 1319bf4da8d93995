import Foundation

/// The QEMU releases the interop matrix runs: Debian 12's own qemu 7.2 (on PATH, compact
/// headers only) and qemu 10.0 (asks for NBD extended headers), unpacked by scripts/setup
/// into `.tools/qemu-10/` and found through `QEMU10_BIN_DIR` (set by scripts/test).
///
/// A missing qemu 10 is a failure, not a skip: the lookup throws with what to run.
enum QemuRelease: String, CaseIterable, CustomStringConvertible, Sendable {
    case qemu7 = "qemu 7.2"
    case qemu10 = "qemu 10.0"

    var description: String { rawValue }

    /// The `--version` prefix the release's tools print (`qemu-img version 10.0.2 (…)`).
    var versionPrefix: String {
        switch self {
        case .qemu7: "7.2"
        case .qemu10: "10."
        }
    }

    /// Where qemu 10's binaries are: `$QEMU10_BIN_DIR`, else the repository's
    /// `.tools/qemu-10/usr/bin` (so `swift test` run by hand finds what scripts/setup put there).
    static var qemu10Directory: String {
        if let directory = ProcessInfo.processInfo.environment["QEMU10_BIN_DIR"], !directory.isEmpty {
            return directory
        }
        return RepositoryPaths.file(".tools/qemu-10/usr/bin")
    }

    /// The program to run for `tool` (`qemu-img`, `qemu-io`, `qemu-nbd`,
    /// `qemu-storage-daemon`): a name found on PATH for 7.2, an absolute path for 10.
    func tool(_ tool: String) throws -> String {
        switch self {
        case .qemu7:
            return tool
        case .qemu10:
            let path = Self.qemu10Directory + "/" + tool
            guard FileManager.default.isExecutableFile(atPath: path) else {
                throw HarnessError(
                    "qemu 10's \(tool) is not at \(path): run scripts/setup (it unpacks qemu 10 into .tools/qemu-10) or set QEMU10_BIN_DIR")
            }
            return path
        }
    }

    /// Runs the release's `tool`; a non-zero exit is an error carrying the output.
    @discardableResult
    func check(_ tool: String, _ arguments: [String], timeout: TimeInterval = 120) throws -> ToolResult {
        try ExternalTool.check(try self.tool(tool), arguments, timeout: timeout)
    }

    /// Runs the release's `tool` and returns its result whatever the exit status.
    @discardableResult
    func run(_ tool: String, _ arguments: [String], timeout: TimeInterval = 120) throws -> ToolResult {
        try ExternalTool.run(try self.tool(tool), arguments, timeout: timeout)
    }

    /// Runs qemu-io on `target` with `commands`; fails on a non-zero exit or a pattern mismatch
    /// (qemu-io reports `read -P` mismatches on its output, not always in its exit status).
    @discardableResult
    func qemuIO(
        _ target: String, _ commands: [String], format: String = "raw", imageOptions: Bool = false, readOnly: Bool = false
    ) throws -> ToolResult {
        let formatArguments = (imageOptions ? ["--image-opts"] : ["-f", format]) + (readOnly ? ["-r"] : [])
        let result = try run("qemu-io", formatArguments + commands.flatMap { ["-c", $0] } + [target], timeout: 300)
        if !result.succeeded || result.stdout.contains("verification failed") || result.stderr.contains("verification failed") {
            throw HarnessError("qemu-io (\(self)) failed:\n\(result)")
        }
        return result
    }
}
