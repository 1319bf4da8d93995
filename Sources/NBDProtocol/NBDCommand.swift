import NIOCore

/// A validated request: every field checked against the session, ready to execute.
///
/// READ lengths stay within the maximum payload (32 bits); TRIM, CACHE, WRITE_ZEROES and
/// BLOCK_STATUS carry 64-bit lengths, which extended headers allow (a whole multi-TiB disk
/// in one request), always within the export.
public enum NBDCommand: Sendable {
    case read(offset: UInt64, length: UInt32, dontFragment: Bool)
    case write(offset: UInt64, payload: ByteBuffer, fua: Bool)
    case flush
    case trim(offset: UInt64, length: UInt64, fua: Bool)
    case cache(offset: UInt64, length: UInt64)
    case writeZeroes(offset: UInt64, length: UInt64, noHole: Bool, fastZero: Bool, fua: Bool)
    case blockStatus(offset: UInt64, length: UInt64, requestOne: Bool)
}
