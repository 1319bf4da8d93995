import BlockStorage
import DirtyTracking
import NIOCore

/// The management API of the exports: what the control plane asks for (bitmap
/// operations, checkpoints and their views, removing exports), done by each live
/// export's `ExportWrites`.
extension ExportRegistry {
    /// The export names of a view of `export` at `checkpoint`: `disk@c3` shows the image
    /// at the instant, `disk@c3.changes` the same data with the increment as allocation.
    public static func viewExportNames(of export: String, checkpoint: String) -> [String] {
        let view = "\(export)@\(checkpoint)"
        return [view, view + ".changes"]
    }

    // MARK: - Bitmaps and checkpoints (management asks, the export's owner does)

    /// Applies bitmap operations grouped by export, all or nothing: every group is checked
    /// first, then applied (each atomically with respect to writes). Management commands
    /// run one at a time, so nothing changes between the check and the application.
    /// Blocking: off the event loops.
    public func perform(_ groups: [(Export, [BitmapOperation])]) throws(ServerError) {
        var merged: [(Export, [BitmapOperation])] = []
        for (export, operations) in groups {
            if let index = merged.firstIndex(where: { $0.0 === export }) {
                merged[index].1.append(contentsOf: operations)
            } else {
                merged.append((export, operations))
            }
        }
        do throws(BitmapError) {
            for (export, operations) in merged { try export.tracker.validate(operations) }
            for (export, operations) in merged { try export.writes.perform(operations) }
        } catch {
            throw .bitmaps(error)
        }
    }

    /// What `createCheckpoint` did, for management to report.
    public struct CreatedCheckpoint: Sendable {
        /// The view's export names (the instant, then `.changes`); empty without a view.
        public var viewNames: [String]
        /// For each superseded checkpoint that had a view: its closed export names.
        public var closedViews: [String: [String]]
    }

    /// Creates a checkpoint of a live export's bitmap, with a point-in-time view of its
    /// instant when `view` is true (`ExportWrites.createCheckpoint` reads the sequence).
    /// Blocking: off the event loops.
    /// - Parameter loop: where writes waiting for the view's activation resume.
    public func createCheckpoint(
        export: Export, request: CheckpointRequest, view: Bool, loop: any EventLoop
    ) throws(ServerError) -> CreatedCheckpoint {
        var plan: ExportWrites.ViewPlan?
        if view {
            guard !export.isView else {
                throw .invalidView("'\(export.name)' is itself a view; views are taken of live exports")
            }
            let names = Self.viewExportNames(of: export.name, checkpoint: request.increment)
            // A view's id is its name, so neither may be taken.
            for name in names {
                guard name.utf8.count <= 4096 else { throw .exportNameTooLong(name) }
                guard self.export(named: name) == nil, self.export(id: name) == nil else {
                    throw .duplicateExport(name)
                }
            }
            plan = ExportWrites.ViewPlan(
                exportNames: names, sidecarPath: Self.sidecarPath(for: export, checkpoint: request.increment))
        }
        // Everything is checked before anything changes.
        do throws(BitmapError) {
            try export.tracker.validate([.createCheckpoint(request)])
        } catch {
            throw .bitmaps(error)
        }
        let created = try export.writes.createCheckpoint(request, of: export, view: plan, publishIn: self, loop: loop)
        return CreatedCheckpoint(viewNames: created.view?.exportNames ?? [], closedViews: created.closedViews)
    }

    /// Completes (the backup succeeded) or aborts (it failed: the changes go back into
    /// the bitmap) a pending checkpoint, and closes its view.
    /// - Returns: the closed view's export names (empty when none was open).
    @discardableResult
    public func finishCheckpoint(export: Export, increment: String, completed: Bool) throws(ServerError) -> [String] {
        do throws(BitmapError) {
            return try export.writes.finishCheckpoint(increment, completed: completed, of: export, in: self)
        } catch {
            throw .bitmaps(error)
        }
    }

    // MARK: - Removing exports

    /// What `deleteExport` did.
    public enum Deletion: Sendable {
        /// A view's exports were closed; its checkpoint stays pending.
        case view(closed: [String])
        /// A live export was removed: its views closed, its image flushed and its bitmaps
        /// saved, as cleanly closed when `released` (no connection held it any more
        /// within the wait), marked unclean otherwise so the next open replays the
        /// journal.
        case export(
            name: String, closedViews: [String], released: Bool, flushError: StorageError?, saveError: BitmapError?)
    }

    /// Removes an export by management id, or closes a view by either of its export names
    /// (a view's id is its name, unique among ids, so this cannot shadow a live export).
    /// NBD clients still attached keep a removed export until they disconnect: this waits
    /// up to `releaseWait` for them, asleep, off the event loops (`loop` runs the timer).
    /// - Returns: nil when nothing has that id.
    public func deleteExport(id: String, releaseWait: TimeAmount, loop: any EventLoop) -> Deletion? {
        if let (origin, checkpoint) = viewOrigin(of: id) {
            return .view(closed: closeView(of: origin, checkpoint: checkpoint))
        }
        let name: String
        let tracker: DirtyTracker
        let released: EventLoopFuture<Bool>
        var closedViews: [String] = []
        var flushError: StorageError?
        do {
            // Scoped, so that this function's reference to the export is gone below.
            guard !id.isEmpty, let removed = remove(id: id) else { return nil }
            name = removed.name
            tracker = removed.tracker
            for entry in removed.openViews?.all ?? [] {
                closedViews += closeView(of: removed, checkpoint: entry.checkpoint)
            }
            if !removed.isReadOnly {
                do throws(StorageError) {
                    try removed.image.flush()
                } catch {
                    flushError = error
                }
            }
            released = removed.writes.released.released(within: releaseWait, on: loop)
        }
        let unused = (try? released.wait()) ?? false
        var saveError: BitmapError?
        do throws(BitmapError) {
            try tracker.save(cleanShutdown: unused)
        } catch {
            saveError = error
        }
        return .export(
            name: name, closedViews: closedViews, released: unused, flushError: flushError, saveError: saveError)
    }

    // MARK: - Views

    /// Closes the view of a checkpoint, if one is open: its exports go away, reads on
    /// connections still attached fail, and the sidecar is deleted.
    /// - Returns: the closed view's export names (empty when none was open).
    @discardableResult
    func closeView(of export: Export, checkpoint: String) -> [String] {
        guard let entry = export.openViews?.remove(checkpoint: checkpoint) else { return [] }
        for name in entry.exportNames { remove(named: name) }
        entry.view.close()
        return entry.exportNames
    }

    /// Closes every view of an export (it is being removed, or the server stops).
    func closeAllViews(of export: Export) {
        for entry in export.openViews?.all ?? [] { closeView(of: export, checkpoint: entry.checkpoint) }
    }

    /// The live export and checkpoint a view export belongs to.
    func viewOrigin(of name: String) -> (export: Export, checkpoint: String)? {
        for export in all {
            for entry in export.openViews?.all ?? [] where entry.exportNames.contains(name) {
                return (export, entry.checkpoint)
            }
        }
        return nil
    }

    /// In the image's bitmap store, which owns its folder's layout and removes stale
    /// sidecars when it opens; in /var/tmp for an image without a store (a block device
    /// without persistent bitmaps).
    private static func sidecarPath(for export: Export, checkpoint: String) -> String {
        export.tracker.viewSidecarPath(checkpoint: checkpoint)
            ?? "/var/tmp/tidemark-" + BitmapStore.viewSidecarName(checkpoint: checkpoint)
    }
}
