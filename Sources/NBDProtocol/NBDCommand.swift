import NIOCore

/// A validated request: every field checked against the session, ready to execute.
public enum NBDCommand: Sendable {
    case read(offset: UInt64, length: UInt32, dontFragment: Bool)
    case write(offset: UInt64, payload: ByteBuffer, fua: Bool)
    case flush
    case trim(offset: UInt64, length: UInt32, fua: Bool)
    case cache(offset: UInt64, length: UInt32)
    case writeZeroes(offset: UInt64, length: UInt32, noHole: Bool, fastZero: Bool, fua: Bool)
    case blockStatus(offset: UInt64, length: UInt32, requestOne: Bool)
}
