/// The manifest of a bitmap store (`state.json`): which bitmaps exist, with their flags,
/// where their bits are, and whether the last server stopped cleanly.
struct StoredState: Codable, Equatable {
    static let currentVersion = 1

    struct Bitmap: Codable, Equatable {
        var name: String
        var granularity: UInt64
        var recording: Bool
        /// Leaf words stored for this bitmap, in order, in the data file.
        var wordCount: Int
        /// FNV-1a over the words, to catch a damaged data file.
        var checksum: UInt64
        /// For a pending checkpoint increment: the bitmap it was taken from.
        var checkpointOf: String?
        /// For an increment whose checkpoint ended tracking of its bitmap.
        var consumed: Bool?
        /// Checkpoint lineage (absent in stores written before it existed: no base).
        var lineage: CheckpointLineage?
        /// For an increment: its checkpoint's unique id.
        var checkpointID: String?
        /// For an increment: false when its creator asked not to abort it on disconnect.
        var abortOnDisconnect: Bool?
    }

    var version: Int
    /// Size of the image the bitmaps describe; a different size makes the store unusable.
    var imageSize: UInt64
    /// Journal epoch: journals numbered from this one on must be replayed after a crash.
    var epoch: UInt64
    /// Unclean recoveries so far.
    var generation: UInt64
    /// True only when the server that wrote this stopped cleanly.
    var cleanShutdown: Bool
    /// The data file holding every bitmap's words (little-endian u64), in `bitmaps` order.
    var dataFile: String
    var bitmaps: [Bitmap]
    /// The highest default checkpoint number handed out (`cN`), so names never repeat.
    var checkpointCounter: UInt64?
}

enum Checksum {
    /// FNV-1a 64 over the little-endian bytes of `words`.
    static func fnv1a(_ words: [UInt64]) -> UInt64 {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for word in words {
            var value = word.littleEndian
            for _ in 0..<8 {
                hash ^= value & 0xff
                hash = hash &* 0x100_0000_01b3
                value >>= 8
            }
        }
        return hash
    }
}
