#if canImport(Glibc)
import Glibc
#endif

/// Why an image operation failed. Each case carries the errno the kernel gave, so callers
/// (the NBD server, the CLI) can map it to their own error codes without guessing.
public enum StorageError: Error, Equatable, CustomStringConvertible {
    /// The image could not be opened or created.
    case openFailed(path: String, errno: Int32)
    /// The image is neither a regular file nor a block device; `kind` says what it is.
    case unsupportedFileType(path: String, kind: String)
    /// A read, write, sync or allocation call failed.
    case ioFailed(operation: String, errno: Int32)
    /// The operation needs a writable image.
    case readOnly
    /// The range lies outside the image.
    case outOfRange(offset: UInt64, length: UInt64, size: UInt64)
    /// The filesystem cannot do this cheaply (e.g. zeroing without writing).
    case notSupported(operation: String)
    /// A point-in-time view can no longer show its instant (closed, or copying failed).
    case viewUnavailable(reason: String)
    /// An image file's own structure is damaged (a qcow2 table pointing outside the file):
    /// the range cannot be read, and nothing is made up in its place.
    case damagedImage(path: String, reason: String)

    /// The errno closest to this failure, for protocols that speak errno.
    public var errno: Int32 {
        switch self {
        case .openFailed(_, let code), .ioFailed(_, let code): return code
        case .unsupportedFileType: return EINVAL
        case .readOnly: return EROFS
        case .outOfRange: return EINVAL
        case .notSupported: return EOPNOTSUPP
        case .viewUnavailable: return EIO
        case .damagedImage: return EIO
        }
    }

    public var description: String {
        switch self {
        case .openFailed(let path, let code):
            return "cannot open image '\(path)': \(String(cString: strerror(code)))"
        case .unsupportedFileType(let path, let kind):
            return "'\(path)' is \(kind), not an image: export a regular file or a block device"
        case .ioFailed(let operation, let code):
            return "\(operation) failed: \(String(cString: strerror(code)))"
        case .readOnly:
            return "the image is read-only"
        case .outOfRange(let offset, let length, let size):
            return "range \(offset)+\(length) is outside the image (size \(size))"
        case .notSupported(let operation):
            return "\(operation) is not supported by this file system"
        case .damagedImage(let path, let reason):
            return "'\(path)' is damaged: \(reason); the range cannot be served (check it with tidemark verify or qemu-img check)"
        case .viewUnavailable(let reason):
            return "the point-in-time view is unavailable: \(reason)"
        }
    }
}

extension StorageError {
    /// Throws `.outOfRange` unless `offset + length` lies within an image of `size` bytes
    /// (an overflowing sum is out of range).
    public static func checkRange(offset: UInt64, length: UInt64, size: UInt64) throws(StorageError) {
        let (end, overflow) = offset.addingReportingOverflow(length)
        guard !overflow, end <= size else { throw StorageError.outOfRange(offset: offset, length: length, size: size) }
    }
}
