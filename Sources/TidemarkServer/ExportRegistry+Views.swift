import BlockStorage
import DirtyTracking
import NIOCore

#if canImport(Glibc)
import Glibc
#endif

extension ExportRegistry {
    /// The export names of a view of `export` at `checkpoint`: `disk@c3` shows the image
    /// at the instant, `disk@c3.changes` the same data with the increment as allocation.
    public static func viewExportNames(of export: String, checkpoint: String) -> [String] {
        let view = "\(export)@\(checkpoint)"
        return [view, view + ".changes"]
    }

    /// Opens a point-in-time view of a live export at the checkpoint `createCheckpoint`
    /// makes, and adds its exports.
    ///
    /// The order makes the view show exactly the checkpoint's instant: the view is armed
    /// first (writes of the checkpoint's epoch will preserve into it), the checkpoint is
    /// made (it waits for writes from before it to land), then the view is activated.
    /// - Parameter loop: where writes waiting for the activation resume.
    public func openView(
        of export: Export, checkpoint: String, on loop: any EventLoop, createCheckpoint: () throws -> Void
    ) throws -> OpenViews.Entry {
        guard case .live(let views) = export.content else {
            throw ServerError.invalidView("'\(export.name)' is itself a view; views are taken of live exports")
        }
        let names = Self.viewExportNames(of: export.name, checkpoint: checkpoint)
        // A view's id is its name, so neither may be taken.
        for name in names {
            guard name.utf8.count <= 4096 else { throw ServerError.exportNameTooLong(name) }
            guard self.export(named: name) == nil, self.export(id: name) == nil else {
                throw ServerError.duplicateExport(name)
            }
        }
        let view = try PointInTimeView(image: export.image, sidecarPath: Self.sidecarPath(for: export, checkpoint: checkpoint))
        let activation = loop.makePromise(of: Void.self)
        let entry = OpenViews.Entry(
            checkpoint: checkpoint, view: view, exportNames: names, firstEpoch: export.tracker.nextWriteEpoch,
            activation: activation.futureResult)
        views.add(entry)
        do {
            try createCheckpoint()
        } catch {
            views.remove(checkpoint: checkpoint)
            view.close()
            activation.succeed(())
            throw error
        }
        view.activate()
        activation.succeed(())
        try add(Export(name: names[0], viewOf: export, view: view, increment: checkpoint, changesOnly: false))
        try add(Export(name: names[1], viewOf: export, view: view, increment: checkpoint, changesOnly: true))
        return entry
    }

    /// Closes the view of a checkpoint, if one is open: its exports go away, reads on
    /// connections still attached fail, and the sidecar is deleted.
    /// - Returns: the closed view's export names (empty when none was open).
    @discardableResult
    public func closeView(of export: Export, checkpoint: String) -> [String] {
        guard let entry = export.openViews?.remove(checkpoint: checkpoint) else { return [] }
        for name in entry.exportNames { remove(named: name) }
        entry.view.close()
        return entry.exportNames
    }

    /// Closes every view of an export (it is being removed, or the server stops).
    public func closeAllViews(of export: Export) {
        for entry in export.openViews?.all ?? [] { closeView(of: export, checkpoint: entry.checkpoint) }
    }

    /// The live export and checkpoint a view export belongs to.
    public func viewOrigin(of name: String) -> (export: Export, checkpoint: String)? {
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
