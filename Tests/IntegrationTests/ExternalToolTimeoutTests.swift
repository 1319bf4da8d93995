import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The harness's own promise: a tool that overruns its time fails the test within a
/// bounded time, even when it leaves an orphan behind (as an nbdcopy whose captive server
/// outlived it once kept a whole test run waiting for 20 minutes).
@Suite("External tool timeouts")
struct ExternalToolTimeoutTests {
    @Test("a tool that overruns is killed with its children, and an orphan it left does not hold the run")
    func overrunWithOrphan() throws {
        let directory = try TestDirectory()
        let pidFile = directory.file("orphan.pid")
        // The subshell starts a sleeper and exits: the sleeper, reparented away from the
        // tool, keeps the descriptors the tool inherited. The tool itself then sleeps.
        let script = "(sleep 97 & echo $! > '\(pidFile)'); exec sleep 97"
        let started = Date()
        #expect {
            try ExternalTool.run("sh", ["-c", script], timeout: 1)
        } throws: { error in
            "\(error)".contains("did not finish within 1 s")
        }
        let elapsed = Date().timeIntervalSince(started)
        if let text = try? String(contentsOfFile: pidFile, encoding: .utf8),
            let orphan = Int32(text.trimmingCharacters(in: .whitespacesAndNewlines))
        {
            kill(orphan, SIGKILL)
        } else {
            Issue.record("the orphan's pid was not written")
        }
        // 1 s to overrun, at most 10 s of waiting after the kill; the orphan would sleep 97 s.
        #expect(elapsed < 40, "took \(elapsed) s")
    }
}
