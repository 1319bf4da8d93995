import BackupChain
import BlockStorage
import DirtyTracking
import Logging

/// Opening a point of a backup chain as an export (`backup:PATH[@POINT][:rw]`).
extension ExportOpener {
    /// Opens the chain point `specification` names as export `name`.
    ///
    /// Read-only: the chain alone, no file is written, bitmaps are in memory (nothing
    /// changes). Writable: an overlay beside the chain (`backup-NNNN.overlay` and its map,
    /// or `FILE.overlay` for a qcow2 file), whose bitmap store is the overlay's like any
    /// raw image's, so the machine running from the backup can be backed up incrementally.
    /// A store that cannot record writes refuses the export rather than serving it with
    /// writes nobody records.
    public static func openChain(
        id: String? = nil, name: String, specification: ChainExportSpecification, description: String,
        bitmaps: [BitmapRequest], stateDirectory: String? = nil, logger: Logger
    ) throws -> Export {
        let location: ChainLocation
        let chain: ChainImage
        do throws(BackupError) {
            location = try ChainLocation.open(path: specification.path, point: specification.point)
            chain = try ChainImage(layers: location.layers)
        } catch {
            throw ServerError.invalidChainSpecification(
                ChainExportSpecification.prefix + specification.path + (specification.point.map { "@" + $0 } ?? ""),
                reason: error.description)
        }
        for bitmap in bitmaps {
            try BitmapLimits.checkSize(name: bitmap.name, imageSize: chain.size, granularity: bitmap.granularity)
        }
        let shown = description.isEmpty ? "backup \(location.name) (point \(location.index)) of \(specification.path)" : description
        let topPath = chain.layerPaths[chain.layerPaths.count - 1]
        guard specification.writable else {
            let image = try RawImage(path: topPath, readOnly: true)
            logger.info("serving \(specification.path) at point \(location.index) (\(location.name)) read-only, \(location.layers.count) files")
            return Export(
                id: id ?? name, name: name, description: shown, image: image, chain: chain, overlay: nil,
                tracker: DirtyTracker(size: chain.size))
        }
        let overlay = try ChainOverlay(chain: chain, dataPath: location.overlayPath, identity: location.identity)
        let store = StoreLocator(image: overlay.data, stateDirectory: stateDirectory)
        let tracker: DirtyTracker
        switch try Self.tracker(location: store, image: overlay.data, readOnly: false, bitmaps: bitmaps, logger: logger) {
        case .tracked(let opened):
            tracker = opened
        case .untracked:
            tracker = DirtyTracker(size: chain.size)
        case .readOnly:
            throw ServerError.invalidChainSpecification(
                ChainExportSpecification.prefix + specification.path,
                reason: "the overlay's bitmap store cannot record writes (see the error above); serve it read-only")
        }
        logger.info(
            "serving \(specification.path) at point \(location.index) (\(location.name)) writable: writes go to \(location.overlayPath) (\(overlay.writtenGranules) granules written so far)")
        return Export(
            id: id ?? name, name: name, description: shown, image: overlay.data, chain: chain, overlay: overlay,
            tracker: tracker)
    }
}
