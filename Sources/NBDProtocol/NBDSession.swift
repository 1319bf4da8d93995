/// A metadata context the client selected with `NBD_OPT_SET_META_CONTEXT`.
public struct NBDSelectedContext: Sendable, Equatable {
    /// The id replies carry for this context.
    public var id: UInt32
    /// The context's full name, e.g. `base:allocation`.
    public var name: String
    /// What the context reports, resolved from `name` at selection.
    public var kind: NBDMetaContextKind

    public init(id: UInt32, name: String) {
        self.id = id
        self.name = name
        self.kind = NBDMetaContextKind(contextName: name)
    }
}

/// Everything the handshake settled that the transmission phase needs.
public struct NBDSession: Sendable, Equatable {
    /// The export's canonical name.
    public var exportName: String
    /// Export size in bytes, as advertised.
    public var size: UInt64
    /// Flags advertised for this connection.
    public var transmissionFlags: NBDTransmissionFlags
    /// Whether structured replies were negotiated.
    public var structuredReplies: Bool
    /// Contexts selected for BLOCK_STATUS, in reply order.
    public var metaContexts: [NBDSelectedContext]
    /// Advertised minimum block size.
    public var minimumBlockSize: UInt32
    /// True when the client asked for block sizes in GO and so agreed to honour them:
    /// only then are unaligned requests refused.
    public var enforcesBlockSize: Bool
    /// Compact or extended (`NBD_OPT_EXTENDED_HEADERS`) request and reply headers.
    public var framing: NBDFraming

    public init(
        exportName: String, size: UInt64, transmissionFlags: NBDTransmissionFlags,
        structuredReplies: Bool, metaContexts: [NBDSelectedContext],
        minimumBlockSize: UInt32, enforcesBlockSize: Bool, framing: NBDFraming = .compact
    ) {
        self.exportName = exportName
        self.size = size
        self.transmissionFlags = transmissionFlags
        self.structuredReplies = structuredReplies
        self.metaContexts = metaContexts
        self.minimumBlockSize = minimumBlockSize
        self.enforcesBlockSize = enforcesBlockSize
        self.framing = framing
    }

    /// True for exports that refuse writes.
    public var isReadOnly: Bool { transmissionFlags.contains(.readOnly) }
}
