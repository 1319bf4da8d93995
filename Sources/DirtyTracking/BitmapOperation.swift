/// One management operation on an export's bitmaps: QEMU's bitmap commands and
/// Tidemark's checkpoint steps, as values so a transaction is a list of them.
public enum BitmapOperation: Sendable, Equatable {
    case add(name: String, granularity: UInt64, persistent: Bool, recording: Bool)
    case remove(name: String)
    case clear(name: String)
    case setRecording(name: String, Bool)
    case merge(target: String, sources: [String])
    /// Freezes `bitmap`'s content into a new read-only, busy bitmap `increment` and lets
    /// `bitmap` go on recording from empty; with `consume`, `bitmap` stops existing.
    ///
    /// A bitmap has at most one pending checkpoint: the pending ones named in `supersede`
    /// (their creator is gone) are folded into the new increment, which then holds
    /// every change since the bitmap's last *completed* checkpoint; any other pending
    /// checkpoint makes the operation fail.
    case createCheckpoint(CheckpointRequest)
    /// The backup succeeded: the increment is released, and becomes its bitmap's base.
    case completeCheckpoint(increment: String)
    /// The backup failed: the increment is merged back into its bitmap (re-created,
    /// not recording, if the checkpoint consumed it), so no change is lost.
    case abortCheckpoint(increment: String)

    /// A checkpoint with the defaults of a one-shot caller: a fresh id, aborted when its
    /// creator disconnects, superseding nothing.
    public static func createCheckpoint(bitmap: String, increment: String, consume: Bool) -> BitmapOperation {
        .createCheckpoint(CheckpointRequest(bitmap: bitmap, increment: increment, consume: consume))
    }
}

/// What `BitmapOperation.createCheckpoint` needs to know.
public struct CheckpointRequest: Sendable, Equatable {
    public var bitmap: String
    public var increment: String
    public var consume: Bool
    /// Unique id of the new checkpoint.
    public var id: String
    /// Pending checkpoints of `bitmap` to fold into this one.
    public var supersede: [String]
    /// Kept with the increment so a restarted server knows whether to abort it.
    public var abortOnDisconnect: Bool

    public init(
        bitmap: String, increment: String, consume: Bool, id: String = CheckpointLineage.newID(),
        supersede: [String] = [], abortOnDisconnect: Bool = true
    ) {
        self.bitmap = bitmap
        self.increment = increment
        self.consume = consume
        self.id = id
        self.supersede = supersede
        self.abortOnDisconnect = abortOnDisconnect
    }
}

extension DirtyTracker.State {
    /// Applies one operation in place.
    /// - Returns: true when a persistent bitmap changed (the caller saves).
    mutating func apply(_ operation: BitmapOperation, size: UInt64, hasStore: Bool) throws(BitmapError) -> Bool {
        switch operation {
        case .add(let name, let granularity, let persistent, let recording):
            try Self.checkName(name)
            guard BitmapLimits.isValidGranularity(granularity) else { throw .invalidGranularity(granularity) }
            try BitmapLimits.checkSize(name: name, imageSize: size, granularity: granularity)
            if persistent && !hasStore {
                throw .storeUnavailable("this image has no bitmap store; add the bitmap with persistent=false")
            }
            guard index(of: name) == nil else { throw .duplicateName(name) }
            bitmaps.append(.init(
                name: name, bitmap: DirtyBitmap(size: size, granularity: granularity), recording: recording,
                persistent: persistent, busy: false))
            return persistent
        case .remove(let name):
            let index = try modifiableIndex(of: name)
            return bitmaps.remove(at: index).persistent
        case .clear(let name):
            let index = try modifiableIndex(of: name)
            bitmaps[index].bitmap.clearAll()
            // Changes since the base are gone: nothing vouches for "everything since" now.
            bitmaps[index].lineage = CheckpointLineage()
            return bitmaps[index].persistent
        case .setRecording(let name, let recording):
            let index = try modifiableIndex(of: name)
            // A bitmap that stops recording misses changes from then on.
            if !recording { bitmaps[index].lineage = CheckpointLineage() }
            bitmaps[index].recording = recording
            return bitmaps[index].persistent
        case .merge(let target, let sources):
            let targetIndex = try modifiableIndex(of: target)
            var sourceIndices: [Int] = []
            for source in sources {
                guard let index = index(of: source) else { throw .notFound(source) }
                sourceIndices.append(index)
            }
            for index in sourceIndices where index != targetIndex {
                let source = bitmaps[index].bitmap
                bitmaps[targetIndex].bitmap.merge(source)
            }
            return bitmaps[targetIndex].persistent
        case .createCheckpoint(let request):
            try Self.checkName(request.increment)
            let index = try modifiableIndex(of: request.bitmap)
            guard self.index(of: request.increment) == nil else { throw .duplicateName(request.increment) }
            guard !isCheckpointNameTaken(request.increment) else { throw .checkpointNameUsed(request.increment) }
            let pending = bitmaps.filter { $0.checkpointOf == request.bitmap }
            if let blocking = pending.first(where: { !request.supersede.contains($0.name) }) {
                throw .checkpointPending(bitmap: request.bitmap, checkpoint: blocking.name)
            }
            let source = bitmaps[index]
            // Move the bits into the increment: no copy, the live bitmap starts empty.
            var increment = source
            increment.name = request.increment
            increment.recording = false
            increment.busy = true
            increment.checkpointOf = request.bitmap
            increment.consumed = request.consume
            increment.checkpointID = request.id
            increment.abortOnDisconnect = request.abortOnDisconnect
            // Superseded checkpoints share the base: their changes make this increment
            // whole again ("everything since the base"), and it covers them.
            for old in pending {
                increment.bitmap.merge(old.bitmap)
                increment.lineage.cover(old.lineage.covers + [old.checkpointID].compactMap { $0 })
            }
            bitmaps[index].bitmap = DirtyBitmap(size: size, granularity: source.bitmap.granularity)
            bitmaps[index].lineage.covers = []
            bitmaps.removeAll { $0.checkpointOf == request.bitmap }
            if request.consume {
                bitmaps.removeAll { $0.name == request.bitmap }
            }
            bitmaps.append(increment)
            if let number = Self.defaultCheckpointNumber(request.increment) {
                checkpointCounter = max(checkpointCounter, number)
            }
            return source.persistent || pending.contains(where: \.persistent)
        case .completeCheckpoint(let incrementName):
            let index = try incrementIndex(of: incrementName)
            let increment = bitmaps.remove(at: index)
            if !increment.consumed, let origin = increment.checkpointOf, let originIndex = self.index(of: origin),
                let id = increment.checkpointID
            {
                bitmaps[originIndex].lineage = CheckpointLineage(base: .init(name: incrementName, id: id))
            }
            return increment.persistent
        case .abortCheckpoint(let incrementName):
            let index = try incrementIndex(of: incrementName)
            let increment = bitmaps.remove(at: index)
            let origin = increment.checkpointOf ?? ""
            var lineage = increment.lineage
            lineage.cover([increment.checkpointID].compactMap { $0 })
            if let originIndex = self.index(of: origin) {
                bitmaps[originIndex].bitmap.merge(increment.bitmap)
                bitmaps[originIndex].lineage.cover(lineage.covers)
            } else {
                var restored = increment
                restored.lineage = lineage
                restored.checkpointID = nil
                restored.name = origin
                restored.busy = false
                restored.recording = !increment.consumed
                restored.checkpointOf = nil
                restored.consumed = false
                bitmaps.append(restored)
            }
            return increment.persistent
        }
    }

    func index(of name: String) -> Int? { bitmaps.firstIndex { $0.name == name } }

    /// True when `name` is a bitmap's or a completed checkpoint still on record (a
    /// bitmap's base), or a default name `cN` at or below the store's count.
    func isCheckpointNameTaken(_ name: String) -> Bool {
        if index(of: name) != nil { return true }
        if bitmaps.contains(where: { $0.lineage.base?.name == name }) { return true }
        if let number = Self.defaultCheckpointNumber(name), number <= checkpointCounter { return true }
        return false
    }

    /// N for a default checkpoint name `cN` (digits only, no leading zero).
    static func defaultCheckpointNumber(_ name: String) -> UInt64? {
        guard name.hasPrefix("c"), name.count > 1, !name.hasPrefix("c0") else { return nil }
        return UInt64(name.dropFirst())
    }

    private func modifiableIndex(of name: String) throws(BitmapError) -> Int {
        guard let index = index(of: name) else { throw .notFound(name) }
        guard !bitmaps[index].busy else { throw .busy(name) }
        return index
    }

    private func incrementIndex(of name: String) throws(BitmapError) -> Int {
        guard let index = index(of: name) else { throw .notFound(name) }
        guard bitmaps[index].checkpointOf != nil else { throw .notACheckpoint(name) }
        return index
    }

    private static func checkName(_ name: String) throws(BitmapError) {
        guard !name.isEmpty, name.utf8.count <= BitmapLimits.maximumNameLength else { throw .invalidName(name) }
    }
}
