import CLibNBD

/// Status bits of the `base:allocation` metadata context (`LIBNBD_STATE_*`).
///
/// Block-status extents carry raw `UInt32` flags because their meaning depends on the
/// context; this type names the two bits `base:allocation` defines so callers can write
/// `NBDAllocationFlags(rawValue: extent.flags).contains(.zero)`.
public struct NBDAllocationFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32

    public init(rawValue: UInt32) {
        self.rawValue = rawValue
    }

    /// Not allocated: a later write may need space.
    public static let hole = NBDAllocationFlags(rawValue: UInt32(LIBNBD_STATE_HOLE))
    /// Reads as zeroes.
    public static let zero = NBDAllocationFlags(rawValue: UInt32(LIBNBD_STATE_ZERO))

    /// The name of the context these flags belong to.
    public static let contextName = LIBNBD_CONTEXT_BASE_ALLOCATION
}
