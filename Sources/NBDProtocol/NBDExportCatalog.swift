/// What the handshake needs to know about one export. A plain value, so the protocol
/// layer stays free of storage and bitmaps.
public struct NBDExportSummary: Sendable, Equatable {
    /// The export's canonical name.
    public var name: String
    /// Human-readable text shown by `nbdinfo --list` and `qemu-nbd --list`.
    public var description: String
    /// Size in bytes.
    public var size: UInt64
    /// True when writes must be refused.
    public var isReadOnly: Bool
    /// Smallest addressable unit: 512, or 1 when the size is not a multiple of 512.
    public var minimumBlockSize: UInt32
    /// Metadata contexts a client may select, e.g. `base:allocation`, `qemu:dirty-bitmap:b0`.
    public var metaContexts: [String]

    public init(
        name: String, description: String, size: UInt64, isReadOnly: Bool,
        minimumBlockSize: UInt32, metaContexts: [String]
    ) {
        self.name = name
        self.description = description
        self.size = size
        self.isReadOnly = isReadOnly
        self.minimumBlockSize = minimumBlockSize
        self.metaContexts = metaContexts
    }

    /// The flags this export advertises, given what the connection negotiated.
    public func transmissionFlags(structuredReplies: Bool) -> NBDTransmissionFlags {
        var flags: NBDTransmissionFlags = [.hasFlags, .sendFlush, .sendFUA, .sendCache, .canMultiConn]
        if isReadOnly {
            flags.insert(.readOnly)
        } else {
            flags.formUnion([.sendTrim, .sendWriteZeroes, .sendFastZero])
        }
        if structuredReplies { flags.insert(.sendDF) }
        return flags
    }
}

/// Looks exports up by name for the handshake. The server's export registry conforms.
public protocol NBDExportCatalog {
    /// Every export, the default (first) one first.
    func exportSummaries() -> [NBDExportSummary]
    /// The export with this name; the empty name selects the first export.
    func exportSummary(named name: String) -> NBDExportSummary?
}
