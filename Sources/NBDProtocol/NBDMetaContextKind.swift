/// What a metadata context reports, resolved from its name once, when the client selects
/// it (`NBD_OPT_SET_META_CONTEXT`), so BLOCK_STATUS never parses names again.
public enum NBDMetaContextKind: Sendable, Equatable {
    /// `base:allocation`: holes and zeroes of the export.
    case baseAllocation
    /// `qemu:dirty-bitmap:NAME`: the named bitmap's dirty granules, as qemu-nbd `-B` names it.
    case dirtyBitmap(String)
    /// A name this server does not interpret. Only offered contexts can be selected, so
    /// this answers only for an export whose list is not built from the two names above.
    case unrecognized

    /// Name of the allocation context every export offers.
    public static let baseAllocationName = "base:allocation"
    /// Prefix of the contexts that expose a dirty bitmap.
    public static let dirtyBitmapPrefix = "qemu:dirty-bitmap:"

    public init(contextName name: String) {
        if name == Self.baseAllocationName {
            self = .baseAllocation
        } else if name.hasPrefix(Self.dirtyBitmapPrefix) {
            self = .dirtyBitmap(String(name.dropFirst(Self.dirtyBitmapPrefix.count)))
        } else {
            self = .unrecognized
        }
    }

    /// The context name that offers `bitmap`.
    public static func dirtyBitmapContext(_ bitmap: String) -> String { dirtyBitmapPrefix + bitmap }
}
