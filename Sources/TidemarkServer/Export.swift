import BlockStorage
import NBDProtocol

/// One named image served to clients.
///
/// Shared by every connection to it (one file descriptor, one page cache), which is what
/// makes `CAN_MULTI_CONN` honest: a FLUSH on any connection covers writes from all.
public final class Export: Sendable {
    /// Context name of the allocation map every export offers.
    public static let baseAllocation = "base:allocation"

    public let name: String
    public let description: String
    public let image: RawImage
    public let isReadOnly: Bool

    public init(name: String, description: String, image: RawImage, readOnly: Bool) {
        self.name = name
        self.description = description
        self.image = image
        self.isReadOnly = readOnly || image.isReadOnly
    }

    /// The export as the handshake sees it.
    public var summary: NBDExportSummary {
        NBDExportSummary(
            name: name,
            description: description,
            size: image.size,
            isReadOnly: isReadOnly,
            minimumBlockSize: image.size % 512 == 0 ? 512 : 1,
            metaContexts: [Self.baseAllocation]
        )
    }
}
