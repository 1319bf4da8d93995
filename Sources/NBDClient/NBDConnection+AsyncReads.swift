import CLibNBD

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A streaming window of reads in flight, for clients that copy a whole image.
///
/// ``pipelinedReads(_:)`` submits a fixed batch and waits for all of it, which leaves the
/// connection idle while the caller processes the batch. A backup wants a steady window
/// instead: submit reads into caller-owned buffers, take each one as it completes, process
/// it, submit the next. These calls are that loop's building blocks, over libnbd's
/// `nbd_aio_pread`, `nbd_poll` and `nbd_aio_peek_command_completed`.
///
/// The caller owns the buffers and must keep each one alive and untouched until its read
/// has been taken with ``takeCompletedRead()``.
extension NBDConnection {
    /// One finished read: its cookie and, when the server or the transport failed it, why.
    public struct CompletedRead: Sendable {
        public var cookie: UInt64
        public var error: NBDClientError?
    }

    /// Submits a READ of `buffer.count` bytes at `offset` into `buffer` and returns its
    /// cookie without waiting for the reply.
    public func submitRead(into buffer: UnsafeMutableRawBufferPointer, offset: UInt64) throws(NBDClientError) -> UInt64 {
        guard let base = buffer.baseAddress, buffer.count > 0 else {
            throw NBDClientError(operation: "nbd_aio_pread", message: "empty read buffer", errno: EINVAL)
        }
        let callback = nbd_completion_callback(callback: nil, user_data: nil, free: nil)
        let cookie = nbd_aio_pread(handle, base, buffer.count, offset, callback, 0)
        if cookie == -1 { throw NBDClientError.last("nbd_aio_pread") }
        return UInt64(cookie)
    }

    /// Commands submitted and not yet retired (in flight or completed but not taken).
    public var commandsInFlight: Int {
        Int(max(nbd_aio_in_flight(handle), 0))
    }

    /// Waits up to `timeoutMilliseconds` (-1: forever) for the socket and advances
    /// libnbd's state machine. A dead connection is reported as an error.
    public func pollOnce(timeoutMilliseconds: Int32) throws(NBDClientError) {
        if nbd_poll(handle, timeoutMilliseconds) == -1 {
            throw NBDClientError.last("nbd_poll")
        }
        if isDead {
            throw NBDClientError(operation: "nbd_poll", message: "the connection died (\(connectionState))", errno: ENOTCONN)
        }
    }

    /// Retires one completed command, if any: its cookie and error. `nil` when nothing has
    /// completed yet.
    public func takeCompletedRead() -> CompletedRead? {
        let cookie = nbd_aio_peek_command_completed(handle)
        guard cookie > 0 else { return nil }
        switch nbd_aio_command_completed(handle, UInt64(cookie)) {
        case 1:
            return CompletedRead(cookie: UInt64(cookie), error: nil)
        case 0:
            return nil
        default:
            return CompletedRead(cookie: UInt64(cookie), error: NBDClientError.last("nbd_aio_pread"))
        }
    }
}
