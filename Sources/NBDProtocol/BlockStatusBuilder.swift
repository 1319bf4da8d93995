import NIOCore

/// Turns a context's extents into one block status chunk that every client accepts:
/// BLOCK_STATUS (32-bit extents) with compact headers, BLOCK_STATUS_EXT (64-bit extents and
/// status, with a descriptor count) with extended headers.
///
/// Extents are fed in order from the request offset. The builder merges neighbours with
/// equal flags, never emits a zero-length extent, clips the last extent to the request end
/// (and so never passes the export end), keeps exactly one extent under REQ_ONE, and caps
/// the count so a reply stays bounded. The qemu client always sends REQ_ONE and rejects
/// chunks over 1000 bytes; a single extent is 12 bytes (24 extended).
public struct BlockStatusBuilder {
    /// Most extents in one chunk (as qemu's server); clients ask again for the rest.
    public static let maximumExtents = 1 << 16
    /// Longest compact extent: a u32, kept a multiple of 64 KiB so long runs split aligned.
    static let maximumCompactExtent: UInt64 = UInt64(UInt32.max) & ~UInt64(0xFFFF)

    public let contextID: UInt32
    public let requestOffset: UInt64
    public let requestEnd: UInt64
    public let framing: NBDFraming
    private let limit: Int
    private var position: UInt64
    private var extents: [(length: UInt64, flags: UInt32)] = []
    private var pendingLength: UInt64 = 0
    private var pendingFlags: UInt32 = 0

    /// - Parameters:
    ///   - contextID: the id the client got for this context in SET_META_CONTEXT.
    ///   - offset, length: the request's range (already checked against the export size).
    ///   - requestOne: the REQ_ONE flag.
    public init(contextID: UInt32, offset: UInt64, length: UInt32, requestOne: Bool) {
        self.init(contextID: contextID, offset: offset, length: UInt64(length), requestOne: requestOne, framing: .compact)
    }

    /// - Parameters:
    ///   - contextID: the id the client got for this context in SET_META_CONTEXT.
    ///   - offset, length: the request's range (already checked against the export size;
    ///     64-bit with extended headers).
    ///   - requestOne: the REQ_ONE flag.
    ///   - framing: the chunk type and header to write.
    public init(contextID: UInt32, offset: UInt64, length: UInt64, requestOne: Bool, framing: NBDFraming) {
        self.contextID = contextID
        self.requestOffset = offset
        self.position = offset
        let (end, overflow) = offset.addingReportingOverflow(length)
        self.requestEnd = overflow ? UInt64.max : end
        self.framing = framing
        self.limit = requestOne ? 1 : Self.maximumExtents
        extents.reserveCapacity(requestOne ? 1 : 16)
    }

    /// Longest single extent the framing can carry.
    private var maximumExtent: UInt64 {
        framing == .compact ? Self.maximumCompactExtent : UInt64.max
    }

    /// False once the chunk is full or covers the request; stop feeding then.
    public var wantsMore: Bool { extents.count < limit && position + pendingLength < requestEnd }

    /// The offset the next extent fed must start at.
    public var nextOffset: UInt64 { position + pendingLength }

    /// Adds the next run of `length` bytes with `flags`.
    public mutating func append(length: UInt64, flags: UInt32) {
        guard wantsMore, length > 0 else { return }
        let clipped = min(length, requestEnd - nextOffset)
        if pendingLength > 0 && flags == pendingFlags {
            pendingLength += clipped
        } else {
            flushPending()
            pendingFlags = flags
            pendingLength = clipped
        }
        // Each compact wire extent length is a u32: split very long runs.
        while pendingLength > UInt64(UInt32.max) && framing == .compact && extents.count < limit {
            let piece = Self.maximumCompactExtent
            extents.append((piece, pendingFlags))
            position += piece
            pendingLength -= piece
        }
    }

    private mutating func flushPending() {
        guard pendingLength > 0, extents.count < limit else { return }
        extents.append((pendingLength, pendingFlags))
        position += pendingLength
        pendingLength = 0
    }

    /// Writes the chunk. If nothing was fed, one extent covering the request with
    /// `fallbackFlags` is sent, so the chunk is never empty.
    public mutating func write(cookie: UInt64, done: Bool, fallbackFlags: UInt32, into buffer: inout ByteBuffer) {
        flushPending()
        if extents.isEmpty {
            extents.append((min(requestEnd - position, maximumExtent), fallbackFlags))
        }
        switch framing {
        case .compact:
            NBDReplyEncoder.writeChunkHeader(
                cookie: cookie, type: NBDChunkType.blockStatus, done: done, length: UInt32(4 + 8 * extents.count),
                into: &buffer)
            buffer.writeInteger(contextID)
            for extent in extents {
                buffer.writeMultipleIntegers(UInt32(truncatingIfNeeded: extent.length), extent.flags)
            }
        case .extended:
            NBDReplyEncoder.writeChunkHeader(
                cookie: cookie, type: NBDChunkType.blockStatusExtended, done: done,
                length: UInt32(8 + 16 * extents.count), framing: .extended, requestOffset: requestOffset, into: &buffer)
            buffer.writeMultipleIntegers(contextID, UInt32(extents.count))
            for extent in extents {
                // Every context served here has 32-bit status: the upper half is zero.
                buffer.writeMultipleIntegers(extent.length, UInt64(extent.flags))
            }
        }
    }
}

/// Flags of the `base:allocation` context.
public enum NBDAllocationFlags {
    public static let hole: UInt32 = 1
    public static let zero: UInt32 = 2
}

/// Flags of the `qemu:dirty-bitmap:NAME` contexts.
public enum NBDDirtyFlags {
    public static let dirty: UInt32 = 1
}
