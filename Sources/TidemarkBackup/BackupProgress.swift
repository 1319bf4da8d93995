/// A snapshot of a running backup, handed to the progress callback.
///
/// The CLI turns it into a progress bar or log lines; tests use the callback to act at a
/// precise moment of the pull (for example to kill the server mid-way).
public struct BackupProgress: Sendable, Equatable {
    /// Bytes read from the server and stored so far.
    public var bytesCopied: UInt64
    /// Bytes the plan will copy in total.
    public var bytesToCopy: UInt64
    /// Bytes recorded as zeroes (known from the plan, before any data moves).
    public var bytesZeroed: UInt64
    /// Seconds since the pull started.
    public var elapsed: Double

    public init(bytesCopied: UInt64, bytesToCopy: UInt64, bytesZeroed: UInt64, elapsed: Double) {
        self.bytesCopied = bytesCopied
        self.bytesToCopy = bytesToCopy
        self.bytesZeroed = bytesZeroed
        self.elapsed = elapsed
    }
}

/// Called from the pulling threads, at most every few milliseconds and once at the end.
public typealias BackupProgressHandler = @Sendable (BackupProgress) -> Void
