import BlockStorage
import DirtyTracking
import NBDProtocol
import NIOCore
import NIOPosix

#if canImport(Glibc)
import Glibc
#endif

/// Where the reply to one command went.
enum CommandResult {
    /// Appended to the connection's outgoing buffer.
    case written
    /// In a buffer of its own (large reads), to be written as it is.
    case reply(ByteBuffer)
    /// Coming from the I/O pool.
    case pending(EventLoopFuture<ByteBuffer>)
}

/// Executes validated commands against one export and encodes their replies.
///
/// Reads that the page cache can serve and writes that do not block run inline on the
/// event loop; cache misses, syncs and allocation changes go to the I/O pool. Everything
/// captured by pool closures is `Sendable`: the export, the allocator, plain values.
struct CommandExecutor {
    /// Reads at least this long look for holes and send them as OFFSET_HOLE chunks.
    static let sparseReadThreshold: UInt32 = 64 * 1024
    /// Reads longer than this get a buffer of their own instead of growing the shared one.
    static let sharedBufferReadLimit: UInt32 = 128 * 1024
    /// Cap on SEEK_DATA/SEEK_HOLE runs examined per request.
    static let maximumAllocationExtents = 4096

    let export: Export
    let session: NBDSession
    let allocator: ByteBufferAllocator
    let pool: NIOThreadPool
    let eventLoop: any EventLoop

    /// Executes one command; replies that are ready at once are appended to `outbox`, so
    /// a burst of small requests costs one buffer and one socket write.
    func execute(_ command: NBDCommand, cookie: UInt64, outbox: inout ByteBuffer) -> CommandResult {
        switch command {
        case .read(let offset, let length, let dontFragment):
            return read(cookie: cookie, offset: offset, length: length, dontFragment: dontFragment, outbox: &outbox)
        case .write(let offset, let payload, let fua):
            return write(cookie: cookie, offset: offset, payload: payload, fua: fua, outbox: &outbox)
        case .flush:
            let tracker = export.tracker
            return offload(cookie: cookie, command: .flush) { (image) throws(StorageError) in
                try image.flush()
                Self.saveBitmaps(tracker)
            }
        case .trim(let offset, let length, let fua):
            return modify(cookie: cookie, command: .trim, offset: offset, length: UInt64(length)) { (image) throws(StorageError) in
                do throws(StorageError) {
                    try image.discard(at: offset, length: UInt64(length))
                } catch .notSupported {
                    // TRIM is advisory: a file system that cannot punch holes simply keeps the data.
                }
                if fua { try image.flush() }
            }
        case .cache(let offset, let length):
            export.image.prefetch(at: offset, length: UInt64(length))
            NBDReplyEncoder.writeSimpleReply(cookie: cookie, error: 0, into: &outbox)
            return .written
        case .writeZeroes(let offset, let length, let noHole, let fastZero, let fua):
            return modify(cookie: cookie, command: .writeZeroes, offset: offset, length: UInt64(length)) {
                (image) throws(StorageError) in
                try image.writeZeroes(at: offset, length: UInt64(length), allowHole: !noHole, fastOnly: fastZero)
                if fua { try image.flush() }
            }
        case .blockStatus(let offset, let length, let requestOne):
            blockStatus(cookie: cookie, offset: offset, length: length, requestOne: requestOne, into: &outbox)
            return .written
        }
    }

    // MARK: - Modifications

    /// Everything a write, write-zeroes or trim must do before its data may change the
    /// image, in order: it is marked in every recording bitmap now (on the event loop,
    /// before any byte can reach the disk), then, off the loop, the region journal is made
    /// durable and open views get the old data (copy-before-write).
    private struct Preparation: Sendable {
        let tracker: DirtyTracker
        let modification: DirtyTracker.Modification
        let views: [OpenViews.Entry]
        let offset: UInt64
        let length: UInt64

        /// True when the data may be written at once, on the event loop.
        var isEmpty: Bool { modification.journalRegions == nil && views.isEmpty }

        /// Journal and copy-before-write. A failed copy breaks its view, not the write.
        func run() throws(StorageError) {
            if let regions = modification.journalRegions {
                do throws(BitmapError) {
                    try tracker.makeDurable(regions)
                } catch {
                    // Writing without a durable journal could lose dirty bits in a crash.
                    // A full disk is reported as such, so clients can pause and resume.
                    throw StorageError.ioFailed(operation: "bitmap journal (\(error))", errno: error.isOutOfSpace ? ENOSPC : EIO)
                }
            }
            for entry in views { try? entry.view.preserve(offset: offset, length: length) }
        }

        /// The modification is over (written or failed): checkpoints may stop waiting.
        func finish() { tracker.didModify(modification) }
    }

    private func prepare(offset: UInt64, length: UInt64) -> Preparation {
        let modification = export.tracker.willModify(offset: offset, length: length)
        let views = export.openViews?.targets(offset: offset, length: length, epoch: modification.epoch) ?? []
        return Preparation(
            tracker: export.tracker, modification: modification, views: views, offset: offset, length: length)
    }

    /// Runs a modification on the I/O pool: preparation, then `work`. Writes of a
    /// checkpoint's epoch first wait, without a thread, until its view is active.
    private func modify(
        cookie: UInt64, command: NBDCommandType, offset: UInt64, length: UInt64,
        preparation: Preparation? = nil, _ work: @escaping @Sendable (RawImage) throws(StorageError) -> Void
    ) -> CommandResult {
        let preparation = preparation ?? prepare(offset: offset, length: length)
        let prepared: @Sendable (RawImage) throws(StorageError) -> Void = { (image) throws(StorageError) in
            defer { preparation.finish() }
            try preparation.run()
            try work(image)
        }
        let waiting = preparation.views.filter { !$0.view.isActive }.map(\.activation)
        let future =
            waiting.isEmpty
            ? offloaded(cookie: cookie, command: command, prepared)
            : EventLoopFuture.andAllComplete(waiting, on: eventLoop).flatMap {
                self.offloaded(cookie: cookie, command: command, prepared)
            }
        // The future fails only when the pool stopped before running the work (errors of
        // the work become error replies): the modification is over all the same.
        future.whenFailure { _ in preparation.finish() }
        return .pending(future)
    }

    /// Saves bitmap bits on FLUSH. A failed save does not fail the FLUSH: the data is
    /// durable, the journal still guarantees recovery, and the periodic save retries the
    /// bits and logs the error.
    private static func saveBitmaps(_ tracker: DirtyTracker) {
        try? tracker.saveIfNeeded()
    }

    // MARK: - Replies

    private static func errorReply(
        _ error: StorageError, cookie: UInt64, command: NBDCommandType, structured: Bool,
        allocator: ByteBufferAllocator
    ) -> ByteBuffer {
        var buffer = allocator.buffer(capacity: 64)
        NBDReplyEncoder.writeError(
            cookie: cookie, command: command.rawValue, error: NBDError(storageError: error, command: command),
            message: error.description, structured: structured, into: &buffer)
        return buffer
    }

    /// Runs a status-only operation on the I/O pool.
    private func offload(
        cookie: UInt64, command: NBDCommandType, _ work: @escaping @Sendable (RawImage) throws(StorageError) -> Void
    ) -> CommandResult {
        .pending(offloaded(cookie: cookie, command: command, work))
    }

    private func offloaded(
        cookie: UInt64, command: NBDCommandType, _ work: @escaping @Sendable (RawImage) throws(StorageError) -> Void
    ) -> EventLoopFuture<ByteBuffer> {
        let image = export.image
        let allocator = self.allocator
        let structured = session.structuredReplies
        let future = pool.runIfActive(eventLoop: eventLoop) { () -> ByteBuffer in
            do throws(StorageError) {
                try work(image)
            } catch {
                return Self.errorReply(error, cookie: cookie, command: command, structured: structured, allocator: allocator)
            }
            var buffer = allocator.buffer(capacity: NBDReplyEncoder.simpleHeaderSize)
            NBDReplyEncoder.writeSimpleReply(cookie: cookie, error: 0, into: &buffer)
            return buffer
        }
        return future
    }

    // MARK: - Read

    private func read(
        cookie: UInt64, offset: UInt64, length: UInt32, dontFragment: Bool, outbox: inout ByteBuffer
    ) -> CommandResult {
        switch export.content {
        case .live:
            return read(from: export.image, cookie: cookie, offset: offset, length: length, dontFragment: dontFragment, outbox: &outbox)
        case .view(let view, _, _):
            return read(from: view, cookie: cookie, offset: offset, length: length, dontFragment: dontFragment, outbox: &outbox)
        }
    }

    private func read<Reader: ImageReader>(
        from image: Reader, cookie: UInt64, offset: UInt64, length: UInt32, dontFragment: Bool, outbox: inout ByteBuffer
    ) -> CommandResult {
        let plan = ReadPlan(
            cookie: cookie, offset: offset, length: length, structured: session.structuredReplies,
            holes: session.structuredReplies && !dontFragment && length >= Self.sparseReadThreshold
                ? image.allocationExtents(at: offset, length: UInt64(length), maxExtents: Self.maximumAllocationExtents)
                : nil)
        if length <= Self.sharedBufferReadLimit {
            if plan.encode(into: &outbox, image: image, blocking: false) { return .written }
        } else {
            var buffer = allocator.buffer(capacity: plan.replyCapacity)
            if plan.encode(into: &buffer, image: image, blocking: false) { return .reply(buffer) }
        }
        let allocator = self.allocator
        return .pending(pool.runIfActive(eventLoop: eventLoop) {
            var buffer = allocator.buffer(capacity: plan.replyCapacity)
            _ = plan.encode(into: &buffer, image: image, blocking: true)
            return buffer
        })
    }

    // MARK: - Write

    /// Writes this large are bulk copies (nbdcopy, restores): their writeback starts as
    /// they stream in, so the FLUSH or the stop that follows finds little left to write.
    static let bulkWriteLength: UInt64 = 64 << 10

    private func write(
        cookie: UInt64, offset: UInt64, payload: ByteBuffer, fua: Bool, outbox: inout ByteBuffer
    ) -> CommandResult {
        let length = UInt64(payload.readableBytes)
        let preparation = prepare(offset: offset, length: length)
        if preparation.isEmpty && !fua {
            let image = export.image
            let done = payload.withUnsafeReadableBytes { image.writeIfNonBlocking($0, at: offset) }
            if done == payload.readableBytes {
                if length >= Self.bulkWriteLength { image.startWriteback(at: offset, length: length) }
                preparation.finish()
                NBDReplyEncoder.writeSimpleReply(cookie: cookie, error: 0, into: &outbox)
                return .written
            }
            let rest = payload.getSlice(at: payload.readerIndex + done, length: payload.readableBytes - done) ?? ByteBuffer()
            let restOffset = offset + UInt64(done)
            return modify(cookie: cookie, command: .write, offset: offset, length: length, preparation: preparation) {
                (image) throws(StorageError) in
                try rest.withUnsafeReadableBytes { (bytes) throws(StorageError) in try image.write(bytes, at: restOffset) }
            }
        }
        return modify(cookie: cookie, command: .write, offset: offset, length: length, preparation: preparation) {
            (image) throws(StorageError) in
            try payload.withUnsafeReadableBytes { (bytes) throws(StorageError) in try image.write(bytes, at: offset) }
            if fua {
                try image.flush()
            } else if length >= Self.bulkWriteLength {
                image.startWriteback(at: offset, length: length)
            }
        }
    }

    // MARK: - Block status

    /// One chunk per selected context, in the order SET_META_CONTEXT returned them; each
    /// context's kind was resolved then, so nothing here parses a name.
    private func blockStatus(
        cookie: UInt64, offset: UInt64, length: UInt32, requestOne: Bool, into buffer: inout ByteBuffer
    ) {
        let contexts = session.metaContexts
        for (index, context) in contexts.enumerated() {
            var builder = BlockStatusBuilder(contextID: context.id, offset: offset, length: length, requestOne: requestOne)
            let done = index == contexts.count - 1
            switch context.kind {
            case .dirtyBitmap(let bitmap):
                do throws(BitmapError) {
                    let extents = try export.tracker.extents(
                        name: bitmap, offset: offset, length: UInt64(length),
                        maximumExtents: requestOne ? 1 : BlockStatusBuilder.maximumExtents)
                    for extent in extents where builder.wantsMore {
                        builder.append(length: extent.length, flags: extent.dirty ? NBDDirtyFlags.dirty : 0)
                    }
                } catch {
                    // The bitmap was removed since SET_META_CONTEXT (the only way extents
                    // fails): nothing is known about the range, so all of it is reported
                    // dirty below, the answer that can only make a backup copy more.
                }
                builder.write(cookie: cookie, done: done, fallbackFlags: NBDDirtyFlags.dirty, into: &buffer)
            case .baseAllocation:
                for extent in allocation(offset: offset, length: length, requestOne: requestOne) where builder.wantsMore {
                    builder.append(
                        length: extent.length,
                        flags: extent.isHole ? NBDAllocationFlags.hole | NBDAllocationFlags.zero : 0)
                }
                builder.write(cookie: cookie, done: done, fallbackFlags: 0, into: &buffer)
            case .unrecognized:
                // Never selected on an export built here (every offered name is one of the
                // two above); bit 0 set is "dirty"/"data", the over-reporting answer.
                builder.write(cookie: cookie, done: done, fallbackFlags: 1, into: &buffer)
            }
        }
    }

    /// The export's `base:allocation`: the image's, the view's at its instant, or, for a
    /// view's `.changes` variant, the increment (dirty granules as data, clean as holes).
    private func allocation(offset: UInt64, length: UInt32, requestOne: Bool) -> [AllocationExtent] {
        let maximum = requestOne ? 2 : Self.maximumAllocationExtents
        switch export.content {
        case .live:
            return export.image.allocationExtents(at: offset, length: UInt64(length), maxExtents: maximum)
        case .view(let view, _, false):
            return view.allocationExtents(at: offset, length: UInt64(length), maxExtents: maximum)
        case .view(_, let increment, true):
            // An increment that vanished (completed meanwhile) reads as all data: safe.
            let extents =
                (try? export.tracker.extents(
                    name: increment, offset: offset, length: UInt64(length), maximumExtents: maximum))
                ?? [DirtyExtent(offset: offset, length: UInt64(length), dirty: true)]
            return extents.map { AllocationExtent(length: $0.length, isHole: !$0.dirty) }
        }
    }
}
