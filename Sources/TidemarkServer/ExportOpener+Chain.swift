import BackupChain
import BlockStorage
import DirtyTracking
import Logging

#if canImport(Glibc)
import Glibc
#endif

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

extension ExportOpener {
    /// The progress map's name inside a block device's store in the state directory.
    public static let restoreMapName = "restore-map"

    /// Opens a live restore of the chain point `source` into `target` (a raw file, created
    /// if missing, or a block device; never smaller than the disk) as export `name`, and
    /// its copier (not started). The target is served writable at once: reads of what is
    /// not copied yet come from the chain, writes go to the target. Progress is kept in
    /// `TARGET.restore-map`, bound to the chain point: resuming with another point is
    /// refused, so the target is never a mix of two.
    ///
    /// A block device's map cannot sit beside it (`/dev` is devtmpfs, memory a reboot
    /// empties): it goes in the device's store in the state directory
    /// (`STATE/stores/NAME/restore-map`, `stateDirectory` or the default), the store named
    /// after the disk's identity like its bitmaps. So the same disk at another path (a loop
    /// file attached again) resumes, another disk at the same path never takes its map
    /// (it starts from scratch, or is refused as a swapped disk), and the store's lock
    /// keeps a second restore or server from writing the device at the same time.
    public static func openLiveRestore(
        id: String? = nil, name: String, source: ChainExportSpecification, target: String, bytesPerSecond: UInt64?, showProgress: Bool,
        bitmaps: [BitmapRequest], stateDirectory: String? = nil, logger: Logger
    ) throws -> (Export, LiveRestoreCopier) {
        let location: ChainLocation
        let chain: ChainImage
        let shown = ChainExportSpecification.prefix + source.path + (source.point.map { "@" + $0 } ?? "")
        do throws(BackupError) {
            location = try ChainLocation.open(path: source.path, point: source.point)
            chain = try ChainImage(layers: location.layers)
        } catch {
            throw ServerError.invalidChainSpecification(shown, reason: error.description)
        }
        for bitmap in bitmaps {
            try BitmapLimits.checkSize(name: bitmap.name, imageSize: chain.size, granularity: bitmap.granularity)
        }
        var info = stat()
        let isBlockDevice = stat(target, &info) == 0 && info.st_mode & S_IFMT == S_IFBLK
        let mapPath: String
        // A block device's store holds its map, so it is found before the overlay opens.
        var deviceStore: StoreLocator?
        if isBlockDevice {
            // Checked before anything is created in the state directory.
            let device = try RawImage(path: target, readOnly: true)
            guard device.size >= chain.size else {
                throw ServerError.invalidLiveRestoreTarget(
                    target,
                    reason: "the device is \(device.size) bytes but the backup's disk is \(chain.size) bytes: too small to hold it "
                        + "(use a device of at least \(chain.size) bytes)")
            }
            let store = StoreLocator(image: device, stateDirectory: stateDirectory)
            deviceStore = store
            mapPath = store.directory + "/" + Self.restoreMapName
        } else {
            mapPath = target + ".restore-map"
        }
        let identity = "the live restore of \(location.identity), point \(location.index) of \(source.path)"
        let overlay = try ChainOverlay(chain: chain, dataPath: target, mapPath: mapPath, identity: identity, allowLarger: true)
        let store = deviceStore ?? StoreLocator(image: overlay.data, stateDirectory: stateDirectory)
        let tracker: DirtyTracker
        switch try Self.tracker(
            location: store, image: overlay.data, readOnly: false, bitmaps: bitmaps, requireStore: isBlockDevice, logger: logger)
        {
        case .tracked(let opened): tracker = opened
        case .untracked: tracker = DirtyTracker(size: chain.size)
        case .readOnly:
            throw ServerError.invalidLiveRestoreTarget(
                target,
                reason: isBlockDevice
                    ? "its store in the state directory '\(store.directory)', which keeps the copy's progress and the bitmaps, "
                        + "cannot be used (see the error above; choose another with --state-dir)"
                    : "the target's bitmap store cannot record writes (see the error above)")
        }
        if isBlockDevice { logger.info("live restore progress of \(target) is kept in \(mapPath)") }
        let copier = LiveRestoreCopier(
            overlay: overlay, target: target, bytesPerSecond: bytesPerSecond, showProgress: showProgress, logger: logger)
        let export = Export(
            id: id ?? name, name: name, description: "live restore of backup \(location.name) into \(target)",
            image: overlay.data, chain: chain, overlay: overlay, tracker: tracker, liveRestore: copier)
        return (export, copier)
    }
}
