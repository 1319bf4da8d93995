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
/// Reads that the page cache can serve run inline on the event loop, cache misses on the
/// I/O pool. Writes, write-zeroes and trims are modifications: the export's
/// `ExportWrites.modify` runs each one's whole sequence (inline when nothing blocks, on
/// the pool otherwise); this encodes the reply. Everything captured by pool closures is
/// `Sendable`: the export, the allocator, plain values.
///
/// A class: the handler calls it once per request, and a struct of these fields would be
/// copied, and its references retained, on every call.
final class CommandExecutor: Sendable {
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

    init(export: Export, session: NBDSession, allocator: ByteBufferAllocator, pool: NIOThreadPool, eventLoop: any EventLoop) {
        self.export = export
        self.session = session
        self.allocator = allocator
        self.pool = pool
        self.eventLoop = eventLoop
    }

    /// Executes one command; replies that are ready at once are appended to `outbox`, so
    /// a burst of small requests costs one buffer and one socket write.
    func execute(_ command: NBDCommand, cookie: UInt64, outbox: inout ByteBuffer) -> CommandResult {
        switch command {
        case .read(let offset, let length, let dontFragment):
            return read(cookie: cookie, offset: offset, length: length, dontFragment: dontFragment, outbox: &outbox)
        case .write(let offset, let payload, let fua):
            return modify(.write(payload, fua: fua), at: offset, cookie: cookie, command: .write, outbox: &outbox)
        case .flush:
            let writes = export.writes
            return offload(cookie: cookie, command: .flush) { (_) throws(StorageError) in try writes.flush() }
        case .trim(let offset, let length, let fua):
            return modify(.trim(length: length, fua: fua), at: offset, cookie: cookie, command: .trim, outbox: &outbox)
        case .cache(let offset, let length):
            export.image.prefetch(at: offset, length: length)
            NBDReplyEncoder.writeStatusReply(
                cookie: cookie, error: 0, framing: session.framing, requestOffset: offset, into: &outbox)
            return .written
        case .writeZeroes(let offset, let length, let noHole, let fastZero, let fua):
            // One change whatever the length (a whole multi-TiB disk under extended headers):
            // the image zeroes with fallocate, or in bounded 1 MiB buffers without it.
            return modify(
                .writeZeroes(length: length, mayPunchHole: !noHole, fastOnly: fastZero, fua: fua), at: offset,
                cookie: cookie, command: .writeZeroes, outbox: &outbox)
        case .blockStatus(let offset, let length, let requestOne):
            blockStatus(cookie: cookie, offset: offset, length: length, requestOne: requestOne, into: &outbox)
            return .written
        }
    }

    // MARK: - Modifications

    /// Hands a modification to the export's owner of writes and encodes its reply: at
    /// once when it landed inline, on the pool otherwise.
    private func modify(
        _ change: ExportWrites.Change, at offset: UInt64, cookie: UInt64, command: NBDCommandType,
        outbox: inout ByteBuffer
    ) -> CommandResult {
        let reply = StatusReply(
            cookie: cookie, command: command, structured: session.structuredReplies, framing: session.framing,
            requestOffset: offset, allocator: allocator)
        switch export.writes.modify(change, at: offset, pool: pool, on: eventLoop, reply: reply) {
        case .landed:
            NBDReplyEncoder.writeStatusReply(
                cookie: cookie, error: 0, framing: session.framing, requestOffset: offset, into: &outbox)
            return .written
        case .pending(let future):
            return .pending(future)
        }
    }

    /// The reply to a command that returns only a status (write, trim, write-zeroes,
    /// flush), built where the command finished: a simple reply with compact headers, a
    /// NONE or ERROR chunk echoing the request offset with extended ones.
    struct StatusReply: ModificationReply {
        let cookie: UInt64
        let command: NBDCommandType
        let structured: Bool
        let framing: NBDFraming
        let requestOffset: UInt64
        let allocator: ByteBufferAllocator

        func encode(_ error: StorageError?) -> ByteBuffer {
            if let error {
                return CommandExecutor.errorReply(
                    error, cookie: cookie, command: command, structured: structured, framing: framing,
                    requestOffset: requestOffset, allocator: allocator)
            }
            var buffer = allocator.buffer(capacity: NBDReplyEncoder.statusReplySize(framing))
            NBDReplyEncoder.writeStatusReply(
                cookie: cookie, error: 0, framing: framing, requestOffset: requestOffset, into: &buffer)
            return buffer
        }
    }

    // MARK: - Replies

    static func errorReply(
        _ error: StorageError, cookie: UInt64, command: NBDCommandType, structured: Bool, framing: NBDFraming,
        requestOffset: UInt64, allocator: ByteBufferAllocator
    ) -> ByteBuffer {
        var buffer = allocator.buffer(capacity: 64)
        NBDReplyEncoder.writeError(
            cookie: cookie, command: command.rawValue, error: NBDError(storageError: error, command: command),
            message: error.description, structured: structured, framing: framing, requestOffset: requestOffset,
            into: &buffer)
        return buffer
    }

    /// Runs a status-only operation (FLUSH) on the I/O pool.
    private func offload(
        cookie: UInt64, command: NBDCommandType, _ work: @escaping @Sendable (RawImage) throws(StorageError) -> Void
    ) -> CommandResult {
        let image = export.image
        // FLUSH's offset is 0 (anything else was refused), which an extended reply echoes.
        let reply = StatusReply(
            cookie: cookie, command: command, structured: session.structuredReplies, framing: session.framing,
            requestOffset: 0, allocator: allocator)
        return .pending(pool.runIfActive(eventLoop: eventLoop) { () -> ByteBuffer in
            do throws(StorageError) {
                try work(image)
                return reply.encode(nil)
            } catch {
                return reply.encode(error)
            }
        })
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
            framing: session.framing,
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

    // MARK: - Block status

    /// One chunk per selected context, in the order SET_META_CONTEXT returned them; each
    /// context's kind was resolved then, so nothing here parses a name.
    private func blockStatus(
        cookie: UInt64, offset: UInt64, length: UInt64, requestOne: Bool, into buffer: inout ByteBuffer
    ) {
        let contexts = session.metaContexts
        for (index, context) in contexts.enumerated() {
            var builder = BlockStatusBuilder(
                contextID: context.id, offset: offset, length: length, requestOne: requestOne, framing: session.framing)
            let done = index == contexts.count - 1
            switch context.kind {
            case .dirtyBitmap(let bitmap):
                do throws(BitmapError) {
                    let extents = try export.tracker.extents(
                        name: bitmap, offset: offset, length: length,
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
    private func allocation(offset: UInt64, length: UInt64, requestOne: Bool) -> [AllocationExtent] {
        let maximum = requestOne ? 2 : Self.maximumAllocationExtents
        switch export.content {
        case .live:
            return export.image.allocationExtents(at: offset, length: length, maxExtents: maximum)
        case .view(let view, _, false):
            return view.allocationExtents(at: offset, length: length, maxExtents: maximum)
        case .view(_, let increment, true):
            // An increment that vanished (completed meanwhile) reads as all data: safe.
            let extents =
                (try? export.tracker.extents(
                    name: increment, offset: offset, length: length, maximumExtents: maximum))
                ?? [DirtyExtent(offset: offset, length: length, dirty: true)]
            return extents.map { AllocationExtent(length: $0.length, isHole: !$0.dirty) }
        }
    }
}
