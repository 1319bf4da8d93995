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
            let journal = Self.journal(export.tracker, offset: offset, length: UInt64(length))
            return offload(cookie: cookie, command: .trim) { (image) throws(StorageError) in
                try journal?()
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
            let journal = Self.journal(export.tracker, offset: offset, length: UInt64(length))
            return offload(cookie: cookie, command: .writeZeroes) { (image) throws(StorageError) in
                try journal?()
                try image.writeZeroes(at: offset, length: UInt64(length), allowHole: !noHole, fastOnly: fastZero)
                if fua { try image.flush() }
            }
        case .blockStatus(let offset, let length, let requestOne):
            blockStatus(cookie: cookie, offset: offset, length: length, requestOne: requestOne, into: &outbox)
            return .written
        }
    }

    // MARK: - Dirty tracking

    /// Marks the range in every recording bitmap now (on the event loop, before any byte
    /// can reach the disk) and returns what must run on the pool before the data is
    /// written: making the region journal durable, when the range enters a region not yet
    /// journaled in this epoch; nil when nothing must.
    private static func journal(
        _ tracker: DirtyTracker, offset: UInt64, length: UInt64
    ) -> (@Sendable () throws(StorageError) -> Void)? {
        guard let regions = tracker.willModify(offset: offset, length: length) else { return nil }
        return { () throws(StorageError) in
            do {
                try tracker.makeDurable(regions)
            } catch {
                // Writing without a durable journal could lose dirty bits in a crash.
                throw StorageError.ioFailed(operation: "bitmap journal (\(error))", errno: EIO)
            }
        }
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
            cookie: cookie, command: command.rawValue, error: Self.nbdError(for: error, command: command),
            message: error.description, structured: structured, into: &buffer)
        return buffer
    }

    /// Maps storage failures onto the protocol's errno space, as nbdkit and qemu do.
    static func nbdError(for error: StorageError, command: NBDCommandType) -> NBDError {
        if case .notSupported = error { return command == .writeZeroes ? .notSupported : .invalid }
        switch error.errno {
        case EROFS, EPERM: return .permission
        case EIO: return .io
        case ENOMEM: return .noMemory
        case ENOSPC, EDQUOT, EFBIG: return .noSpace
        case ESHUTDOWN: return .shutdown
        default: return .invalid
        }
    }

    /// Runs a status-only operation on the I/O pool.
    private func offload(
        cookie: UInt64, command: NBDCommandType, _ work: @escaping @Sendable (RawImage) throws(StorageError) -> Void
    ) -> CommandResult {
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
        return .pending(future)
    }

    // MARK: - Read

    private func read(
        cookie: UInt64, offset: UInt64, length: UInt32, dontFragment: Bool, outbox: inout ByteBuffer
    ) -> CommandResult {
        let image = export.image
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

    private func write(
        cookie: UInt64, offset: UInt64, payload: ByteBuffer, fua: Bool, outbox: inout ByteBuffer
    ) -> CommandResult {
        if let journal = Self.journal(export.tracker, offset: offset, length: UInt64(payload.readableBytes)) {
            return offload(cookie: cookie, command: .write) { (image) throws(StorageError) in
                try journal()
                try payload.withUnsafeReadableBytes { (bytes) throws(StorageError) in try image.write(bytes, at: offset) }
                if fua { try image.flush() }
            }
        }
        if !fua {
            let image = export.image
            let done = payload.withUnsafeReadableBytes { image.writeIfNonBlocking($0, at: offset) }
            if done == payload.readableBytes {
                NBDReplyEncoder.writeSimpleReply(cookie: cookie, error: 0, into: &outbox)
                return .written
            }
            let rest = payload.getSlice(at: payload.readerIndex + done, length: payload.readableBytes - done) ?? ByteBuffer()
            let restOffset = offset + UInt64(done)
            return offload(cookie: cookie, command: .write) { (image) throws(StorageError) in
                try rest.withUnsafeReadableBytes { (bytes) throws(StorageError) in try image.write(bytes, at: restOffset) }
            }
        }
        return offload(cookie: cookie, command: .write) { (image) throws(StorageError) in
            try payload.withUnsafeReadableBytes { (bytes) throws(StorageError) in try image.write(bytes, at: offset) }
            try image.flush()
        }
    }

    // MARK: - Block status

    private func blockStatus(
        cookie: UInt64, offset: UInt64, length: UInt32, requestOne: Bool, into buffer: inout ByteBuffer
    ) {
        let contexts = session.metaContexts
        for (index, context) in contexts.enumerated() {
            var builder = BlockStatusBuilder(contextID: context.id, offset: offset, length: length, requestOne: requestOne)
            let done = index == contexts.count - 1
            switch context.name {
            case let name where name.hasPrefix(Export.dirtyBitmapPrefix):
                let bitmap = String(name.dropFirst(Export.dirtyBitmapPrefix.count))
                if let extents = try? export.tracker.extents(
                    name: bitmap, offset: offset, length: UInt64(length),
                    maximumExtents: requestOne ? 1 : BlockStatusBuilder.maximumExtents)
                {
                    for extent in extents where builder.wantsMore {
                        builder.append(length: extent.length, flags: extent.dirty ? NBDDirtyFlags.dirty : 0)
                    }
                }
                // A bitmap removed since SET reports "dirty", the safe answer.
                builder.write(cookie: cookie, done: done, fallbackFlags: NBDDirtyFlags.dirty, into: &buffer)
            case Export.baseAllocation:
                let extents = export.image.allocationExtents(
                    at: offset, length: UInt64(length),
                    maxExtents: requestOne ? 2 : Self.maximumAllocationExtents)
                for extent in extents where builder.wantsMore {
                    builder.append(
                        length: extent.length,
                        flags: extent.isHole ? NBDAllocationFlags.hole | NBDAllocationFlags.zero : 0)
                }
                builder.write(cookie: cookie, done: done, fallbackFlags: 0, into: &buffer)
            default:
                // A context that vanished since SET (e.g. a removed bitmap): report the
                // safe answer for unknown contexts, "dirty"/"data" (bit 0 set).
                builder.write(cookie: cookie, done: done, fallbackFlags: 1, into: &buffer)
            }
        }
    }
}
