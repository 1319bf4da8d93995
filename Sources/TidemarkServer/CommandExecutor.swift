import BlockStorage
import NBDProtocol
import NIOCore
import NIOPosix

#if canImport(Glibc)
import Glibc
#endif

/// The reply to one command: ready now, or later when the I/O pool is done.
enum CommandResult {
    case reply(ByteBuffer)
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
    /// Cap on SEEK_DATA/SEEK_HOLE runs examined per request.
    static let maximumAllocationExtents = 4096

    let export: Export
    let session: NBDSession
    let allocator: ByteBufferAllocator
    let pool: NIOThreadPool
    let eventLoop: any EventLoop

    func execute(_ command: NBDCommand, cookie: UInt64) -> CommandResult {
        switch command {
        case .read(let offset, let length, let dontFragment):
            return read(cookie: cookie, offset: offset, length: length, dontFragment: dontFragment)
        case .write(let offset, let payload, let fua):
            return write(cookie: cookie, offset: offset, payload: payload, fua: fua)
        case .flush:
            return offload(cookie: cookie, command: .flush) { (image) throws(StorageError) in try image.flush() }
        case .trim(let offset, let length, let fua):
            return offload(cookie: cookie, command: .trim) { (image) throws(StorageError) in
                do throws(StorageError) {
                    try image.discard(at: offset, length: UInt64(length))
                } catch .notSupported {
                    // TRIM is advisory: a file system that cannot punch holes simply keeps the data.
                }
                if fua { try image.flush() }
            }
        case .cache(let offset, let length):
            export.image.prefetch(at: offset, length: UInt64(length))
            return .reply(status(cookie: cookie))
        case .writeZeroes(let offset, let length, let noHole, let fastZero, let fua):
            return offload(cookie: cookie, command: .writeZeroes) { (image) throws(StorageError) in
                try image.writeZeroes(at: offset, length: UInt64(length), allowHole: !noHole, fastOnly: fastZero)
                if fua { try image.flush() }
            }
        case .blockStatus(let offset, let length, let requestOne):
            return .reply(blockStatus(cookie: cookie, offset: offset, length: length, requestOne: requestOne))
        }
    }

    // MARK: - Replies

    private func status(cookie: UInt64) -> ByteBuffer {
        var buffer = allocator.buffer(capacity: NBDReplyEncoder.simpleHeaderSize)
        NBDReplyEncoder.writeSimpleReply(cookie: cookie, error: 0, into: &buffer)
        return buffer
    }

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

    private func read(cookie: UInt64, offset: UInt64, length: UInt32, dontFragment: Bool) -> CommandResult {
        let plan = ReadPlan(
            cookie: cookie, offset: offset, length: length, structured: session.structuredReplies,
            holes: session.structuredReplies && !dontFragment && length >= Self.sparseReadThreshold
                ? export.image.allocationExtents(at: offset, length: UInt64(length), maxExtents: Self.maximumAllocationExtents)
                : nil)
        if let reply = plan.encode(image: export.image, allocator: allocator, blocking: false) {
            return .reply(reply)
        }
        let image = export.image
        let allocator = self.allocator
        return .pending(pool.runIfActive(eventLoop: eventLoop) {
            // A blocking encode never returns nil.
            plan.encode(image: image, allocator: allocator, blocking: true) ?? ByteBuffer()
        })
    }

    // MARK: - Write

    private func write(cookie: UInt64, offset: UInt64, payload: ByteBuffer, fua: Bool) -> CommandResult {
        let image = export.image
        if !fua {
            let done = payload.withUnsafeReadableBytes { image.writeIfNonBlocking($0, at: offset) }
            if done == payload.readableBytes { return .reply(status(cookie: cookie)) }
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

    private func blockStatus(cookie: UInt64, offset: UInt64, length: UInt32, requestOne: Bool) -> ByteBuffer {
        let contexts = session.metaContexts
        var buffer = allocator.buffer(capacity: 64)
        for (index, context) in contexts.enumerated() {
            var builder = BlockStatusBuilder(contextID: context.id, offset: offset, length: length, requestOne: requestOne)
            let done = index == contexts.count - 1
            switch context.name {
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
        return buffer
    }
}
