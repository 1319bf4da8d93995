import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// A program started with posix_spawn and reaped with waitpid, bypassing Foundation's
/// Process, for programs that close every descriptor they inherit (systemd-socket-activate
/// does before it execs). Foundation watches a child through an inherited descriptor: once
/// the child closes it, Foundation takes it for exited and blocks in waitpid on it, so no
/// other child's exit is noticed. The signal mask and dispositions are reset, because the
/// spawning thread's mask (a dispatch worker blocks most signals) would otherwise be inherited.
final class SpawnedProgram: @unchecked Sendable {
    let pid: pid_t
    let command: String
    private let directory: TestDirectory
    private var status: Int32?

    init(_ executable: String, _ arguments: [String]) throws {
        directory = try TestDirectory()
        command = ([executable] + arguments).joined(separator: " ")
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, directory.file("stdout"), O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        posix_spawn_file_actions_addopen(&actions, 2, directory.file("stderr"), O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var empty = sigset_t()
        sigemptyset(&empty)
        var all = sigset_t()
        sigfillset(&all)
        posix_spawnattr_setsigmask(&attributes, &empty)
        posix_spawnattr_setsigdefault(&attributes, &all)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        let argv = ([executable] + arguments).map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        var child: pid_t = 0
        let result = posix_spawn(&child, executable, &actions, &attributes, argv, environ)
        guard result == 0 else { throw HarnessError("posix_spawn \(executable): \(String(cString: strerror(result)))") }
        pid = child
    }

    deinit {
        if status == nil {
            kill(pid, SIGKILL)
            _ = try? wait(timeout: 10)
        }
    }

    /// Waits for the program to end (killing it after `timeout`) and returns its result.
    func wait(timeout: TimeInterval = 60) throws -> ToolResult {
        let deadline = Date().addingTimeInterval(timeout)
        while status == nil {
            var raw: Int32 = 0
            let reaped = waitpid(pid, &raw, WNOHANG)
            if reaped == pid {
                // Exit status, or 128 + signal as a shell reports it.
                status = raw & 0x7f == 0 ? (raw >> 8) & 0xff : 128 + (raw & 0x7f)
                break
            }
            if Date() > deadline {
                kill(pid, SIGKILL)
                _ = waitpid(pid, &raw, 0)
                status = -1
                throw HarnessError("`\(command)` did not finish within \(Int(timeout)) s; stderr:\n\(output(of: "stderr"))")
            }
            usleep(5_000)
        }
        return ToolResult(command: command, status: status ?? -1, stdout: output(of: "stdout"), stderr: output(of: "stderr"))
    }

    private func output(of name: String) -> String {
        (try? String(contentsOfFile: directory.file(name), encoding: .utf8)) ?? ""
    }
}
