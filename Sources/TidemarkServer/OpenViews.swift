import BlockStorage
import NIOCore
import Synchronization

/// The point-in-time views open on one live export: what its writes preserve into.
///
/// A view is armed before its checkpoint and activated after writes from before the
/// checkpoint have landed (`ExportWrites.createCheckpoint`). Writes of the checkpoint's
/// epoch that reach it in between wait for `activation` without holding a thread, then
/// copy the old data and write (`ExportWrites.modify`).
final class OpenViews: Sendable {
    /// One open view.
    struct Entry: Sendable {
        /// The checkpoint (and increment) the view shows.
        let checkpoint: String
        let view: PointInTimeView
        /// Names of the view's exports (the view and its `.changes` variant).
        let exportNames: [String]
        /// Modifications from this write epoch on must preserve into the view.
        let firstEpoch: UInt64
        /// Completes once the view is active (or was closed before it became active).
        let activation: EventLoopFuture<Void>
    }

    private let entries = Mutex<[Entry]>([])
    /// The number of entries, read without the lock by every write.
    private let count = Atomic<Int>(0)

    init() {}

    func add(_ entry: Entry) {
        entries.withLock { list in
            list.append(entry)
            count.store(list.count, ordering: .releasing)
        }
    }

    @discardableResult
    func remove(checkpoint: String) -> Entry? {
        entries.withLock { list in
            guard let index = list.firstIndex(where: { $0.checkpoint == checkpoint }) else { return nil }
            let entry = list.remove(at: index)
            count.store(list.count, ordering: .releasing)
            return entry
        }
    }

    /// Every open view, oldest first.
    var all: [Entry] { entries.withLock { $0 } }

    /// The open view of a checkpoint, if any.
    func entry(checkpoint: String) -> Entry? { entries.withLock { $0.first { $0.checkpoint == checkpoint } } }

    /// The views a modification of `[offset, offset+length)` begun in `epoch` must preserve
    /// into first; empty, without taking a lock or allocating, when no view is open.
    ///
    /// The epoch was read under the tracker's lock after the checkpoint that armed a view
    /// of that epoch, so a relaxed count cannot miss the view.
    func targets(offset: UInt64, length: UInt64, epoch: UInt64) -> [Entry] {
        guard count.load(ordering: .acquiring) > 0 else { return [] }
        return entries.withLock { list in
            list.filter { $0.firstEpoch <= epoch && $0.view.needsPreservation(offset: offset, length: length) }
        }
    }
}
