import BlockStorage
import DirtyTracking
import NBDProtocol

/// One named image served to clients.
///
/// Shared by every connection to it (one file descriptor, one page cache), which is what
/// makes `CAN_MULTI_CONN` honest: a FLUSH on any connection covers writes from all.
public final class Export: Sendable {
    /// Context name of the allocation map every export offers.
    public static let baseAllocation = "base:allocation"
    /// Prefix of the context that exposes a bitmap, as qemu-nbd names it.
    public static let dirtyBitmapPrefix = "qemu:dirty-bitmap:"

    public let name: String
    public let description: String
    public let image: RawImage
    public let isReadOnly: Bool
    /// The export's named bitmaps; every write on every connection is recorded here.
    public let tracker: DirtyTracker

    /// - Parameter tracker: the image's bitmaps; a fresh in-memory tracker by default.
    public init(name: String, description: String, image: RawImage, readOnly: Bool, tracker: DirtyTracker? = nil) {
        self.name = name
        self.description = description
        self.image = image
        self.isReadOnly = readOnly || image.isReadOnly
        self.tracker = tracker ?? DirtyTracker(size: image.size)
    }

    /// The export as the handshake sees it.
    public var summary: NBDExportSummary {
        NBDExportSummary(
            name: name,
            description: description,
            size: image.size,
            isReadOnly: isReadOnly,
            minimumBlockSize: image.size % 512 == 0 ? 512 : 1,
            metaContexts: [Self.baseAllocation] + tracker.names.map { Self.dirtyBitmapPrefix + $0 }
        )
    }
}
