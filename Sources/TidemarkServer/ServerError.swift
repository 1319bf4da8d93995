import BlockStorage
import DirtyTracking

/// Errors from configuring or starting the server, worded for the person running it.
public enum ServerError: Error, Equatable, CustomStringConvertible {
    case duplicateExport(String)
    /// An export name over the protocol's 4096 bytes (a view's name adds `@CHECKPOINT`).
    case exportNameTooLong(String)
    /// Another export has this management id (QEMU's wording, which scripts match).
    case duplicateExportID(String)
    case noExports
    case bindFailed(address: String, reason: String)
    case socketActivation(String)
    case invalidView(String)
    /// A bitmap or checkpoint operation failed; nothing changed.
    case bitmaps(BitmapError)
    /// The image or a view's sidecar failed.
    case storage(StorageError)
    /// A `backup:PATH[@POINT][:rw]` export that cannot be parsed or opened.
    case invalidChainSpecification(String, reason: String)
    /// A live restore's target that cannot take the disk.
    case invalidLiveRestoreTarget(String, reason: String)

    public var description: String {
        switch self {
        case .duplicateExport(let name): return "an export named '\(name)' already exists"
        case .exportNameTooLong(let name):
            return "the export name '\(name.prefix(64))…' is \(name.utf8.count) bytes; NBD allows at most 4096 (use a shorter export or checkpoint name)"
        case .duplicateExportID(let id): return "Block export id '\(id)' is already in use"
        case .noExports: return "no exports configured"
        case .bindFailed(let address, let reason): return "cannot listen on \(address): \(reason)"
        case .socketActivation(let reason): return "socket activation failed: \(reason)"
        case .invalidView(let reason): return "cannot open the view: \(reason)"
        case .bitmaps(let error): return error.description
        case .storage(let error): return error.description
        case .invalidChainSpecification(let text, let reason):
            return "cannot serve '\(text)': \(reason) (use backup:DIR[@POINT][:rw], POINT an index, checkpoint or file name)"
        case .invalidLiveRestoreTarget(let target, let reason):
            return "cannot restore into '\(target)': \(reason)"
        }
    }
}
