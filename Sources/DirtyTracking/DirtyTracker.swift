import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// The named bitmaps of one image, and the single place writes are recorded.
///
/// Every connection to an export shares one tracker, so a write on any connection is in
/// every bitmap before its reply is sent. Bits live in memory behind one lock, mutated in
/// place; persistent bitmaps are made crash-safe by the store's region journal.
public final class DirtyTracker: Sendable {
    struct NamedBitmap {
        var name: String
        var bitmap: DirtyBitmap
        var recording: Bool
        var persistent: Bool
        var busy: Bool
        /// For a checkpoint's frozen increment: the bitmap it was taken from.
        var checkpointOf: String? = nil
        /// For an increment: the checkpoint ended tracking of its bitmap (`consume`).
        var consumed = false
        /// For a live bitmap: its last completed checkpoint; for an increment: the base it
        /// was taken on and what else it covers.
        var lineage = CheckpointLineage()
        /// For an increment: the checkpoint's unique id.
        var checkpointID: String? = nil
        /// For an increment: abort it when its creator disconnects (kept across restarts).
        var abortOnDisconnect = true
    }

    struct State {
        var bitmaps: [NamedBitmap] = []
        /// Journal regions made durable in the current epoch (one bit per region).
        var durableRegions: DirtyBitmap
        var epoch: UInt64
        var generation: UInt64
        /// True when a recording persistent bitmap exists, so writes need the journal.
        var journaling = false
        /// Bits or flags of persistent bitmaps changed since the last save.
        var unsaved = false
        /// Advances with every management operation; writes count themselves in it.
        var writeEpoch: UInt64 = 0
        /// True while the store on disk says "stopped cleanly, no bitmaps" and nothing
        /// persistent has happened since: there is nothing to journal or save, so opening
        /// and closing the store write nothing (a captive `tidemark serve` starts and stops
        /// without five fsyncs).
        var storeSettled = false
        /// The highest default checkpoint number (`cN`) handed out in the store's life.
        var checkpointCounter: UInt64 = 0
        /// While a management operation's save runs: records every write, so a rollback
        /// can restore marks into bitmaps the operation removed or disabled.
        var rollbackWindow: DirtyBitmap?

        mutating func refreshJournaling() {
            journaling = bitmaps.contains { $0.persistent && $0.recording }
        }
    }

    /// Size of the image in bytes.
    public let size: UInt64
    private let state: Mutex<State>
    private let store: BitmapStore?
    /// Serialises journal appends against epoch switches (never held by the write path
    /// unless it must journal a new region).
    private let journalLock = Mutex<Void>(())
    /// Journal appends made durable by writes (each one `fdatasync`): the cost of
    /// crash-safe bitmaps on the write path, for `tidemark_journal_fsyncs_total`.
    private let journalFsyncCount = Atomic<UInt64>(0)
    /// Serialises saves.
    private let saveLock = Mutex<Void>(())
    /// Modifications in flight per write epoch; operations wait on it for their epoch.
    private let inFlight = ModificationsInFlight()
    /// Serialises management operations, so at most two epochs have writes in flight.
    private let operationLock = Mutex<Void>(())

    /// A tracker with no persistence: bitmaps live as long as the process.
    public init(size: UInt64) {
        self.size = size
        self.store = nil
        self.state = Mutex(State(durableRegions: Self.regionMap(size: size), epoch: 0, generation: 0))
    }

    /// A tracker backed by the image's sidecar store, with its bitmaps loaded (and, after
    /// an unclean stop, recovered from the journal). Starts a new journal epoch at once,
    /// unless the store holds no bitmaps and was closed cleanly: then the first
    /// persistent change does it.
    public init(store: BitmapStore, contents: BitmapStore.Contents) throws(BitmapError) {
        self.size = store.imageSize
        self.store = store
        var initial = State(durableRegions: Self.regionMap(size: store.imageSize), epoch: contents.epoch, generation: contents.generation)
        initial.bitmaps = contents.bitmaps.map {
            NamedBitmap(
                name: $0.name, bitmap: $0.bitmap, recording: $0.recording, persistent: true,
                busy: $0.checkpointOf != nil, checkpointOf: $0.checkpointOf, consumed: $0.consumed,
                lineage: $0.lineage, checkpointID: $0.checkpointID, abortOnDisconnect: $0.abortOnDisconnect)
        }
        initial.checkpointCounter = contents.checkpointCounter
        initial.refreshJournaling()
        initial.storeSettled = contents.bitmaps.isEmpty && !contents.recovered && !contents.damaged && contents.problems.isEmpty
        let settled = initial.storeSettled
        self.state = Mutex(initial)
        if !settled { try save(cleanShutdown: false) }
    }

    private static func regionMap(size: UInt64) -> DirtyBitmap {
        DirtyBitmap(size: max(size, 1), granularity: BitmapStore.regionSize)
    }

    /// Unclean recoveries of the store so far.
    public var generation: UInt64 { state.withLock { $0.generation } }

    /// True when bitmaps are persisted beside the image.
    public var isPersistent: Bool { store != nil }

    /// The folder of the store the bitmaps persist in (beside the image, or in a state
    /// directory), for files that belong with it such as view sidecars; nil without one.
    public var storeDirectory: String? { store?.directory }

    /// A fresh path for a view's copy-before-write sidecar in the store's folder; nil
    /// without a store.
    public func viewSidecarPath(checkpoint: String) -> String? { store?.viewSidecarPath(checkpoint: checkpoint) }

    // MARK: - The write path

    /// One write, write-zeroes or trim between `willModify` and `didModify`.
    public struct Modification: Sendable, Equatable {
        /// The write epoch it began in; management operations wait for their epoch's
        /// modifications to finish.
        public let epoch: UInt64
        /// Journal regions that must be made durable (with `makeDurable`) before the
        /// data may be written, or nil when none must.
        public let journalRegions: ClosedRange<Int>?
    }

    /// Records that `[offset, offset+length)` is about to change, in every recording
    /// bitmap. Call before the data can reach the disk, and whether or not the write
    /// will succeed: over-reporting is safe, under-reporting loses backup data. Every call
    /// must be paired with `didModify` once the data is written (or the write failed).
    public func willModify(offset: UInt64, length: UInt64) -> Modification {
        state.withLock { state -> Modification in
            let epoch = state.writeEpoch
            inFlight.begin(epoch: epoch)
            state.rollbackWindow?.markDirty(offset: offset, length: length)
            guard length > 0, !state.bitmaps.isEmpty else { return Modification(epoch: epoch, journalRegions: nil) }
            for index in state.bitmaps.indices where state.bitmaps[index].recording {
                state.bitmaps[index].bitmap.markDirty(offset: offset, length: length)
            }
            guard state.journaling else { return Modification(epoch: epoch, journalRegions: nil) }
            state.unsaved = true
            let end = DirtyBitmap.clippedEnd(offset: offset, length: length, size: size)
            guard offset < end else { return Modification(epoch: epoch, journalRegions: nil) }
            let first = Int(offset / BitmapStore.regionSize)
            let last = Int((end - 1) / BitmapStore.regionSize)
            for region in first...last where !state.durableRegions.isDirty(granule: region) {
                return Modification(epoch: epoch, journalRegions: first...last)
            }
            return Modification(epoch: epoch, journalRegions: nil)
        }
    }

    /// The modification's data is written (or its write failed).
    public func didModify(_ modification: Modification) {
        inFlight.end(epoch: modification.epoch)
    }

    /// The whole write-path protocol at once, for callers that write synchronously
    /// (offline tools, tests): mark, make the journal durable, then `write`.
    public func recordModification(offset: UInt64, length: UInt64, write: () throws -> Void = {}) throws {
        let modification = willModify(offset: offset, length: length)
        defer { didModify(modification) }
        if let regions = modification.journalRegions { try makeDurable(regions) }
        try write()
    }

    /// Modifications begun in `epoch` that have not finished (`didModify`). Zero for the
    /// epoch a management operation ended, once that operation has returned.
    public func modificationsInFlight(epoch: UInt64) -> Int { inFlight.count(epoch: epoch) }

    /// Makes the journal record of `regions` durable (group commit: concurrent callers
    /// for the same regions wait for one fsync). Blocking: call off the event loop.
    public func makeDurable(_ regions: ClosedRange<Int>) throws(BitmapError) {
        guard let store else { return }
        try journalLock.withLock { (_: inout Void) throws(BitmapError) in
            let missing = state.withLock { state in
                regions.filter { !state.durableRegions.isDirty(granule: $0) }.map { UInt64($0) }
            }
            guard !missing.isEmpty else { return }
            try store.appendToJournal(missing)
            journalFsyncCount.add(1, ordering: .relaxed)
            state.withLock { state in
                for region in missing { state.durableRegions.setBits(Int(region)...Int(region)) }
            }
        }
    }

    // MARK: - Saving

    /// Saves persistent bitmaps (atomically) and starts a new journal epoch. Blocking.
    ///
    /// The next epoch's journal is prepared (created, reserved, durable) before the epoch
    /// switches; if that fails (a full disk) nothing has changed. If writing the bits or
    /// the manifest fails afterwards, the switch is rolled back: regions journaled in the
    /// new epoch are appended to the old journal and the new one is deleted, so a failed
    /// save leaves no file behind and the journal still covers every write.
    /// - Parameter cleanShutdown: true only for the last save before a clean exit.
    public func save(cleanShutdown: Bool = false) throws(BitmapError) {
        try saveLock.withLock { (_: inout Void) throws(BitmapError) in try saveHoldingLock(cleanShutdown: cleanShutdown) }
    }

    /// `save` with `saveLock` held by the caller.
    private func saveHoldingLock(cleanShutdown: Bool) throws(BitmapError) {
        guard let store else { return }
        do {
            let settled = state.withLock { state in
                // A clean stop of a store that never held bitmaps leaves it as it was.
                if state.storeSettled && cleanShutdown && !state.bitmaps.contains(where: \.persistent) { return true }
                state.storeSettled = false
                return false
            }
            guard !settled else { return }
            let (nextEpoch, generation) = state.withLock { ($0.epoch + 1, $0.generation) }
            let prepared = try store.prepareJournal(epoch: nextEpoch, generation: generation)
            let (snapshot, previousJournal, previousEpoch, previousDurable) = journalLock.withLock { _ in
                let (snapshot, previousEpoch, previousDurable) = state.withLock { state in
                    let previousEpoch = state.epoch
                    let previousDurable = state.durableRegions
                    state.epoch = prepared.epoch
                    state.durableRegions.clearAll()
                    state.unsaved = false
                    let saved = state.bitmaps.filter(\.persistent).map { entry in
                        // A real copy: sharing storage would make the next write copy it.
                        BitmapStore.Snapshot.Bitmap(
                            name: entry.name, granularity: entry.bitmap.granularity, recording: entry.recording,
                            checkpointOf: entry.checkpointOf, consumed: entry.consumed,
                            words: entry.bitmap.leafWords.withUnsafeBufferPointer { Array($0) },
                            lineage: entry.lineage, checkpointID: entry.checkpointID,
                            abortOnDisconnect: entry.abortOnDisconnect)
                    }
                    return (
                        BitmapStore.Snapshot(
                            bitmaps: saved, epoch: state.epoch, generation: state.generation,
                            checkpointCounter: state.checkpointCounter),
                        previousEpoch, previousDurable)
                }
                return (snapshot, store.switchJournal(to: prepared), previousEpoch, previousDurable)
            }
            var committed = false
            do throws(BitmapError) {
                try store.write(snapshot, cleanShutdown: cleanShutdown, committed: &committed)
                store.retire(previousJournal)
            } catch {
                if committed {
                    // The new manifest is in place (only its directory fsync failed): the
                    // new epoch stands; the old journal file stays until the next save.
                    store.retire(previousJournal)
                } else {
                    journalLock.withLock { _ in
                        let newlyDurable = state.withLock { state in
                            (0..<state.durableRegions.granuleCount).filter { state.durableRegions.isDirty(granule: $0) }
                                .map { UInt64($0) }.filter { !previousDurable.isDirty(granule: Int($0)) }
                        }
                        if store.rollBackJournal(to: previousJournal, reappending: newlyDurable) {
                            state.withLock { state in
                                state.epoch = previousEpoch
                                var durable = previousDurable
                                for region in newlyDurable { durable.setBits(Int(region)...Int(region)) }
                                state.durableRegions = durable
                            }
                        } else {
                            // Both journals stay on disk and both are replayed after a crash.
                            store.retire(previousJournal)
                        }
                    }
                }
                // The bits were not saved: the next save (FLUSH or the timer) must retry.
                state.withLock { $0.unsaved = true }
                throw error
            }
        }
    }

    /// Journal appends writes have made durable since the tracker opened (one fsync each).
    public var journalFsyncs: UInt64 { journalFsyncCount.load(ordering: .relaxed) }

    /// Saves only if persistent bits changed since the last save (for FLUSH and timers).
    public func saveIfNeeded() throws(BitmapError) {
        guard store != nil, state.withLock({ $0.unsaved }) else { return }
        try save()
    }

    // MARK: - Management

    /// Applies operations in order, all or nothing, atomically with respect to writes:
    /// every write lands wholly before or wholly after them. On the first error nothing
    /// has changed and the error is thrown. Persistent changes are saved before returning;
    /// if that save fails the operations are rolled back (`OperationRollback`: the
    /// bitmaps as they were, plus every write made meanwhile) and its error is thrown.
    public func perform(_ operations: [BitmapOperation]) throws(BitmapError) {
        try perform(operations, dirtying: [])
    }

    /// Adds persistent bitmaps that start entirely dirty: for a store that started over
    /// after damage, where nobody knows what changed since the old store's last save.
    public func addEntirelyDirty(name: String, granularity: UInt64 = BitmapLimits.defaultGranularity) throws(BitmapError) {
        try perform([.add(name: name, granularity: granularity, persistent: true, recording: true)], dirtying: [name])
    }

    private func perform(_ operations: [BitmapOperation], dirtying: [String]) throws(BitmapError) {
        // The save lock is held from before the operations until their save or rollback,
        // so no other save (FLUSH, timer) writes their effect while they may still fail.
        try operationLock.withLock { (_: inout Void) throws(BitmapError) in
            try saveLock.withLock { (_: inout Void) throws(BitmapError) in try performHoldingLocks(operations, dirtying: dirtying) }
        }
    }

    private func performHoldingLocks(_ operations: [BitmapOperation], dirtying: [String]) throws(BitmapError) {
        do {
            let (touchedPersistent, epoch, rollback) = try state.withLock {
                (state: inout State) throws(BitmapError) -> (Bool, UInt64, OperationRollback?) in
                // Keep the old array: it shares storage until an operation mutates a bitmap,
                // so the rollback copy costs only what the operations touch.
                let before = state.bitmaps
                do throws(BitmapError) {
                    var persistent = false
                    for operation in operations {
                        persistent = try state.apply(operation, size: size, hasStore: store != nil) || persistent
                    }
                    for name in dirtying {
                        if let index = state.index(of: name) {
                            state.bitmaps[index].bitmap = BitmapStore.entirelyDirty(
                                size: size, granularity: state.bitmaps[index].bitmap.granularity)
                        }
                    }
                    // Built before `before` goes: it keeps no storage a write would share.
                    let rollback = persistent ? OperationRollback(before: before, after: state.bitmaps, size: size) : nil
                    state.rollbackWindow = rollback?.window
                    state.refreshJournaling()
                    // Until the save succeeds, the manifest on disk still lists the bitmaps
                    // as they were: writes must go on being journaled for them.
                    if before.contains(where: { $0.persistent && $0.recording }) { state.journaling = true }
                    state.writeEpoch += 1
                    return (persistent, state.writeEpoch - 1, rollback)
                } catch {
                    state.bitmaps = before
                    throw error
                }
            }
            // Writes marked before the operations must land before anyone acts on them
            // (reads an increment's data, opens a view of the instant). Sleeps, off the
            // event loops, until the last of them calls `didModify`.
            inFlight.drain(epoch: epoch)
            guard touchedPersistent else { return }
            do throws(BitmapError) {
                try saveHoldingLock(cleanShutdown: false)
            } catch {
                state.withLock { state in
                    if let rollback {
                        state.bitmaps = rollback.restore(from: state.bitmaps, recordedWindow: state.rollbackWindow, size: size)
                    }
                    state.rollbackWindow = nil
                    state.refreshJournaling()
                    state.unsaved = true
                }
                throw error
            }
            state.withLock { state in
                state.rollbackWindow = nil
                state.refreshJournaling()
            }
        }
    }

    /// The epoch the next management operation ends: writes from it on begin after that
    /// operation. Callers that prepare for an operation (a view that writes of the next
    /// epoch must preserve into) read it first; operations are serialised by the caller.
    public var nextWriteEpoch: UInt64 { state.withLock { $0.writeEpoch + 1 } }

    /// Checks that `operations` would succeed now, without changing anything.
    public func validate(_ operations: [BitmapOperation]) throws(BitmapError) {
        try state.withLock { (state: inout State) throws(BitmapError) in
            var scratch = state
            for operation in operations {
                _ = try scratch.apply(operation, size: size, hasStore: store != nil)
            }
        }
    }

    /// Adds a bitmap (QEMU's `block-dirty-bitmap-add`).
    public func add(
        name: String, granularity: UInt64 = BitmapLimits.defaultGranularity, persistent: Bool, recording: Bool = true
    ) throws(BitmapError) {
        try perform([.add(name: name, granularity: granularity, persistent: persistent, recording: recording)])
    }

    /// Removes a bitmap.
    public func remove(name: String) throws(BitmapError) { try perform([.remove(name: name)]) }

    /// Clears every bit of a bitmap.
    public func clear(name: String) throws(BitmapError) { try perform([.clear(name: name)]) }

    /// Starts or stops recording writes into a bitmap.
    public func setRecording(name: String, _ recording: Bool) throws(BitmapError) {
        try perform([.setRecording(name: name, recording)])
    }

    /// ORs `sources` into `target` (QEMU's `block-dirty-bitmap-merge`): all or nothing;
    /// on any error the target is untouched.
    public func merge(target: String, sources: [String]) throws(BitmapError) {
        try perform([.merge(target: target, sources: sources)])
    }

    /// Every bitmap, in creation order.
    public func query() -> [BitmapInfo] {
        state.withLock { state in
            state.bitmaps.map { entry in
                BitmapInfo(
                    name: entry.name, count: entry.bitmap.dirtyBytes, granularity: entry.bitmap.granularity,
                    recording: entry.recording, busy: entry.busy, persistent: entry.persistent,
                    generation: entry.persistent ? state.generation : 0, checkpointOf: entry.checkpointOf,
                    lineage: entry.lineage, checkpointID: entry.checkpointID,
                    abortOnDisconnect: entry.abortOnDisconnect)
            }
        }
    }

    /// The default name of the next checkpoint: `cN` with N above every default name
    /// handed out in the store's life (persistent trackers keep the count across
    /// restarts), skipping names in use and names of completed checkpoints. The count
    /// advances when a checkpoint with that name is created.
    public func nextCheckpointName() -> String {
        state.withLock { state in
            var number = state.checkpointCounter + 1
            while state.isCheckpointNameTaken("c\(number)") { number += 1 }
            return "c\(number)"
        }
    }

    /// Names of every bitmap, in creation order.
    public var names: [String] { state.withLock { $0.bitmaps.map(\.name) } }

    /// Dirty and clean runs of a bitmap over `[offset, offset+length)`, merged, clipped,
    /// and at most `maximumExtents` of them (the last one may end early).
    public func extents(name: String, offset: UInt64, length: UInt64, maximumExtents: Int) throws(BitmapError) -> [DirtyExtent] {
        try state.withLock { (state: inout State) throws(BitmapError) -> [DirtyExtent] in
            guard let entry = state.bitmaps.first(where: { $0.name == name }) else { throw .notFound(name) }
            let end = DirtyBitmap.clippedEnd(offset: offset, length: length, size: size)
            guard offset < end else { return [] }
            var result: [DirtyExtent] = []
            var position = offset
            entry.bitmap.forEachDirtyRun(offset: offset, length: end - offset) { start, runLength in
                if start > position {
                    result.append(DirtyExtent(offset: position, length: start - position, dirty: false))
                }
                guard result.count < maximumExtents else { return false }
                result.append(DirtyExtent(offset: start, length: runLength, dirty: true))
                position = start + runLength
                return result.count < maximumExtents
            }
            if position < end && result.count < maximumExtents {
                result.append(DirtyExtent(offset: position, length: end - position, dirty: false))
            }
            return result
        }
    }
}
