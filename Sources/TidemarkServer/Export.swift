import BackupChain
import BlockStorage
import DirtyTracking
import NBDProtocol

/// One named image served to clients: a live image, or a point-in-time view of one.
///
/// Shared by every connection to it (one file descriptor, one page cache), which is what
/// makes `CAN_MULTI_CONN` honest: a FLUSH on any connection covers writes from all.
public final class Export: Sendable {
    /// What the export's reads show.
    public enum Content: Sendable {
        /// The image as it is now; its writes preserve old data into the open views.
        case live(OpenViews)
        /// The image at a checkpoint's instant, carrying the checkpoint's increment.
        /// With `changesOnly`, `base:allocation` reports the granules clean in the
        /// increment as zero holes and the dirty ones as data, so a copying tool that skips
        /// zeroes (`nbdcopy --destination-is-zero`) reads exactly the increment.
        case view(PointInTimeView, increment: String, changesOnly: Bool)
        /// A point of a backup chain (``ChainExport``); with an overlay, writable.
        case chain(ChainImage, overlay: ChainOverlay?)
    }

    /// The export's identity for management (QMP's block export `id`, as QEMU keys
    /// exports): `query-block-exports` reports it and `block-export-del` takes it. The
    /// same as `name` for exports from the command line and for views.
    public let id: String
    /// The name NBD clients ask for, and the `node` of bitmap and checkpoint commands.
    public let name: String
    public let description: String
    public let image: RawImage
    public let isReadOnly: Bool
    /// The image's named bitmaps; every write on every connection is recorded here.
    public let tracker: DirtyTracker
    public let content: Content
    /// The copier filling this export's target when it is a live restore.
    public let liveRestore: LiveRestoreCopier?

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
        self.tracker = tracker ?? DirtyTracker(size: image.size)
        self.content = .live(OpenViews())
        self.liveRestore = nil
    }

    /// A read-only view export of `live` at checkpoint `increment`.
    public init(name: String, viewOf live: Export, view: PointInTimeView, increment: String, changesOnly: Bool) {
        self.id = name
        self.name = name
        self.description =
            changesOnly
            ? "changes of '\(live.name)' in checkpoint \(increment)" : "'\(live.name)' at checkpoint \(increment)"
        self.image = live.image
        self.isReadOnly = true
        self.tracker = live.tracker
        self.content = .view(view, increment: increment, changesOnly: changesOnly)
        self.liveRestore = nil
    }

    /// A chain export: `image` is the overlay file (writable) or the chain's top file
    /// (read-only), which locate its bitmap store; the disk is `content`'s.
    init(
        id: String, name: String, description: String, image: RawImage, chain: ChainImage, overlay: ChainOverlay?,
        tracker: DirtyTracker, liveRestore: LiveRestoreCopier? = nil
    ) {
        self.id = id
        self.name = name
        self.description = description
        self.image = image
        self.isReadOnly = overlay == nil
        self.tracker = tracker
        self.content = .chain(chain, overlay: overlay)
        self.liveRestore = liveRestore
    }

    /// True for a point-in-time view's export (its bitmaps are its live export's); a
    /// backup chain export has bitmaps of its own but takes no views.
    public var isPointInTimeView: Bool {
        if case .view = content { return true }
        return false
    }

    /// The size of the disk served.
    public var size: UInt64 {
        if case .chain(let chain, _) = content { return chain.size }
        return image.size
    }

    /// Makes every acknowledged write durable (a chain's overlay: its data and map).
    public func flushImage() throws(StorageError) {
        if case .chain(_, let overlay) = content {
            try overlay?.flush()
            return
        }
        try image.flush()
    }

    /// The views open on a live export (nil for a view).
    public var openViews: OpenViews? {
        if case .live(let views) = content { return views }
        return nil
    }

    /// The bitmaps offered as `qemu:dirty-bitmap:` contexts: all of a live export's, only
    /// the increment of a view.
    public var offeredBitmaps: [String] {
        switch content {
        case .live, .chain: return tracker.names
        case .view(_, let increment, _): return [increment]
        }
    }

    /// The export as the handshake sees it.
    public var summary: NBDExportSummary {
        NBDExportSummary(
            name: name,
            description: description,
            size: size,
            isReadOnly: isReadOnly,
            minimumBlockSize: size % 512 == 0 ? 512 : 1,
            metaContexts: [NBDMetaContextKind.baseAllocationName]
                + offeredBitmaps.map(NBDMetaContextKind.dirtyBitmapContext)
        )
    }
}
