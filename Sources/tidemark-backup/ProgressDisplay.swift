import CLinuxIO
import Synchronization
import TidemarkBackup

#if canImport(Glibc)
import Glibc
#endif

/// Shows a backup's progress on stderr: a redrawn bar (bytes, rate, ETA) on a terminal,
/// a log line every 10 seconds otherwise, so logs of scheduled backups stay short.
final class ProgressDisplay: Sendable {
    private let label: String
    private let interactive: Bool
    private let lastLine = Mutex<Double>(-1)

    init(label: String) {
        self.label = label
        interactive = isatty(STDERR_FILENO) == 1
    }

    /// The callback to hand to ``BackupJob``.
    var handler: BackupProgressHandler {
        { [self] progress in update(progress) }
    }

    func update(_ progress: BackupProgress) {
        let total = max(progress.bytesToCopy, 1)
        let fraction = Double(progress.bytesCopied) / Double(total)
        let rate = progress.elapsed > 0 ? Double(progress.bytesCopied) / progress.elapsed : 0
        let remaining = rate > 0 ? Double(progress.bytesToCopy - min(progress.bytesCopied, progress.bytesToCopy)) / rate : 0
        if interactive {
            let width = 30
            let filled = min(width, Int(fraction * Double(width)))
            let bar = String(repeating: "#", count: filled) + String(repeating: " ", count: width - filled)
            let line = "\r\(label) [\(bar)] \(Self.percent(fraction)) \(Self.bytes(progress.bytesCopied))"
                + " / \(Self.bytes(progress.bytesToCopy))  \(Self.bytes(UInt64(rate)))/s  ETA \(Self.duration(remaining))  "
            Self.writeError(line)
            return
        }
        let due = lastLine.withLock { last -> Bool in
            guard last < 0 || progress.elapsed - last >= 10 else { return false }
            last = progress.elapsed
            return true
        }
        if due && progress.bytesCopied < progress.bytesToCopy {
            Self.writeError("\(label): \(Self.percent(fraction)) (\(Self.bytes(progress.bytesCopied)) of \(Self.bytes(progress.bytesToCopy))) at \(Self.bytes(UInt64(rate)))/s\n")
        }
    }

    /// Ends the bar's line.
    func finish() {
        if interactive { Self.writeError("\n") }
    }

    /// Writes to file descriptor 2 directly (C's `stderr` is shared mutable state to Swift 6).
    static func writeError(_ text: String) {
        let bytes = Array(text.utf8)
        _ = bytes.withUnsafeBytes { clinuxio_write_all(STDERR_FILENO, $0.baseAddress, $0.count) }
    }

    static func percent(_ fraction: Double) -> String {
        String(Int((min(fraction, 1) * 100).rounded(.down))) + "%"
    }

    static func bytes(_ count: UInt64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB"]
        var value = Double(count)
        var unit = 0
        while value >= 1024 && unit < units.count - 1 {
            value /= 1024
            unit += 1
        }
        return unit == 0 ? "\(count) B" : "\((value * 10).rounded() / 10) \(units[unit])"
    }

    static func duration(_ seconds: Double) -> String {
        guard seconds.isFinite else { return "?" }
        let whole = Int(seconds.rounded(.up))
        return whole >= 60 ? "\(whole / 60)m\(whole % 60)s" : "\(whole)s"
    }
}
