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
    case createCheckpoint(bitmap: String, increment: String, consume: Bool)
    /// The backup succeeded: the increment is released.
    case completeCheckpoint(increment: String)
    /// The backup failed: the increment is merged back into its bitmap (re-created,
    /// not recording, if the checkpoint consumed it), so no change is lost.
    case abortCheckpoint(increment: String)
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
            return bitmaps[index].persistent
        case .setRecording(let name, let recording):
            let index = try modifiableIndex(of: name)
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
        case .createCheckpoint(let name, let incrementName, let consume):
            try Self.checkName(incrementName)
            let index = try modifiableIndex(of: name)
            guard self.index(of: incrementName) == nil else { throw .duplicateName(incrementName) }
            let source = bitmaps[index]
            // Move the bits into the increment: no copy, the live bitmap starts empty.
            var increment = source
            increment.name = incrementName
            increment.recording = false
            increment.busy = true
            increment.checkpointOf = name
            increment.consumed = consume
            bitmaps[index].bitmap = DirtyBitmap(size: size, granularity: source.bitmap.granularity)
            if consume {
                bitmaps.remove(at: index)
            }
            bitmaps.append(increment)
            return source.persistent
        case .completeCheckpoint(let incrementName):
            let index = try incrementIndex(of: incrementName)
            return bitmaps.remove(at: index).persistent
        case .abortCheckpoint(let incrementName):
            let index = try incrementIndex(of: incrementName)
            let increment = bitmaps.remove(at: index)
            let origin = increment.checkpointOf ?? ""
            if let originIndex = self.index(of: origin) {
                bitmaps[originIndex].bitmap.merge(increment.bitmap)
            } else {
                var restored = increment
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
