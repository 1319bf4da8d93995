#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

extension NBDError {
    /// The protocol error for a failed operation's errno, as nbdkit and qemu-nbd map them:
    /// clients retry or report on these few values, so anything unlisted is EINVAL.
    public init(errno code: Int32) {
        switch code {
        case EROFS, EPERM: self = .permission
        case EIO: self = .io
        case ENOMEM: self = .noMemory
        case ENOSPC, EDQUOT, EFBIG: self = .noSpace
        case ESHUTDOWN: self = .shutdown
        default: self = .invalid
        }
    }

    /// The error for an operation the storage cannot do at all. Only WRITE_ZEROES has a
    /// documented ENOTSUP (a FAST_ZERO that would be slow, so the client writes zeroes
    /// itself); for every other command it is a request the export cannot honour.
    public static func unsupported(by command: NBDCommandType) -> NBDError {
        command == .writeZeroes ? .notSupported : .invalid
    }
}
