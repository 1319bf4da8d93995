/// What a query reports about one bitmap (QEMU's `BlockDirtyInfo` fields, plus the
/// recovery generation of its store).
public struct BitmapInfo: Sendable, Equatable, Codable {
    public var name: String
    /// Dirty bytes, in whole granules.
    public var count: UInt64
    public var granularity: UInt64
    /// True while writes are being recorded.
    public var recording: Bool
    /// True while an operation (a checkpoint) holds the bitmap.
    public var busy: Bool
    /// True when the bitmap is saved beside the image and survives restarts.
    public var persistent: Bool
    /// Unclean recoveries the bitmap's store has been through (0 for a bitmap that
    /// never saw a crash, or that is not persistent).
    public var generation: UInt64
    /// For a checkpoint's frozen increment, the bitmap it was taken from.
    public var checkpointOf: String?
    /// For a live bitmap, its last completed checkpoint; for an increment, its base and
    /// the later checkpoints whose changes it also holds.
    public var lineage: CheckpointLineage
    /// For an increment, the checkpoint's unique id.
    public var checkpointID: String?
    /// For an increment, whether it is aborted when its creator is gone.
    public var abortOnDisconnect: Bool

    public init(
        name: String, count: UInt64, granularity: UInt64, recording: Bool, busy: Bool, persistent: Bool,
        generation: UInt64, checkpointOf: String? = nil, lineage: CheckpointLineage = CheckpointLineage(),
        checkpointID: String? = nil, abortOnDisconnect: Bool = true
    ) {
        self.name = name
        self.count = count
        self.granularity = granularity
        self.recording = recording
        self.busy = busy
        self.persistent = persistent
        self.generation = generation
        self.checkpointOf = checkpointOf
        self.lineage = lineage
        self.checkpointID = checkpointID
        self.abortOnDisconnect = abortOnDisconnect
    }
}

/// A run of bytes that is dirty or clean in a bitmap.
public struct DirtyExtent: Sendable, Equatable, Codable {
    public var offset: UInt64
    public var length: UInt64
    public var dirty: Bool

    public init(offset: UInt64, length: UInt64, dirty: Bool) {
        self.offset = offset
        self.length = length
        self.dirty = dirty
    }
}
