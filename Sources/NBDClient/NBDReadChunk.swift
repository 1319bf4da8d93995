/// One piece of a structured READ reply, as libnbd reports it to a chunk callback.
///
/// With structured replies a server may answer a READ with several data and hole chunks;
/// with `DF` it must send at most one data chunk. Recording the chunks lets tests check
/// how the server fragmented a reply, not just the bytes that came out of it.
public struct NBDReadChunk: Sendable, Hashable {
    /// What the chunk carried.
    public enum Kind: Sendable, Hashable {
        /// `NBD_REPLY_TYPE_OFFSET_DATA`: bytes.
        case data
        /// `NBD_REPLY_TYPE_OFFSET_HOLE`: a run of zeroes sent without its bytes.
        case hole
        /// `NBD_REPLY_TYPE_ERROR_OFFSET`: an error at this offset.
        case error
        /// A status libnbd added after this wrapper was written.
        case other(UInt32)
    }

    /// Absolute export offset of the chunk.
    public var offset: UInt64
    /// Bytes covered.
    public var count: Int
    public var kind: Kind

    public init(offset: UInt64, count: Int, kind: Kind) {
        self.offset = offset
        self.count = count
        self.kind = kind
    }
}
