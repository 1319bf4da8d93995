#if canImport(Glibc)
import Glibc
#endif

/// A chain point to serve, as `backup:PATH[@POINT]` names it: a backup directory (its
/// manifests say which files form the chain; POINT is an index, checkpoint or file name,
/// the newest by default) or a qcow2 file (its backing files are followed down).
///
/// Why both: Tidemark's own chains are checked against their manifests, and any qcow2
/// chain the reader supports (qemu-img's) can be served the same way.
public struct ChainLocation {
    /// The chain's files, bottom first, opened and checked.
    public let layers: [Qcow2Image]
    /// Index of the point in the chain and a name for it (checkpoint or file name).
    public let index: Int
    public let name: String
    /// Where a writable export keeps its overlay (beside the chain, never in its files).
    public let overlayPath: String
    /// Binds an overlay to this point: the top file's name and sizes.
    public let identity: String

    /// Longest backing chain followed from a qcow2 file.
    public static let maximumDepth = ChainImage.maximumLayers

    /// Opens `path` at `point`.
    public static func open(path: String, point: String?) throws(BackupError) -> ChainLocation {
        var info = stat()
        guard stat(path, &info) == 0 else { throw BackupFile.failure(path, "stat", errno) }
        let layers: [Qcow2Image]
        let index: Int
        let name: String
        let overlayPath: String
        if info.st_mode & S_IFMT == S_IFDIR {
            let directory = BackupDirectory(path: path)
            let chain = try directory.chain()
            index = try directory.point(point, in: chain)
            layers = try ChainReader.openLayers(directory: directory, chain: chain, point: index)
            name = chain[index].displayName
            overlayPath = directory.file("backup-" + BackupDirectory.paddedIndex(index) + ".overlay")
        } else {
            if let point {
                throw BackupError.invalidArgument("@\(point) names a point of a backup directory, but \(path) is a file")
            }
            layers = try Self.followBacking(top: path)
            index = layers.count - 1
            name = Self.lastComponent(path)
            overlayPath = path + ".overlay"
        }
        guard let top = layers.last else { throw BackupError.noChain(directory: path) }
        return ChainLocation(
            layers: layers, index: index, name: name, overlayPath: overlayPath,
            identity: "\(Self.lastComponent(top.path)) (disk \(top.virtualSize) bytes, file \(top.fileLength) bytes)")
    }

    /// Opens `top` and its backing files (names relative to each file's directory), bottom
    /// first. Only qcow2 backing files, no loops, at most ``maximumDepth``.
    static func followBacking(top: String) throws(BackupError) -> [Qcow2Image] {
        var chain: [Qcow2Image] = []
        var next: String? = top
        var seen: Set<String> = []
        while let path = next {
            guard chain.count < maximumDepth else {
                throw BackupError.invalidImage(path: top, reason: "backing chain deeper than \(maximumDepth) files")
            }
            guard seen.insert(path).inserted else {
                throw BackupError.invalidImage(path: path, reason: "the backing chain loops back to this file")
            }
            let image = try Qcow2Image(path: path)
            if let format = image.backingFormat, format != "qcow2" {
                throw BackupError.unsupportedImageFeature(path: path, feature: "a \(format) backing file")
            }
            if let below = chain.last, below.virtualSize != image.virtualSize || below.clusterSize != image.clusterSize {
                throw BackupError.invalidImage(
                    path: below.path, reason: "its virtual or cluster size differs from \(image.path), which it backs")
            }
            chain.append(image)
            next = image.backingFile.map { name in
                name.hasPrefix("/") ? name : Self.directoryOf(path) + "/" + name
            }
        }
        return chain.reversed()
    }

    static func lastComponent(_ path: String) -> String {
        path.lastIndex(of: "/").map { String(path[path.index(after: $0)...]) } ?? path
    }

    static func directoryOf(_ path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }
}
