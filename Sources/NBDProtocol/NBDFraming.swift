/// How transmission messages are framed on one connection.
///
/// `compact` is the classic layout (28-byte requests with a 32-bit length; 16-byte simple
/// replies and 20-byte structured chunks). `extended` is what `NBD_OPT_EXTENDED_HEADERS`
/// switches to: 32-byte requests with a 64-bit length and 32-byte reply chunks that echo the
/// request offset, and nothing else (no simple replies, BLOCK_STATUS_EXT for block status).
/// Every codec takes the framing as a parameter instead of existing twice, so the compact
/// bytes cannot drift from what they were.
public enum NBDFraming: Sendable, Equatable {
    case compact
    case extended

    /// Bytes of one request header.
    public var requestHeaderSize: Int {
        switch self {
        case .compact: 28
        case .extended: 32
        }
    }

    /// Bytes of one reply chunk header (structured or extended).
    public var chunkHeaderSize: Int {
        switch self {
        case .compact: 20
        case .extended: 32
        }
    }

    /// The magic every request must start with.
    public var requestMagic: UInt32 {
        switch self {
        case .compact: NBDMagic.request
        case .extended: NBDMagic.extendedRequest
        }
    }
}
