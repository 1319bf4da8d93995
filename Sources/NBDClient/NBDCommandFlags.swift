import CLibNBD

/// Per-command flags (`LIBNBD_CMD_FLAG_*`), the NBD wire's command flags as libnbd
/// exposes them.
///
/// An option set rather than raw integers so call sites read `[.fua]` or
/// `[.noHole, .fastZero]`, and so tests can pass exactly the flag combination they are
/// exercising. libnbd refuses flags the server did not advertise unless strict mode's
/// `.flags` check is turned off (see ``NBDStrictMode``).
public struct NBDCommandFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32

    public init(rawValue: UInt32) {
        self.rawValue = rawValue
    }

    /// Force unit access: the reply waits until this command's effect is durable.
    public static let fua = NBDCommandFlags(rawValue: LIBNBD_CMD_FLAG_FUA)
    /// WRITE_ZEROES must allocate rather than punch a hole.
    public static let noHole = NBDCommandFlags(rawValue: LIBNBD_CMD_FLAG_NO_HOLE)
    /// READ must come back as one unfragmented data chunk.
    public static let df = NBDCommandFlags(rawValue: LIBNBD_CMD_FLAG_DF)
    /// BLOCK_STATUS must return exactly one extent per context.
    public static let reqOne = NBDCommandFlags(rawValue: LIBNBD_CMD_FLAG_REQ_ONE)
    /// WRITE_ZEROES must fail with ENOTSUP unless zeroing is fast.
    public static let fastZero = NBDCommandFlags(rawValue: LIBNBD_CMD_FLAG_FAST_ZERO)

    /// Every flag this build of libnbd knows.
    public static let all = NBDCommandFlags(rawValue: LIBNBD_CMD_FLAG_MASK)
}
