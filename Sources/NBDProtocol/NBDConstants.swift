/// Magic numbers that frame every NBD message.
public enum NBDMagic {
    /// "NBDMAGIC", first 8 bytes of the greeting.
    public static let greeting: UInt64 = 0x4e42_444d_4147_4943
    /// "IHAVEOPT", in the greeting and before every option request.
    public static let option: UInt64 = 0x4948_4156_454F_5054
    /// Prefix of every option reply.
    public static let optionReply: UInt64 = 0x0003_e889_0455_65a9
    /// Prefix of every compact transmission request.
    public static let request: UInt32 = 0x2560_9513
    /// Prefix of every transmission request once extended headers are negotiated.
    public static let extendedRequest: UInt32 = 0x21e4_1c71
    /// Prefix of a simple reply.
    public static let simpleReply: UInt32 = 0x6744_6698
    /// Prefix of a structured reply chunk.
    public static let structuredReply: UInt32 = 0x668e_33ef
    /// Prefix of every reply chunk once extended headers are negotiated.
    public static let extendedReply: UInt32 = 0x6e8a_278c
}

/// Handshake flags the server sends in its greeting.
public struct NBDHandshakeFlags: OptionSet, Sendable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let fixedNewstyle = NBDHandshakeFlags(rawValue: 1 << 0)
    public static let noZeroes = NBDHandshakeFlags(rawValue: 1 << 1)
}

/// Flags the client answers the greeting with.
public struct NBDClientFlags: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let fixedNewstyle = NBDClientFlags(rawValue: 1 << 0)
    public static let noZeroes = NBDClientFlags(rawValue: 1 << 1)
}

/// Option codes of the handshake phase.
public enum NBDOption {
    public static let exportName: UInt32 = 1
    public static let abort: UInt32 = 2
    public static let list: UInt32 = 3
    public static let peekExport: UInt32 = 4
    public static let startTLS: UInt32 = 5
    public static let info: UInt32 = 6
    public static let go: UInt32 = 7
    public static let structuredReply: UInt32 = 8
    public static let listMetaContext: UInt32 = 9
    public static let setMetaContext: UInt32 = 10
    public static let extendedHeaders: UInt32 = 11
}

/// Option reply types; errors have bit 31 set.
public enum NBDOptionReply {
    public static let ack: UInt32 = 1
    public static let server: UInt32 = 2
    public static let info: UInt32 = 3
    public static let metaContext: UInt32 = 4
    public static let errorUnsupported: UInt32 = 0x8000_0001
    public static let errorPolicy: UInt32 = 0x8000_0002
    public static let errorInvalid: UInt32 = 0x8000_0003
    public static let errorPlatform: UInt32 = 0x8000_0004
    public static let errorTLSRequired: UInt32 = 0x8000_0005
    public static let errorUnknown: UInt32 = 0x8000_0006
    public static let errorShutdown: UInt32 = 0x8000_0007
    public static let errorBlockSizeRequired: UInt32 = 0x8000_0008
    public static let errorTooBig: UInt32 = 0x8000_0009
    /// Extended headers are needed, or (for STRUCTURED_REPLY) already negotiated and taking
    /// precedence.
    public static let errorExtendedHeaderRequired: UInt32 = 0x8000_000A
}

/// Information types carried in `NBD_REP_INFO`.
public enum NBDInfoType {
    public static let export: UInt16 = 0
    public static let name: UInt16 = 1
    public static let description: UInt16 = 2
    public static let blockSize: UInt16 = 3
}

/// Transmission flags: what an export supports, sent with its size.
public struct NBDTransmissionFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let hasFlags = NBDTransmissionFlags(rawValue: 1 << 0)
    public static let readOnly = NBDTransmissionFlags(rawValue: 1 << 1)
    public static let sendFlush = NBDTransmissionFlags(rawValue: 1 << 2)
    public static let sendFUA = NBDTransmissionFlags(rawValue: 1 << 3)
    public static let rotational = NBDTransmissionFlags(rawValue: 1 << 4)
    public static let sendTrim = NBDTransmissionFlags(rawValue: 1 << 5)
    public static let sendWriteZeroes = NBDTransmissionFlags(rawValue: 1 << 6)
    public static let sendDF = NBDTransmissionFlags(rawValue: 1 << 7)
    public static let canMultiConn = NBDTransmissionFlags(rawValue: 1 << 8)
    public static let sendResize = NBDTransmissionFlags(rawValue: 1 << 9)
    public static let sendCache = NBDTransmissionFlags(rawValue: 1 << 10)
    public static let sendFastZero = NBDTransmissionFlags(rawValue: 1 << 11)
    /// BLOCK_STATUS accepts a payload naming the context ids to answer (extended headers only).
    public static let blockStatusPayload = NBDTransmissionFlags(rawValue: 1 << 12)
}

/// Command types of the transmission phase.
public enum NBDCommandType: UInt16, Sendable {
    case read = 0
    case write = 1
    case disconnect = 2
    case flush = 3
    case trim = 4
    case cache = 5
    case writeZeroes = 6
    case blockStatus = 7
}

/// Per-request command flags.
public struct NBDCommandFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let fua = NBDCommandFlags(rawValue: 1 << 0)
    public static let noHole = NBDCommandFlags(rawValue: 1 << 1)
    public static let dontFragment = NBDCommandFlags(rawValue: 1 << 2)
    public static let requestOne = NBDCommandFlags(rawValue: 1 << 3)
    public static let fastZero = NBDCommandFlags(rawValue: 1 << 4)
    /// Extended headers only: the header length is a payload length (mandatory on WRITE).
    public static let payloadLength = NBDCommandFlags(rawValue: 1 << 5)
}

/// Error values sent in replies (the protocol's own errno space).
public enum NBDError: UInt32, Sendable, Error {
    case permission = 1
    case io = 5
    case noMemory = 12
    case invalid = 22
    case noSpace = 28
    case overflow = 75
    case notSupported = 95
    case shutdown = 108
}

/// Structured reply chunk types.
public enum NBDChunkType {
    public static let none: UInt16 = 0
    public static let offsetData: UInt16 = 1
    public static let offsetHole: UInt16 = 2
    public static let blockStatus: UInt16 = 5
    /// Block status with 64-bit extent lengths and status (extended headers only).
    public static let blockStatusExtended: UInt16 = 6
    public static let error: UInt16 = 0x8001
    public static let errorOffset: UInt16 = 0x8002
    /// Flag on the final chunk of a reply.
    public static let flagDone: UInt16 = 1
}

/// Protocol-wide limits.
public enum NBDLimits {
    /// Longest string (export name, context name, message) the protocol allows.
    public static let maximumString = 4096
    /// Largest READ/WRITE payload the server advertises.
    public static let maximumPayload: UInt32 = 32 << 20
    /// Largest effect length an extended request may carry (lengths past 2^63 - 1 are refused:
    /// no export, offset arithmetic or client API reaches them).
    public static let maximumEffectLength: UInt64 = UInt64(Int64.max)
    /// WRITE payloads up to this size are drained and refused; larger ones end the connection.
    public static let maximumDrainedPayload: UInt32 = 64 << 20
    /// Preferred I/O size advertised to clients.
    public static let preferredBlockSize: UInt32 = 4096
    /// Largest option payload accepted during the handshake.
    public static let maximumOptionLength: UInt32 = 1 << 20
    /// Options accepted before the client must pick an export.
    public static let maximumOptionCount = 512
}
