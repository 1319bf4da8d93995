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
    public var length: UInt32
    /// The WRITE payload; nil for other commands and for drained oversized writes.
    public var payload: ByteBuffer?
    /// True when a WRITE payload was too large to keep and was read and thrown away.
    public var payloadDiscarded: Bool

    public init(
        type: UInt16, flags: NBDCommandFlags, cookie: UInt64, offset: UInt64, length: UInt32,
        payload: ByteBuffer? = nil, payloadDiscarded: Bool = false
    ) {
        self.type = type
        self.flags = flags
        self.cookie = cookie
        self.offset = offset
        self.length = length
        self.payload = payload
        self.payloadDiscarded = payloadDiscarded
    }

    /// Size of the compact request header.
    public static let headerSize = 28
}
