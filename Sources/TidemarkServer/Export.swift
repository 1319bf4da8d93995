import BlockStorage
import DirtyTracking
import NBDProtocol

/// One named image served to clients: a live image, or a point-in-time view of one.
///
/// Shared by every connection to it (one file descriptor, one page cache), which is what
/// makes `CAN_MULTI_CONN` honest: a FLUSH on any connection covers writes from all.
///
/// Other modules see only what describes the export; what changes it (bitmaps,
/// checkpoints, views, removal) goes through `ExportRegistry`, and every change of its
/// image and bitmaps through its `ExportWrites`.
public final class Export: Sendable {
    /// What the export's reads show.
    enum Content: Sendable {
        /// The image as it is now; its writes preserve old data into the open views.
        case live(OpenViews)
        /// The image at a checkpoint's instant, carrying the checkpoint's increment.
        /// With `changesOnly`, `base:allocation` reports the granules clean in the
        /// increment as zero holes and the dirty ones as data, so a copying tool that skips
        /// zeroes (`nbdcopy --destination-is-zero`) reads exactly the increment.
        case view(PointInTimeView, increment: String, changesOnly: Bool)
    }

    /// The export's identity for management (QMP's block export `id`, as QEMU keys
    /// exports): `query-block-exports` reports it and `block-export-del` takes it. The
    /// same as `name` for exports from the command line and for views.
    public let id: String
    /// The name NBD clients ask for, and the `node` of bitmap and checkpoint commands.
    public let name: String
    public let description: String
    let image: RawImage
    public let isReadOnly: Bool
    /// The image's named bitmaps; every write on every connection is recorded here.
    let tracker: DirtyTracker
    let content: Content
    /// The owner of the image's modifications and checkpoints (a view's is its live
    /// export's, so the live export counts as in use while its views are).
    let writes: ExportWrites

    /// A live export.
    /// - Parameters:
    ///   - id: the management id; `name` when nil.
    ///   - tracker: the image's bitmaps; a fresh in-memory tracker by default.
    public init(
        id: String? = nil, name: String, description: String, image: RawImage, readOnly: Bool, tracker: DirtyTracker? = nil
    ) {
        self.id = id ?? name
        self.name = name
        self.description = description
        self.image = image
        self.isReadOnly = readOnly || image.isReadOnly
        let writes = ExportWrites(image: image, tracker: tracker ?? DirtyTracker(size: image.size))
        self.writes = writes
        self.tracker = writes.tracker
        self.content = .live(writes.views)
    }

    /// A read-only view export of `live` at checkpoint `increment`.
    init(name: String, viewOf live: Export, view: PointInTimeView, increment: String, changesOnly: Bool) {
        self.id = name
        self.name = name
        self.description =
            changesOnly
            ? "changes of '\(live.name)' in checkpoint \(increment)" : "'\(live.name)' at checkpoint \(increment)"
        self.image = live.image
        self.isReadOnly = true
        self.tracker = live.tracker
        self.writes = live.writes
        self.content = .view(view, increment: increment, changesOnly: changesOnly)
    }

    /// The views open on a live export (nil for a view).
    var openViews: OpenViews? {
        if case .live(let views) = content { return views }
        return nil
    }

    /// True for a point-in-time view's export (bitmaps and checkpoints belong to the live
    /// export it shows).
    public var isView: Bool { openViews == nil }

    /// The image file (or block device) the export serves.
    public var fileName: String { image.path }

    /// The export's size in bytes.
    public var size: UInt64 { image.size }

    /// The image's bitmaps, in creation order (a view's: its live export's).
    public var bitmaps: [BitmapInfo] { tracker.query() }

    /// The default name of the next checkpoint (`DirtyTracker.nextCheckpointName`).
    public var nextCheckpointName: String { tracker.nextCheckpointName() }

    /// The bitmaps offered as `qemu:dirty-bitmap:` contexts: all of a live export's, only
    /// the increment of a view.
    public var offeredBitmaps: [String] {
        switch content {
        case .live: return tracker.names
        case .view(_, let increment, _): return [increment]
        }
    }

    /// The open view of a checkpoint on this live export, as management reports it.
    public func view(ofCheckpoint checkpoint: String) -> ViewStatus? {
        guard let entry = openViews?.entry(checkpoint: checkpoint) else { return nil }
        return ViewStatus(
            exportNames: entry.exportNames, preservedBytes: entry.view.preservedBytes,
            sidecarBytes: entry.view.sidecarAllocatedBytes, failure: entry.view.failure?.description)
    }

    /// Saves the bitmaps of an export that was opened but never served (adding it
    /// failed), marked as cleanly closed, so its store is left as it was found.
    public func closeUnserved() {
        try? tracker.save(cleanShutdown: true)
    }

    /// The export as the handshake sees it.
    public var summary: NBDExportSummary {
        NBDExportSummary(
            name: name,
            description: description,
            size: image.size,
            isReadOnly: isReadOnly,
            minimumBlockSize: image.size % 512 == 0 ? 512 : 1,
            metaContexts: [NBDMetaContextKind.baseAllocationName]
                + offeredBitmaps.map(NBDMetaContextKind.dirtyBitmapContext)
        )
    }
}
