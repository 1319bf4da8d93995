import BlockStorage
import DirtyTracking

#if canImport(Glibc)
import Glibc
#endif

/// Where an image's bitmap store lives. One rule for `tidemark serve`, `block-export-add`
/// and the offline `tidemark bitmap` commands, so that all three find the same store:
/// - a regular file: `IMAGE.tidemark/` beside it, or in the state directory when one is
///   given (`--state-dir`);
/// - a block device: always in a state directory (`--state-dir`, else
///   `StateDirectory.defaultPath`), never beside it: `/dev` is devtmpfs, memory that a
///   reboot empties, and not Tidemark's to write.
/// In a state directory the store is named after the disk's `DeviceIdentity` and checked
/// against it at every open (`StateDirectory`).
public struct StoreLocator: Sendable {
    public enum Placement: Sendable, Equatable {
        /// `IMAGE.tidemark/` beside a regular file.
        case sidecar(directory: String)
        /// A store in a state directory, for the disk with this identity.
        case stateDirectory(StateDirectory, StoreIdentity)
    }

    public let placement: Placement
    /// The disk's identity (nil beside a file, where the path is the key).
    public let identity: DeviceIdentity?

    /// - Parameter stateDirectory: the state directory asked for, or nil for the default
    ///   (beside files, `StateDirectory.defaultPath` for block devices).
    public init(image: RawImage, stateDirectory: String?) {
        guard image.isBlockDevice || stateDirectory != nil else {
            placement = .sidecar(directory: BitmapStore.directory(forImage: image.path))
            identity = nil
            return
        }
        // Absolute, so that messages and records name it wherever the command ran.
        let state = StateDirectory(path: Self.absolute(stateDirectory ?? StateDirectory.defaultPath))
        let identity = DeviceIdentity.of(image)
        let recorded = StoreIdentity(
            identity: identity.value, source: identity.source, path: Self.absolute(image.path), size: image.size)
        self.placement = .stateDirectory(state, recorded)
        self.identity = identity
    }

    /// The store's folder.
    public var directory: String {
        switch placement {
        case .sidecar(let directory): return directory
        case .stateDirectory(let state, let identity): return state.storeDirectory(identity: identity.identity)
        }
    }

    /// True when opening would find a store to load, or a record to check the disk against.
    public var exists: Bool {
        switch placement {
        case .sidecar(let directory):
            var info = stat()
            return stat(directory, &info) == 0
        case .stateDirectory(let state, let identity):
            return state.hasStore(imagePath: identity.path, identity: identity.identity)
        }
    }

    /// What the operator should know about how the disk is identified: set when only its
    /// path identifies it, so another disk at that path would get this disk's bitmaps
    /// unless their sizes differ.
    public var warning: String? {
        guard let identity, identity.isPathOnly, case .stateDirectory(_, let recorded) = placement else { return nil }
        return "'\(recorded.path)' has no stable identity (\(identity.source)): its bitmap store in '\(directory)' "
            + "is keyed by its path only, so another disk attached at that path could not be told apart "
            + "unless its size differs"
    }

    /// Opens and locks the store, as `BitmapStore.open` does, checking the disk's identity
    /// in a state directory.
    public func open(imageSize: UInt64) throws(BitmapError) -> (BitmapStore, BitmapStore.Contents) {
        switch placement {
        case .sidecar(let directory):
            return try BitmapStore.open(directory: directory, imageSize: imageSize, identity: nil)
        case .stateDirectory(let state, let identity):
            return try state.open(identity: identity, imageSize: imageSize)
        }
    }

    /// `path` made absolute (symbolic links kept: `/dev/disk/by-id/…` is a path of its own).
    static func absolute(_ path: String) -> String {
        guard !path.hasPrefix("/") else { return path }
        guard let directory = getcwd(nil, 0) else { return path }
        defer { free(directory) }
        let base = String(cString: directory)
        return (base == "/" ? "" : base) + "/" + (path.hasPrefix("./") ? String(path.dropFirst(2)) : path)
    }
}
