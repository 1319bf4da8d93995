import CLibNBD

/// A failed libnbd call, with the library's own explanation.
///
/// libnbd keeps the last error message and errno in thread-local storage and overwrites
/// them on the next failing call, so the wrapper reads both immediately after the failure,
/// on the same thread, and carries them in the error. Tests assert on `errno` (for example
/// `EINVAL` for an out-of-range read) because that is what the NBD server sent back: libnbd
/// maps the wire error (`NBD_EINVAL`, `NBD_ENOSPC`, …) to the matching errno.
public struct NBDClientError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The libnbd function (or wrapper step) that failed, such as `nbd_pread`.
    public let operation: String
    /// libnbd's message from `nbd_get_error()`; it usually names the failing call too.
    public let message: String
    /// libnbd's errno from `nbd_get_errno()`; 0 when libnbd did not set one.
    public let errno: Int32

    public init(operation: String, message: String, errno: Int32) {
        self.operation = operation
        self.message = message
        self.errno = errno
    }

    /// Captures libnbd's thread-local error state. Call it right after the failing call,
    /// before anything else can touch libnbd on this thread.
    static func last(_ operation: String) -> NBDClientError {
        let message = nbd_get_error().map { String(cString: $0) } ?? "unknown libnbd error"
        return NBDClientError(operation: operation, message: message, errno: nbd_get_errno())
    }

    public var description: String {
        "\(operation) failed (errno \(errno)): \(message)"
    }
}
