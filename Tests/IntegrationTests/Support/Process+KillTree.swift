import Foundation

#if canImport(Glibc)
import Glibc
#endif

extension Process {
    /// Kills a program that overran its time, with its children, and waits at most
    /// `timeout` for Foundation to see it end.
    ///
    /// Why not `waitUntilExit()`: Foundation notices the end of a child when the socket it
    /// hands the child is closed in every process holding it. A grandchild that outlives
    /// its parent (the captive server of an nbdcopy that was killed) holds it too, and the
    /// wait would last as long as that orphan: a test run once hung on it for 20 minutes.
    /// Only for error paths: after it, the status may not be readable.
    func killTree(waitingAtMost timeout: TimeInterval = 10) {
        let pid = processIdentifier
        for child in ProcessStatus.children(of: pid) { kill(child, SIGKILL) }
        kill(pid, SIGKILL)
        let killedAt = Date()
        while isRunning && Date().timeIntervalSince(killedAt) < timeout { usleep(10_000) }
    }
}
