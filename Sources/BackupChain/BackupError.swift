/// Everything that can stop a backup, restore or verify, each with a message that tells
/// the user what happened and what to do about it.
///
/// One enum rather than strings so that callers (the CLI, tests) can react to the kind
/// of failure — a missing bitmap needs a full backup, a dead connection needs a retry —
/// and so that the messages are written once, here.
public enum BackupError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The NBD server could not be reached or refused the export.
    case connectionFailed(uri: String, detail: String)
    /// The connection broke while data was being pulled; the partial backup was removed.
    case connectionLost(detail: String)
    /// The server answered a READ with an error (the connection is still up).
    case readFailed(offset: UInt64, length: UInt64, detail: String)
    /// The server offers no `qemu:dirty-bitmap:` context at all.
    case serverLacksDirtyBitmaps(uri: String)
    /// The server offers dirty bitmaps, but not the one asked for.
    case bitmapNotFound(name: String, available: [String])
    /// The export's size differs from the previous backup in the chain.
    case sizeChanged(previous: UInt64, current: UInt64)
    /// An incremental backup was asked for but the directory holds no full backup.
    case noChain(directory: String)
    /// A full backup was asked for but the directory already holds a chain.
    case chainExists(directory: String)
    /// The server answered block status without the extents of a context it had agreed to.
    case blockStatusIncomplete(context: String, offset: UInt64)
    /// The file system is full.
    case diskFull(path: String)
    /// Any other file system error.
    case fileSystem(path: String, operation: String, errno: Int32)
    /// A qcow2 file is not one this reader understands or is damaged.
    case invalidImage(path: String, reason: String)
    /// A qcow2 feature this minimal reader refuses (compression, encryption, …).
    case unsupportedImageFeature(path: String, feature: String)
    /// A manifest is missing, unreadable, or disagrees with its qcow2 file.
    case invalidManifest(path: String, reason: String)
    /// `--at` named no backup of the chain.
    case unknownChainPoint(String, available: [String])
    /// The control socket refused a step of the checkpoint cycle.
    case control(String)
    /// The server's increment does not start where the chain ends: pulling it would leave
    /// changes out of the backup.
    case chainMismatch(chainPoint: String, serverBase: String?, bitmap: String)
    /// Two backups of the chain carry the checkpoint name given to `--at`.
    case ambiguousChainPoint(String, indices: [Int])
    /// A request the command line should have refused earlier.
    case invalidArgument(String)

    public var description: String {
        switch self {
        case .connectionFailed(let uri, let detail):
            return "cannot connect to \(uri): \(detail)"
        case .connectionLost(let detail):
            return "the connection to the server broke during the backup (\(detail)); the partial file was removed, "
                + "run the backup again"
        case .readFailed(let offset, let length, let detail):
            return "the server failed to read \(length) bytes at offset \(offset) (\(detail)); the partial file was removed"
        case .serverLacksDirtyBitmaps(let uri):
            return "\(uri) offers no qemu:dirty-bitmap contexts, so it cannot serve an incremental backup; "
                + "serve the image with a bitmap (tidemark serve --bitmap NAME, qemu-nbd -B NAME) or take a full backup"
        case .bitmapNotFound(let name, let available):
            let list = available.isEmpty ? "none" : available.joined(separator: ", ")
            return "the server has no bitmap '\(name)' (available: \(list)); check --bitmap, or take a full backup "
                + "and start a new chain if the bitmap was lost"
        case .sizeChanged(let previous, let current):
            return "the export is \(current) bytes but the chain's last backup is \(previous) bytes: the disk was "
                + "resized, so an incremental backup cannot extend this chain; take a full backup into a new directory"
        case .noChain(let directory):
            return "\(directory) holds no full backup to build on; run `tidemark backup full` first"
        case .chainExists(let directory):
            return "\(directory) already holds a backup chain; use a new directory for a new full backup, "
                + "or `tidemark backup incremental` to extend this one"
        case .blockStatusIncomplete(let context, let offset):
            return "the server's block status at offset \(offset) lacks the \(context) extents it agreed to send"
        case .diskFull(let path):
            return "no space left on the device holding \(path); the partial backup was removed, free space and run it again"
        case .fileSystem(let path, let operation, let errno):
            return "\(operation) \(path) failed: \(String(cString: strerror(errno))) (errno \(errno))"
        case .invalidImage(let path, let reason):
            return "\(path) is not a usable qcow2 image: \(reason)"
        case .unsupportedImageFeature(let path, let feature):
            return "\(path) uses \(feature), which Tidemark's qcow2 reader does not support (it reads the files "
                + "`tidemark backup` writes); use qemu-img convert for other images"
        case .invalidManifest(let path, let reason):
            return "manifest \(path): \(reason)"
        case .unknownChainPoint(let point, let available):
            return "no backup '\(point)' in the chain (use an index or a name: \(available.joined(separator: ", ")))"
        case .control(let detail):
            return "control socket: \(detail)"
        case .chainMismatch(let chainPoint, let serverBase, let bitmap):
            let base = serverBase.map { "its last completed checkpoint '\($0)'" } ?? "no completed checkpoint it can vouch for"
            return "the chain ends at \(chainPoint), but bitmap '\(bitmap)' holds the changes since \(base), which "
                + "does not include that point: an incremental backup would miss changes. Nothing was pulled and the "
                + "checkpoint was aborted (its changes stay recorded). Take a full backup into a new directory "
                + "(tidemark backup full … --control … --bitmap \(bitmap)) to start a new chain"
        case .ambiguousChainPoint(let point, let indices):
            return "'\(point)' names backups \(indices.map(String.init).joined(separator: " and ")) of the chain; "
                + "use an index or a file name"
        case .invalidArgument(let detail):
            return detail
        }
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
