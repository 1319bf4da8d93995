#if canImport(Glibc)
import Glibc
#endif

/// Why a notification could not be sent to the service manager.
public enum ServiceNotifierError: Error, Equatable, CustomStringConvertible {
    /// `NOTIFY_SOCKET` is neither an absolute path nor an abstract `@name`, or is too long.
    case invalidAddress(String)
    /// socket(2) or sendto(2) failed with this errno.
    case system(call: String, errno: Int32)

    public var description: String {
        switch self {
        case .invalidAddress(let address):
            return "NOTIFY_SOCKET '\(address)' is not an absolute path or @abstract name that fits a Unix socket address"
        case .system(let call, let code):
            return "\(call) for NOTIFY_SOCKET failed: \(String(cString: strerror(code)))"
        }
    }
}
