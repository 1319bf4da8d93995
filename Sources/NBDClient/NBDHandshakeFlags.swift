import CLibNBD

/// Handshake flags the client is willing to use (`LIBNBD_HANDSHAKE_FLAG_*`).
///
/// libnbd uses both by default. Clearing `.fixedNewstyle` emulates an old "non-fixed
/// newstyle" client, which may only send `NBD_OPT_EXPORT_NAME`; clearing `.noZeroes` makes
/// the server send the 124 bytes of padding after EXPORT_NAME. Tests use this to check
/// that the server copes with older clients.
public struct NBDHandshakeFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32

    public init(rawValue: UInt32) {
        self.rawValue = rawValue
    }

    public static let fixedNewstyle = NBDHandshakeFlags(rawValue: LIBNBD_HANDSHAKE_FLAG_FIXED_NEWSTYLE)
    public static let noZeroes = NBDHandshakeFlags(rawValue: LIBNBD_HANDSHAKE_FLAG_NO_ZEROES)

    public static let all = NBDHandshakeFlags(rawValue: LIBNBD_HANDSHAKE_FLAG_MASK)
}
