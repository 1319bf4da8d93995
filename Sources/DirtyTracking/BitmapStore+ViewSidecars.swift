import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Numbers sidecar files, so two views never share one whatever their checkpoints' names.
private let viewSerial = Atomic<UInt64>(0)

/// The copy-before-write files of point-in-time views live in the store's folder: they
/// share its file system (and its space accounting), never land under `/dev` for a block
/// device, and the store that owns the folder is the one place that names and removes them.
extension BitmapStore {
    /// Names of view sidecars start with this and end with `.cbw`.
    public static let viewSidecarPrefix = "view-"

    /// A fresh path for the sidecar of a view at `checkpoint`, in this store's folder.
    public func viewSidecarPath(checkpoint: String) -> String {
        directory + "/" + Self.viewSidecarName(checkpoint: checkpoint)
    }

    /// `view-PID-SERIAL-NAME.cbw`, NAME being the checkpoint's name made file-safe (at
    /// most 64 characters): unique in this process, recognisable in a listing.
    public static func viewSidecarName(checkpoint: String) -> String {
        let serial = viewSerial.wrappingAdd(1, ordering: .relaxed).newValue
        let safeName = String(checkpoint.unicodeScalars.prefix(64).map { scalar -> Character in
            scalar.properties.isAlphabetic || ("0"..."9").contains(scalar) || scalar == "-" ? Character(scalar) : "_"
        })
        return "\(viewSidecarPrefix)\(getpid())-\(serial)-\(safeName).cbw"
    }

    /// Removes the sidecars of views from an earlier run. Views do not outlive the server
    /// that opened them, and holding the store's lock means no other server uses them.
    /// - Returns: the paths removed, for the caller to log.
    func removeStaleViewSidecars() -> [String] {
        var removed: [String] = []
        for name in FileIO.listDirectory(directory)
        where name.hasPrefix(Self.viewSidecarPrefix) && name.hasSuffix(".cbw") {
            let path = directory + "/" + name
            if unlink(path) == 0 { removed.append(path) }
        }
        return removed
    }
}
