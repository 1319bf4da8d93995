import CLibNBD

/// libnbd's client-side safety checks (`LIBNBD_STRICT_*`), set with `nbd_set_strict_mode`.
///
/// By default libnbd refuses to send requests a well-behaved server would reject
/// (unadvertised commands or flags, out-of-bounds ranges, zero lengths, unaligned
/// requests). Tests that check how the *server* handles such requests switch the relevant
/// checks off so the request actually reaches the wire.
public struct NBDStrictMode: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32

    public init(rawValue: UInt32) {
        self.rawValue = rawValue
    }

    /// Refuse commands the server did not advertise.
    public static let commands = NBDStrictMode(rawValue: LIBNBD_STRICT_COMMANDS)
    /// Refuse command flags the server did not advertise.
    public static let flags = NBDStrictMode(rawValue: LIBNBD_STRICT_FLAGS)
    /// Refuse ranges past the end of the export.
    public static let bounds = NBDStrictMode(rawValue: LIBNBD_STRICT_BOUNDS)
    /// Refuse zero-length requests.
    public static let zeroSize = NBDStrictMode(rawValue: LIBNBD_STRICT_ZERO_SIZE)
    /// Refuse requests not aligned to the server's minimum block size.
    public static let align = NBDStrictMode(rawValue: LIBNBD_STRICT_ALIGN)

    /// Every check this build of libnbd knows (libnbd's default).
    public static let all = NBDStrictMode(rawValue: LIBNBD_STRICT_MASK)
}
