/// The virtual disk as a backup chain yields it at one point: every backup from the full
/// one up to that point, each file consulted before its backing file.
///
/// Why: restore and verify must read a chain exactly as QEMU would (top file first; an
/// unallocated cluster falls through to the backing file; a zero cluster stops the
/// search), without QEMU. The files are opened with ``Qcow2Image`` and checked against
/// the manifests: same virtual size, and each file's backing name is the previous file.
public final class ChainReader {
    /// Where one guest cluster's content comes from.
    public enum Source: Equatable, Sendable {
        /// Zeroes: a zero cluster, or unallocated all the way down.
        case zero
        /// Stored data in layer `layer` (0 = the full backup) at `hostOffset`.
        case data(layer: Int, hostOffset: UInt64)
    }

    public let virtualSize: UInt64
    public let clusterSize: UInt64
    /// Layers from the full backup (0) to the chain point.
    private let layers: [Qcow2Image]

    /// Opens `chain[0...point]` in `directory`.
    public init(directory: BackupDirectory, chain: [BackupManifest], point: Int) throws(BackupError) {
        let layers = try Self.openLayers(directory: directory, chain: chain, point: point)
        guard let top = layers.last else { throw BackupError.noChain(directory: directory.path) }
        self.layers = layers
        virtualSize = top.virtualSize
        clusterSize = top.clusterSize
    }

    /// Opens the files of `chain[0...point]`, bottom first, each checked against its
    /// manifest: same virtual size, backing name = the previous file, one cluster size.
    public static func openLayers(
        directory: BackupDirectory, chain: [BackupManifest], point: Int
    ) throws(BackupError) -> [Qcow2Image] {
        guard chain.indices.contains(point) else { throw BackupError.noChain(directory: directory.path) }
        var layers: [Qcow2Image] = []
        for manifest in chain[0...point] {
            let imagePath = directory.file(manifest.file)
            let image = try Qcow2Image(path: imagePath)
            guard image.virtualSize == manifest.virtualSize else {
                throw BackupError.invalidManifest(
                    path: directory.file(BackupDirectory.manifestName(index: manifest.index)),
                    reason: "records \(manifest.virtualSize) bytes but \(manifest.file) is \(image.virtualSize) bytes")
            }
            guard image.backingFile == manifest.backingFile else {
                throw BackupError.invalidImage(
                    path: imagePath,
                    reason: "backing file \(image.backingFile ?? "none"), the manifest says \(manifest.backingFile ?? "none")")
            }
            if let first = layers.first, first.clusterSize != image.clusterSize {
                throw BackupError.invalidImage(path: imagePath, reason: "cluster size differs from the rest of the chain")
            }
            layers.append(image)
        }
        return layers
    }

    /// Number of guest clusters.
    public var clusterCount: UInt64 {
        (virtualSize + clusterSize - 1) / clusterSize
    }

    /// Where guest cluster `index` comes from.
    public func source(ofCluster index: UInt64) throws(BackupError) -> Source {
        for layer in layers.indices.reversed() {
            switch try layers[layer].clusterState(index) {
            case .unallocated: continue
            case .zero: return .zero
            case .data(let hostOffset): return .data(layer: layer, hostOffset: hostOffset)
            }
        }
        return .zero
    }

    /// Fills `buffer` with the guest bytes at `offset` (any alignment, within the disk).
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(BackupError) {
        guard let base = buffer.baseAddress else { return }
        let (end, overflow) = offset.addingReportingOverflow(UInt64(buffer.count))
        guard !overflow, end <= virtualSize else {
            throw BackupError.invalidArgument("read past the end of the chain's disk (\(offset)+\(buffer.count))")
        }
        var done = 0
        while done < buffer.count {
            let position = offset + UInt64(done)
            let cluster = position / clusterSize
            let within = position % clusterSize
            let length = Int(min(clusterSize - within, UInt64(buffer.count - done)))
            let target = UnsafeMutableRawBufferPointer(start: base + done, count: length)
            switch try source(ofCluster: cluster) {
            case .zero:
                target.initializeMemory(as: UInt8.self, repeating: 0)
            case .data(let layer, let hostOffset):
                try layers[layer].readHost(into: target, at: hostOffset + within)
            }
            done += length
        }
    }

    /// `count` guest bytes at `offset`.
    public func read(count: Int, at offset: UInt64) throws(BackupError) -> [UInt8] {
        var failure: BackupError?
        let bytes = [UInt8](unsafeUninitializedCapacity: count) { buffer, initialized in
            buffer.initialize(repeating: 0)
            do throws(BackupError) {
                try read(into: UnsafeMutableRawBufferPointer(buffer), at: offset)
            } catch {
                failure = error
            }
            initialized = count
        }
        if let failure { throw failure }
        return bytes
    }
}
