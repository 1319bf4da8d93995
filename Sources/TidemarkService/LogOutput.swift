import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A file descriptor that log lines are written to, one `write` per line under a lock, so
/// lines from different threads never interleave and each reaches the journal or a pipe
/// whole (a JSON consumer must never see half an object).
public final class LogOutput: Sendable {
    private let descriptor: Int32
    private let lock = Mutex<Void>(())

    public init(descriptor: Int32) {
        self.descriptor = descriptor
    }

    /// Standard error, where `tidemark serve` logs (stdout carries the `listening on` lines).
    public static let standardError = LogOutput(descriptor: 2)

    /// Writes `line` whole, retrying short writes and EINTR. A failed write is dropped:
    /// logging must never stop the server.
    public func write(_ line: String) {
        var bytes = line
        bytes.withUTF8 { buffer in
            lock.withLock { _ in
                var offset = 0
                while offset < buffer.count {
                    let written = Glibc.write(descriptor, buffer.baseAddress! + offset, buffer.count - offset)
                    if written > 0 {
                        offset += written
                    } else if written < 0 && errno == EINTR {
                        continue
                    } else {
                        return
                    }
                }
            }
        }
    }

    /// Whether this descriptor is the stream systemd connected to the journal: `JOURNAL_STREAM`
    /// names its device and inode (`DEV:INODE`), as sd_journal_stream_fd(3) documents.
    public func isJournalStream(environmentValue: String?) -> Bool {
        guard let environmentValue else { return false }
        let parts = environmentValue.split(separator: ":")
        guard parts.count == 2, let device = UInt64(parts[0]), let inode = UInt64(parts[1]) else { return false }
        var status = stat()
        guard fstat(descriptor, &status) == 0 else { return false }
        return UInt64(status.st_dev) == device && UInt64(status.st_ino) == inode
    }
}
