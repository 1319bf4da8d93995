/// How to undo a management operation whose save failed, without losing a write.
///
/// An operation that reports failure must have changed nothing, but writes go on while
/// its save runs, and their marks must survive the rollback. So the rollback restores the
/// bitmaps as they were (names, flags, order) and ORs into each one that was recording
/// the marks made since: the current content of the same-named bitmap when it is still
/// recording, else a window bitmap that recorded every write during the save (for
/// bitmaps the operation removed, consumed or disabled). Over-reporting is safe.
///
/// It holds no bitmap storage shared with a recording bitmap of the live state (that
/// would make the next write copy megabytes): a bitmap the operation left untouched is
/// taken from the live state at rollback time instead of being kept.
struct OperationRollback {
    private struct Entry {
        /// The bitmap as it was, its bits emptied when `useCurrent` is set.
        var saved: DirtyTracker.NamedBitmap
        /// The operation did not change the bits: take the live bitmap of the same name.
        var useCurrent: Bool
    }

    private var entries: [Entry] = []
    /// Records writes during the save when some bitmap that was recording is no longer.
    private(set) var window: DirtyBitmap?

    /// - Parameters:
    ///   - before: the bitmaps before the operation (dropped by the caller right after).
    ///   - after: the bitmaps after it.
    init(before: [DirtyTracker.NamedBitmap], after: [DirtyTracker.NamedBitmap], size: UInt64) {
        var windowGranularity: UInt64?
        for old in before {
            let current = after.first { $0.name == old.name }
            let useCurrent = current.map { $0.bitmap == old.bitmap } ?? false
            var saved = old
            // Equal bits share storage (or are equal anyway): keep none of them.
            if useCurrent { saved.bitmap = DirtyBitmap(size: 0, granularity: old.bitmap.granularity) }
            entries.append(Entry(saved: saved, useCurrent: useCurrent))
            if old.recording && !(current?.recording ?? false) {
                windowGranularity = min(windowGranularity ?? old.bitmap.granularity, old.bitmap.granularity)
            }
        }
        if let windowGranularity { window = DirtyBitmap(size: size, granularity: windowGranularity) }
    }

    /// The bitmaps as they were, with every mark made since. `recordedWindow` is the
    /// window bitmap as the writes left it.
    func restore(
        from current: [DirtyTracker.NamedBitmap], recordedWindow: DirtyBitmap?, size: UInt64
    ) -> [DirtyTracker.NamedBitmap] {
        var result: [DirtyTracker.NamedBitmap] = []
        for entry in entries {
            var restored = entry.saved
            let live = current.first { $0.name == entry.saved.name }
            if entry.useCurrent, let live {
                restored.bitmap = live.bitmap
            } else if entry.useCurrent {
                // Cannot happen (operations are serialised), but never restore empty bits.
                restored.bitmap = BitmapStore.entirelyDirty(size: size, granularity: restored.bitmap.granularity)
            } else if restored.recording, let live, live.recording, live.bitmap.size == restored.bitmap.size {
                restored.bitmap.merge(live.bitmap)
            }
            if restored.recording && !(live?.recording ?? false), let recordedWindow,
                recordedWindow.size == restored.bitmap.size
            {
                restored.bitmap.merge(recordedWindow)
            }
            result.append(restored)
        }
        return result
    }
}
