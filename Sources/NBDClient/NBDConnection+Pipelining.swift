import CLibNBD

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Many commands in flight on one connection, through libnbd's asynchronous API.
///
/// The synchronous calls take the handle's lock for the whole command, so a single
/// connection never has more than one of them in flight, however many threads call it.
/// Real clients (nbdcopy, fio, qemu) pipeline dozens of requests per connection, and a
/// server must cope with that: replies out of order, interleaved writes, a stop request
/// arriving while requests are queued. These calls submit every request before waiting
/// for any reply.
extension NBDConnection {
    /// One pipelined WRITE.
    public struct PipelinedWrite: Sendable {
        public var offset: UInt64
        public var data: [UInt8]
        public var flags: NBDCommandFlags

        public init(offset: UInt64, data: [UInt8], flags: NBDCommandFlags = []) {
            self.offset = offset
            self.data = data
            self.flags = flags
        }
    }

    /// Submits every write, then waits for all of them. The result has one entry per
    /// write: `nil` for success, or the error the server gave it. A write libnbd could not
    /// even submit (the connection died first) carries libnbd's submission error, so a
    /// caller can tell exactly which writes were acknowledged.
    public func pipelinedWrites(_ writes: [PipelinedWrite]) -> [NBDClientError?] {
        // libnbd reads the buffers until each command completes, so they live in memory
        // this function owns until the end, not in the callers' arrays.
        let buffers = writes.map { write -> UnsafeMutableRawBufferPointer in
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(write.data.count, 1), alignment: 16)
            write.data.withUnsafeBytes { buffer.copyMemory(from: $0) }
            return buffer
        }
        defer { buffers.forEach { $0.deallocate() } }
        let submissions = zip(writes, buffers).map { write, buffer in
            submit("nbd_aio_pwrite") {
                nbd_aio_pwrite($0, buffer.baseAddress!, write.data.count, write.offset, Self.noCompletion, write.flags.rawValue)
            }
        }
        return drain(submissions)
    }

    /// Submits every read, then waits for all of them. One result per read, failures
    /// reported as for ``pipelinedWrites(_:)``.
    public func pipelinedReads(_ reads: [(offset: UInt64, count: Int)]) -> [Result<[UInt8], NBDClientError>] {
        let buffers = reads.map { read -> UnsafeMutableRawBufferPointer in
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(read.count, 1), alignment: 16)
            buffer.initializeMemory(as: UInt8.self, repeating: 0)
            return buffer
        }
        defer { buffers.forEach { $0.deallocate() } }
        let submissions = zip(reads, buffers).map { read, buffer in
            submit("nbd_aio_pread") { nbd_aio_pread($0, buffer.baseAddress!, read.count, read.offset, Self.noCompletion, 0) }
        }
        let errors = drain(submissions)
        return zip(errors, zip(reads, buffers)).map { error, pair in
            if let error { return .failure(error) }
            return .success([UInt8](UnsafeRawBufferPointer(rebasing: pair.1[0..<pair.0.count])))
        }
    }

    /// No completion callback: results are collected with `nbd_aio_command_completed`.
    /// (`NBD_NULL_COMPLETION` is a C compound literal Swift cannot import.)
    private static var noCompletion: nbd_completion_callback {
        nbd_completion_callback(callback: nil, user_data: nil, free: nil)
    }

    /// Submits one asynchronous command: its cookie, or the submission error.
    private func submit(_ name: String, _ body: (OpaquePointer) -> Int64) -> Result<Int64, NBDClientError> {
        let cookie = body(handle)
        return cookie == -1 ? .failure(NBDClientError.last(name)) : .success(cookie)
    }

    /// Polls until every submitted command has completed (or the connection died) and
    /// retires them, returning each one's error (submission errors passed through).
    private func drain(_ submissions: [Result<Int64, NBDClientError>]) -> [NBDClientError?] {
        var results = [NBDClientError??](repeating: nil, count: submissions.count)
        var cookies = [Int64](repeating: -1, count: submissions.count)
        var remaining = 0
        for (index, submission) in submissions.enumerated() {
            switch submission {
            case .success(let cookie):
                cookies[index] = cookie
                remaining += 1
            case .failure(let error):
                results[index] = .some(error)
            }
        }
        while remaining > 0 {
            for (index, cookie) in cookies.enumerated() where results[index] == nil {
                switch nbd_aio_command_completed(handle, UInt64(cookie)) {
                case 0:
                    continue
                case 1:
                    results[index] = .some(nil)
                    remaining -= 1
                default:
                    results[index] = .some(NBDClientError.last("command \(cookie)"))
                    remaining -= 1
                }
            }
            if remaining == 0 { break }
            if nbd_aio_is_dead(handle) == 1 || nbd_aio_is_closed(handle) == 1 {
                // Commands that never completed will not now; report them as such.
                for index in results.indices where results[index] == nil {
                    results[index] = .some(NBDClientError(
                        operation: "command \(cookies[index])", message: "connection died: \(connectionState)", errno: ENOTCONN))
                }
                break
            }
            if nbd_poll(handle, 1000) == -1 {
                // The loop notices a dead connection on the next round.
                _ = NBDClientError.last("nbd_poll")
            }
        }
        return results.map { $0 ?? nil }
    }
}
