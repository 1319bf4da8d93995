import FoundationEssentials

/// A backup directory: the naming of its files, the chain they form, and the cleanup of
/// debris from interrupted runs.
///
/// Files: `backup-NNNN.qcow2` (qcow2, backing file = the previous one) and
/// `backup-NNNN.json` (its ``BackupManifest``), `NNNN` counting from 0000 (the full
/// backup). A run writes `*.partial` names and renames them when complete, qcow2 first and
/// manifest last, so a backup is part of the chain exactly when its manifest exists.
public struct BackupDirectory: Sendable {
    public let path: String

    public init(path: String) {
        self.path = path
    }

    /// `backup-0007.qcow2`.
    public static func imageName(index: Int) -> String {
        "backup-" + paddedIndex(index) + ".qcow2"
    }

    /// `backup-0007.json`.
    public static func manifestName(index: Int) -> String {
        "backup-" + paddedIndex(index) + ".json"
    }

    package static func paddedIndex(_ index: Int) -> String {
        let digits = String(index)
        return String(repeating: "0", count: max(0, 4 - digits.count)) + digits
    }

    public func file(_ name: String) -> String {
        path + "/" + name
    }

    /// Creates the directory if needed.
    public func create() throws(BackupError) {
        do {
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        } catch {
            throw BackupError.fileSystem(path: path, operation: "mkdir", errno: EIO)
        }
    }

    /// The manifests of the chain, in order. Stops at the first gap; a manifest whose
    /// index or file name disagrees with its own name is an error.
    public func chain() throws(BackupError) -> [BackupManifest] {
        var manifests: [BackupManifest] = []
        while true {
            let name = Self.manifestName(index: manifests.count)
            let manifestPath = file(name)
            guard FileManager.default.fileExists(atPath: manifestPath) else { break }
            let manifest = try BackupManifest.load(path: manifestPath)
            let index = manifests.count
            guard manifest.index == index, manifest.file == Self.imageName(index: index) else {
                throw BackupError.invalidManifest(
                    path: manifestPath, reason: "records index \(manifest.index) and file \(manifest.file)")
            }
            guard manifest.backingFile == (index == 0 ? nil : Self.imageName(index: index - 1)) else {
                throw BackupError.invalidManifest(
                    path: manifestPath, reason: "backing file \(manifest.backingFile ?? "none") breaks the chain")
            }
            manifests.append(manifest)
        }
        return manifests
    }

    /// Removes `*.partial` files and qcow2 files without a manifest past the chain's end:
    /// what an interrupted run left behind. Returns the names removed.
    @discardableResult
    public func removeDebris(chainLength: Int) throws(BackupError) -> [String] {
        let names: [String]
        do {
            names = try FileManager.default.contentsOfDirectory(atPath: path)
        } catch {
            return []
        }
        var removed: [String] = []
        for name in names.sorted() {
            let isPartial = name.hasSuffix(".partial")
            var isOrphan = false
            if name.hasPrefix("backup-"), name.hasSuffix(".qcow2"),
                let index = Int(name.dropFirst("backup-".count).dropLast(".qcow2".count)), index >= chainLength
            {
                isOrphan = true
            }
            guard isPartial || isOrphan else { continue }
            if unlink(file(name)) != 0 && errno != ENOENT {
                throw BackupError.fileSystem(path: file(name), operation: "unlink", errno: errno)
            }
            removed.append(name)
        }
        return removed
    }

    /// Resolves `--at`: an index, a checkpoint name or a file name; nil means the last.
    public func point(_ requested: String?, in chain: [BackupManifest]) throws(BackupError) -> Int {
        guard !chain.isEmpty else { throw BackupError.noChain(directory: path) }
        guard let requested else { return chain.count - 1 }
        if let index = Int(requested), chain.indices.contains(index) { return index }
        // Checkpoint names are unique in a store's life, but a chain can span two stores
        // (a store lost and recreated): never pick one of two silently.
        let named = chain.filter { $0.checkpoint == requested }.map(\.index)
        if named.count > 1 { throw BackupError.ambiguousChainPoint(requested, indices: named) }
        if let match = chain.lastIndex(where: {
            $0.checkpoint == requested || $0.file == requested || $0.file == requested + ".qcow2"
                || Self.manifestName(index: $0.index) == requested
        }) {
            return match
        }
        throw BackupError.unknownChainPoint(
            requested, available: chain.map { "\($0.index) (\($0.displayName))" })
    }
}

#if canImport(Glibc)
import Glibc
#endif
