import CLibNBD

/// Gathers the chunks libnbd hands to an `nbd_pread_structured` callback.
///
/// Travels through the C callback's `user_data` as an unretained pointer, like
/// ``ExtentCollector``, and is only touched during the synchronous call.
final class ChunkCollector {
    var chunks: [NBDReadChunk] = []

    func append(offset: UInt64, count: Int, status: UInt32) {
        let kind: NBDReadChunk.Kind
        switch Int32(bitPattern: status) {
        case LIBNBD_READ_DATA: kind = .data
        case LIBNBD_READ_HOLE: kind = .hole
        case LIBNBD_READ_ERROR: kind = .error
        default: kind = .other(status)
        }
        chunks.append(NBDReadChunk(offset: offset, count: count, kind: kind))
    }
}
