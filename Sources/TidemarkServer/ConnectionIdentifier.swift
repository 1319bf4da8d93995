import Synchronization

/// Per-process connection numbers, the `connection` field of every log line about a
/// connection, so the open, refusal and close lines of one client can be joined. NBD and
/// control connections share the sequence, so a number names one connection in the log.
public enum ConnectionIdentifier {
    private static let last = Atomic<UInt64>(0)

    /// The next number (1, 2, 3, …).
    public static func next() -> UInt64 {
        last.wrappingAdd(1, ordering: .relaxed).newValue
    }
}
