import NIOCore

/// One transmission-phase request as it came off the wire, not yet validated.
public struct NBDRequest: Sendable {
    /// Raw command type; unknown values are kept so they can be refused with EINVAL.
    public var type: UInt16
    /// Raw command flags.
    public var flags: NBDCommandFlags
    /// Opaque cookie echoed in every reply.
    public var cookie: UInt64
    public var offset: UInt64
    /// The effect length (how much of the export the command touches); for WRITE, the payload
    /// length. 32 bits on the wire with compact headers, 64 with extended headers.
    public var length: UInt64
    /// The WRITE payload; nil for other commands and for drained oversized writes.
    public var payload: ByteBuffer?
    /// True when a WRITE payload was too large to keep and was read and thrown away.
    public var payloadDiscarded: Bool
    /// Why the request must be refused although the stream stayed in sync (extended
    /// headers: a payload where none belongs, a length past 2^63 - 1); nil when well formed.
    public var defect: NBDRequestDefect?

    public init(
        type: UInt16, flags: NBDCommandFlags, cookie: UInt64, offset: UInt64, length: UInt64,
        payload: ByteBuffer? = nil, payloadDiscarded: Bool = false, defect: NBDRequestDefect? = nil
    ) {
        self.type = type
        self.flags = flags
        self.cookie = cookie
        self.offset = offset
        self.length = length
        self.payload = payload
        self.payloadDiscarded = payloadDiscarded
        self.defect = defect
    }

    /// Size of the compact request header.
    public static let headerSize = 28
}

/// A request the decoder framed correctly but that breaks an extended-header rule; the
/// transmission machine refuses it with `NBD_EINVAL` and the connection goes on.
public enum NBDRequestDefect: Sendable, Equatable, CustomStringConvertible {
    /// `NBD_CMD_FLAG_PAYLOAD_LEN` on a command that takes no payload (or whose payload form
    /// the server does not offer): the payload of this many bytes was read and dropped.
    case unexpectedPayload(UInt64)
    /// An effect length past 2^63 - 1.
    case lengthTooLarge(UInt64)

    public var description: String {
        switch self {
        case .unexpectedPayload(let length):
            return "a \(length)-byte payload (NBD_CMD_FLAG_PAYLOAD_LEN) on a command that takes none"
        case .lengthTooLarge(let length):
            return "length \(length) is past 2^63 - 1"
        }
    }
}
