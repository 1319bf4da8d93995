/// Gathers the extents libnbd hands to a block-status callback.
///
/// libnbd calls the C extent callback once per status chunk, possibly several times per
/// context, with a flat array of (length, flags) pairs. The callback cannot capture Swift
/// state, so this box travels through `user_data` as an unretained pointer and is only
/// touched during the synchronous `nbd_block_status` call.
final class ExtentCollector {
    private(set) var extents: [String: [NBDExtent]] = [:]

    /// Appends the pairs in `entries` (length, flags, length, flags, …) to `context`.
    func append(context: String, entries: UnsafeBufferPointer<UInt32>) {
        var list = extents[context, default: []]
        var index = 0
        while index + 1 < entries.count {
            list.append((length: entries[index], flags: entries[index + 1]))
            index += 2
        }
        extents[context] = list
    }
}
