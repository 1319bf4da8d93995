import BackupChain
import BlockStorage
import DirtyTracking
import NIOCore
import NIOPosix
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// The single owner of a live export's modifications and checkpoints: the two sequences
/// whose order makes backups right, each read top to bottom in one function.
///
/// - One modification (`modify`): mark → journal → preserve → write → finish.
/// - One checkpoint (`createCheckpoint`): arm → perform → activate → publish.
///
/// The promise the two keep together: **a write lands wholly before or wholly after a
/// checkpoint**. A write marks its range and takes its write epoch in one step under the
/// tracker's lock (`willModify`); a checkpoint moves the bits into its increment and
/// advances the epoch in one step under the same lock, then waits until every write of
/// the old epoch has finished (`perform` drains). So a write is either in the increment
/// and on the image before the checkpoint returns, or in the live bitmap and, if a view
/// was taken, preserved into that view before its data changes the image.
///
/// Lock order (a thread holding one of these takes only locks listed after it; none is
/// held across a call into another object unless listed):
/// 1. `ExportWrites.management`: one management operation on the export at a time, so
///    the epoch a view is armed for is the one its checkpoint ends. Held across fsyncs,
///    by the control thread only, never on an event loop or the I/O pool.
/// 2. `DirtyTracker.operationLock` → `saveLock` → `journalLock` → `state` (the tracker's
///    own order). The write path takes only `state` (marking), and `journalLock` →
///    `state` on the pool when it must make a journal region durable. `BitmapStore` has
///    no lock of its own: `saveLock` and `journalLock` serialise it.
/// 3. `ExportRegistry.exports`: publishing or closing a view's exports, after the
///    tracker's locks are released.
/// 4. `OpenViews.entries` → `PointInTimeView.state` (finding the views a write must
///    preserve into asks each whether the range is preserved).
/// 5. `PreservationSignal`'s mutex → `PointInTimeView.state` (a sleeper waiting for
///    another writer's copy looks at the view's state while holding the signal's mutex).
/// Leaves, under which nothing is taken: `ModificationsInFlight`'s mutex, `ReleaseNotice`.
/// The tracker's locks and a view's are never held together: a modification marks
/// (tracker) and then looks up views (views); a checkpoint arms (views), performs
/// (tracker), activates (view), publishes (registry), one after the other.
///
/// Waiting: event loops never block on any of these. A write that must wait for a view
/// to become active parks on a future; journal fsyncs, copies and waits for another
/// writer's copy run on the I/O pool, except a small write's copy of a page or two of
/// cached old data (`PointInTimeView.preserveIfNonBlocking`), which the loop makes itself; a checkpoint waits for its epoch's writes on the
/// control thread, asleep on a condition variable.
final class ExportWrites: Sendable {
    let image: RawImage
    /// A backup chain export's overlay: where its modifications land instead of `image`
    /// (which is then the overlay's data file, or the chain's top file when read-only).
    let overlay: ChainOverlay?
    /// The image's bitmaps; every write on every connection is recorded here.
    let tracker: DirtyTracker
    /// The point-in-time views open on the export: what its writes preserve into.
    let views: OpenViews
    /// Serialises management operations on the export (lock order 1).
    private let management = Mutex<Void>(())
    /// Told when the last reference goes: no connection, view export or modification in
    /// flight holds the export any more.
    let released = ReleaseNotice()

    init(image: RawImage, tracker: DirtyTracker, overlay: ChainOverlay? = nil) {
        self.image = image
        self.overlay = overlay
        self.tracker = tracker
        self.views = OpenViews()
    }

    deinit { released.fire() }

    // MARK: - One modification

    /// A change to the image, in storage terms: what an NBD WRITE, WRITE_ZEROES or TRIM
    /// asks for.
    enum Change: Sendable {
        case write(ByteBuffer, fua: Bool)
        /// 64-bit lengths: with extended headers one request may cover a whole disk.
        case writeZeroes(length: UInt64, mayPunchHole: Bool, fastOnly: Bool, fua: Bool)
        case trim(length: UInt64, fua: Bool)

        var length: UInt64 {
            switch self {
            case .write(let payload, _): return UInt64(payload.readableBytes)
            case .writeZeroes(let length, _, _, _), .trim(let length, _): return length
            }
        }
    }

    /// Where a modification is when `modify` returns.
    enum Landing {
        /// On the image (in the page cache) already, and finished: reply now.
        case landed
        /// Landing on the I/O pool; the future carries the reply `modify` was given.
        case pending(EventLoopFuture<ByteBuffer>)
    }

    /// Writes this large are bulk copies (nbdcopy, restores): their writeback starts as
    /// they stream in, so the FLUSH or the stop that follows finds little left to write.
    static let bulkWriteLength: UInt64 = 64 << 10

    /// One modification, start to end. Called on the connection's event loop, in request
    /// order; never blocks it.
    /// - Parameter reply: builds the reply, on the pool, for a modification that does not
    ///   land at once.
    func modify<Reply: ModificationReply>(
        _ change: Change, at offset: UInt64, pool: NIOThreadPool, on loop: any EventLoop, reply: Reply
    ) -> Landing {
        let length = change.length
        // 1. Mark, before any byte can reach the disk and whether or not the write will
        //    succeed: every recording bitmap gets the range, and the write counts in its
        //    epoch, which no checkpoint can now end before step 6.
        let mark = tracker.willModify(offset: offset, length: length)
        // 2. The open views this write must first preserve old data into: those armed
        //    for its epoch or earlier whose granules here are not preserved yet (none,
        //    without a lock, when no view is open).
        let preserveInto = views.targets(offset: offset, length: length, epoch: mark.epoch)
        var change = change
        var offset = offset
        // 3. Nothing to journal, and nothing to preserve or only a page or two of old
        //    data in the page cache, copied here (`preserveIfNonBlocking`): a plain write
        //    goes to the page cache at once, and if it took every byte, the modification
        //    is over. Otherwise, what is left of it goes to the pool; a view the copy here
        //    covered needs nothing more there. (Not into an overlay: a write to a granule
        //    it does not hold yet first copies the chain's granule in, on the pool.)
        if mark.journalRegions == nil && overlay == nil, case .write(let payload, fua: false) = change,
            preserveInto.allSatisfy({ $0.view.preserveIfNonBlocking(offset: offset, length: length) })
        {
            let done = payload.withUnsafeReadableBytes { image.writeIfNonBlocking($0, at: offset) }
            if done == payload.readableBytes {
                if length >= Self.bulkWriteLength { image.startWriteback(at: offset, length: length) }
                finish(mark)
                return .landed
            }
            change = .write(
                payload.getSlice(at: payload.readerIndex + done, length: payload.readableBytes - done) ?? ByteBuffer(),
                fua: false)
            offset += UInt64(done)
        }
        // 4. A view armed for this write's epoch but not active yet (its checkpoint is
        //    still waiting for the previous epoch's writes): park until it is, holding
        //    no thread.
        let parked = preserveInto.filter { !$0.view.isActive }.map(\.activation)
        // 5. On the I/O pool: journal, preserve, write.
        let pending = change
        let start = offset
        let work: @Sendable () -> ByteBuffer = {
            do throws(StorageError) {
                try self.land(pending, at: start, journal: mark.journalRegions, preserveInto: preserveInto)
                return reply.encode(nil)
            } catch {
                return reply.encode(error)
            }
        }
        let future =
            parked.isEmpty
            ? pool.runIfActive(eventLoop: loop, work)
            : EventLoopFuture.andAllComplete(parked, on: loop).flatMap { pool.runIfActive(eventLoop: loop, work) }
        // 6. Finish: written, failed, or refused by a stopping pool, the modification is
        //    over, and a checkpoint waiting for its epoch may go on.
        future.whenComplete { _ in self.finish(mark) }
        return .pending(future)
    }

    /// Steps 5a–c of `modify`, on the I/O pool (blocking).
    private func land(
        _ change: Change, at offset: UInt64, journal: ClosedRange<Int>?, preserveInto: [OpenViews.Entry]
    ) throws(StorageError) {
        // a. Journal: the marked regions are durable before the data may be, so a crash
        //    cannot lose the bits of a write that reached the disk.
        if let journal {
            do throws(BitmapError) {
                try tracker.makeDurable(journal)
            } catch {
                // A full disk is reported as such, so clients can pause and resume.
                throw StorageError.ioFailed(operation: "bitmap journal (\(error))", errno: error.isOutOfSpace ? ENOSPC : EIO)
            }
        }
        // b. Preserve (copy-before-write): each view keeps the old data before it
        //    changes. A failed copy breaks its view, not the write.
        for entry in preserveInto {
            assert(entry.view.isActive || entry.view.isClosed, "a write preserved into a view before its instant")
            try? entry.view.preserve(offset: offset, length: change.length)
        }
        // c. Write (a chain export's into its overlay).
        if let overlay {
            try Self.land(change, at: offset, into: overlay)
            return
        }
        switch change {
        case .write(let payload, let fua):
            try payload.withUnsafeReadableBytes { (bytes) throws(StorageError) in try image.write(bytes, at: offset) }
            if fua {
                try image.flush()
            } else if change.length >= Self.bulkWriteLength {
                image.startWriteback(at: offset, length: change.length)
            }
        case .writeZeroes(let length, let mayPunchHole, let fastOnly, let fua):
            try image.writeZeroes(at: offset, length: length, allowHole: mayPunchHole, fastOnly: fastOnly)
            if fua { try image.flush() }
        case .trim(let length, let fua):
            do throws(StorageError) {
                try image.discard(at: offset, length: length)
            } catch .notSupported {
                // TRIM is advisory: a file system that cannot punch holes keeps the data.
            }
            if fua { try image.flush() }
        }
    }

    /// Step 5c for a backup chain export: the overlay copies in what a partial write of a
    /// new granule needs; TRIM is advisory and changes nothing.
    private static func land(_ change: Change, at offset: UInt64, into overlay: ChainOverlay) throws(StorageError) {
        switch change {
        case .write(let payload, let fua):
            try payload.withUnsafeReadableBytes { (bytes) throws(StorageError) in try overlay.write(bytes, at: offset) }
            if fua { try overlay.flush() }
        case .writeZeroes(let length, _, let fastOnly, let fua):
            try overlay.writeZeroes(at: offset, length: UInt64(length), fastOnly: fastOnly)
            if fua { try overlay.flush() }
        case .trim(_, let fua):
            if fua { try overlay.flush() }
        }
    }

    /// Step 6 of `modify`, the one place a modification ends.
    private func finish(_ mark: DirtyTracker.Modification) {
        tracker.didModify(mark)
    }

    /// FLUSH: the data of every finished write, from every connection, is durable; then
    /// the bitmaps are saved if they changed. A failed save does not fail the FLUSH: the
    /// journal still guarantees recovery, and the periodic save retries and logs it.
    /// Blocking: on the I/O pool.
    func flush() throws(StorageError) {
        if let overlay {
            try overlay.flush()
        } else {
            try image.flush()
        }
        try? tracker.saveIfNeeded()
    }

    // MARK: - Management

    /// Applies bitmap operations, all or nothing, atomically with respect to writes
    /// (`DirtyTracker.perform`). Blocking: on the control thread.
    func perform(_ operations: [BitmapOperation]) throws(BitmapError) {
        try management.withLock { (_: inout Void) throws(BitmapError) in try tracker.perform(operations) }
    }

    /// A view the checkpoint opens: its export names, and where its copies go.
    struct ViewPlan {
        var exportNames: [String]
        var sidecarPath: String
    }

    /// What creating a checkpoint did.
    struct CreatedCheckpoint {
        /// The open view's entry, when one was asked for.
        var view: OpenViews.Entry?
        /// For each superseded checkpoint whose view was open: its closed export names.
        var closedViews: [String: [String]]
    }

    // MARK: - One checkpoint

    /// One checkpoint, start to end. Blocking: on the control thread.
    /// - Parameters:
    ///   - live: the export this owner belongs to, which the view's exports show.
    ///   - view: the view to open at the checkpoint's instant, if any.
    ///   - registry: where the view's exports are published and superseded views closed.
    ///   - loop: where writes parked on the view resume.
    func createCheckpoint(
        _ request: CheckpointRequest, of live: Export, view plan: ViewPlan?, publishIn registry: ExportRegistry,
        loop: any EventLoop
    ) throws(ServerError) -> CreatedCheckpoint {
        try management.withLock { (_: inout Void) throws(ServerError) -> CreatedCheckpoint in
            // 1. Arm: the view exists, empty, and writes of the epoch the checkpoint will
            //    start preserve into it (they park until step 3).
            var armed: (entry: OpenViews.Entry, activation: EventLoopPromise<Void>)?
            if let plan {
                let view: PointInTimeView
                do throws(StorageError) {
                    view = try PointInTimeView(image: image, sidecarPath: plan.sidecarPath)
                } catch {
                    throw .storage(error)
                }
                let activation = loop.makePromise(of: Void.self)
                let entry = OpenViews.Entry(
                    checkpoint: request.increment, view: view, exportNames: plan.exportNames,
                    firstEpoch: tracker.nextWriteEpoch, activation: activation.futureResult)
                views.add(entry)
                armed = (entry, activation)
            }
            // 2. Perform: the bits move into the increment and the epoch advances, in one
            //    step under the tracker's lock; then every write of the old epoch lands
            //    before `perform` returns.
            do throws(BitmapError) {
                try tracker.perform([.createCheckpoint(request)])
            } catch {
                if let armed {
                    views.remove(checkpoint: request.increment)
                    armed.entry.view.close()
                    armed.activation.succeed(())
                }
                throw .bitmaps(error)
            }
            // The guarantee: no write that could be in the increment is still landing.
            // Writes from here on are of the view's epoch and preserve into it.
            if let armed {
                assert(tracker.nextWriteEpoch == armed.entry.firstEpoch + 1, "another operation ran between arm and perform")
                assert(
                    tracker.modificationsInFlight(epoch: armed.entry.firstEpoch - 1) == 0,
                    "a write of the checkpoint's increment is still landing")
            }
            // 3. Activate: the view shows the image as it is now, the checkpoint's
            //    instant; parked writes resume, copy-before-write first.
            if let armed {
                armed.entry.view.activate()
                armed.activation.succeed(())
            }
            // 4. Publish: the view's exports, and the views of checkpoints this one
            //    superseded go (their increments are folded into this one).
            if let armed {
                try registry.add(
                    Export(name: armed.entry.exportNames[0], viewOf: live, view: armed.entry.view,
                           increment: request.increment, changesOnly: false))
                try registry.add(
                    Export(name: armed.entry.exportNames[1], viewOf: live, view: armed.entry.view,
                           increment: request.increment, changesOnly: true))
            }
            var closed: [String: [String]] = [:]
            for old in request.supersede { closed[old] = registry.closeView(of: live, checkpoint: old) }
            return CreatedCheckpoint(view: armed?.entry, closedViews: closed)
        }
    }

    /// Completes or aborts a checkpoint, then closes its view.
    /// - Returns: the closed view's export names (empty when none was open).
    func finishCheckpoint(
        _ increment: String, completed: Bool, of live: Export, in registry: ExportRegistry
    ) throws(BitmapError) -> [String] {
        try management.withLock { (_: inout Void) throws(BitmapError) -> [String] in
            try tracker.perform([completed ? .completeCheckpoint(increment: increment) : .abortCheckpoint(increment: increment)])
            return registry.closeView(of: live, checkpoint: increment)
        }
    }
}
