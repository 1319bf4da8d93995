import BackupChain
import BlockStorage
import DirtyTracking
import NBDProtocol
import NIOCore
import NIOPosix

#if canImport(Glibc)
import Glibc
#endif

/// The modifications of a chain export: writes, zeroes and flushes go to its overlay,
/// never to the backup files.
///
/// Kept apart from the live image's write path because it has no views to preserve into
/// and no inline fast path (a write to a granule not yet in the overlay copies the
/// chain's granule first): every modification runs on the I/O pool, recorded in the
/// export's bitmaps first exactly as on a live image (marked on the event loop, the
/// journal made durable before the data changes).
extension CommandExecutor {
    /// Executes the commands a chain export handles differently; nil for those it shares
    /// with every export (reads and block status, which go through `Export.content`).
    func executeOnChain(
        _ command: NBDCommand, overlay: ChainOverlay?, cookie: UInt64, outbox: inout ByteBuffer
    ) -> CommandResult? {
        switch command {
        case .read, .blockStatus:
            return nil
        case .cache(let offset, let length):
            if case .chain(let chain, _) = export.content {
                if let overlay { overlay.prefetch(at: offset, length: UInt64(length)) } else { chain.prefetch(at: offset, length: UInt64(length)) }
            }
            NBDReplyEncoder.writeSimpleReply(cookie: cookie, error: 0, into: &outbox)
            return .written
        case .flush:
            let tracker = export.tracker
            return chainModification(cookie: cookie, command: .flush, range: nil) { () throws(StorageError) in
                try overlay?.flush()
                try? tracker.saveIfNeeded()
            }
        case .trim(let offset, let length, let fua):
            // TRIM is advisory: the overlay keeps what it holds (a discarded range may read
            // back as before, which the protocol allows).
            return chainModification(cookie: cookie, command: .trim, range: (offset, UInt64(length))) { () throws(StorageError) in
                if fua { try overlay?.flush() }
            }
        case .write(let offset, let payload, let fua):
            guard let overlay else { return chainRefusal(cookie: cookie, command: .write, outbox: &outbox) }
            return chainModification(cookie: cookie, command: .write, range: (offset, UInt64(payload.readableBytes))) {
                () throws(StorageError) in
                try payload.withUnsafeReadableBytes { (bytes) throws(StorageError) in try overlay.write(bytes, at: offset) }
                if fua { try overlay.flush() }
            }
        case .writeZeroes(let offset, let length, _, let fastZero, let fua):
            guard let overlay else { return chainRefusal(cookie: cookie, command: .writeZeroes, outbox: &outbox) }
            return chainModification(cookie: cookie, command: .writeZeroes, range: (offset, UInt64(length))) {
                () throws(StorageError) in
                try overlay.writeZeroes(at: offset, length: UInt64(length), fastOnly: fastZero)
                if fua { try overlay.flush() }
            }
        }
    }

    /// A modification of a read-only chain (the protocol layer refuses them first; this
    /// is the storage's own refusal).
    private func chainRefusal(cookie: UInt64, command: NBDCommandType, outbox: inout ByteBuffer) -> CommandResult {
        let error = StorageError.readOnly
        NBDReplyEncoder.writeError(
            cookie: cookie, command: command.rawValue, error: NBDError(storageError: error, command: command),
            message: error.description, structured: session.structuredReplies, into: &outbox)
        return .written
    }

    /// Runs `work` on the I/O pool; with a range, the range is recorded in the bitmaps
    /// first (marked now, journal durable before `work`).
    private func chainModification(
        cookie: UInt64, command: NBDCommandType, range: (offset: UInt64, length: UInt64)?,
        _ work: @escaping @Sendable () throws(StorageError) -> Void
    ) -> CommandResult {
        let tracker = export.tracker
        let modification = range.map { tracker.willModify(offset: $0.offset, length: $0.length) }
        let allocator = self.allocator
        let structured = session.structuredReplies
        let future = pool.runIfActive(eventLoop: eventLoop) { () -> ByteBuffer in
            defer { if let modification { tracker.didModify(modification) } }
            var buffer = allocator.buffer(capacity: 64)
            do throws(StorageError) {
                if let regions = modification?.journalRegions {
                    do throws(BitmapError) {
                        try tracker.makeDurable(regions)
                    } catch {
                        throw StorageError.ioFailed(
                            operation: "bitmap journal (\(error))", errno: error.isOutOfSpace ? ENOSPC : EIO)
                    }
                }
                try work()
            } catch {
                NBDReplyEncoder.writeError(
                    cookie: cookie, command: command.rawValue, error: NBDError(storageError: error, command: command),
                    message: error.description, structured: structured, into: &buffer)
                return buffer
            }
            NBDReplyEncoder.writeSimpleReply(cookie: cookie, error: 0, into: &buffer)
            return buffer
        }
        // The pool stopped before running the work: the modification is over all the same.
        if let modification { future.whenFailure { _ in tracker.didModify(modification) } }
        return .pending(future)
    }
}
