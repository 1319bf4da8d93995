import NBDProtocol
import NIOCore

/// One connection's request accounting while `--metrics` is on; the connection holds
/// none at all otherwise, so the data path pays one nil check.
///
/// Confined to the connection's event loop: plain integers, no lock, no call into
/// swift-metrics per request. The tally is folded into ``ServerMetrics`` at most every
/// ``ServerMetrics/foldInterval`` (a timer armed by the first request after a fold) and
/// when the connection closes.
final class ConnectionMetrics {
    private let server: ServerMetrics
    private let export: String
    private let eventLoop: any EventLoop
    private var tally = RequestTally()
    /// Requests started and not completed, for the in-flight gauge when the connection
    /// closes with some still running (their replies will never be counted).
    private var open = 0
    private var foldTimer: Scheduled<Void>?
    private var finished = false

    init(server: ServerMetrics, export: String, eventLoop: any EventLoop) {
        self.server = server
        self.export = export
        self.eventLoop = eventLoop
    }

    /// A request starts: returns its start time for ``completed(_:bytes:startedAt:failed:)``.
    func started() -> UInt64 {
        open += 1
        tally.started()
        return MonotonicClock.nanoseconds()
    }

    /// A request's reply was queued.
    func completed(_ kind: RequestKind, bytes: Int, startedAt start: UInt64, failed: Bool) {
        guard !finished else { return }
        open -= 1
        let elapsed = MonotonicClock.nanoseconds() &- start
        tally.completed(kind, bytes: bytes, nanoseconds: Int64(truncatingIfNeeded: elapsed), failed: failed)
        if foldTimer == nil { armFold() }
    }

    /// An executed command's reply, at `replyStart` in `reply`, was queued; an error in
    /// it makes the request count as failed.
    func completed(_ command: NBDCommand, startedAt start: UInt64, reply: ByteBuffer?, at replyStart: Int? = nil) {
        let failed = reply.map { NBDReplyEncoder.isErrorReply($0, at: replyStart ?? $0.readerIndex) } ?? false
        completed(RequestKind(command), bytes: RequestKind.bytes(of: command), startedAt: start, failed: failed)
    }

    /// A refused request: counted as an error, with the time it took to refuse.
    func refused(rawCommand: UInt16, startedAt start: UInt64) {
        completed(RequestKind(rawCommand: rawCommand), bytes: 0, startedAt: start, failed: true)
    }

    /// The connection closed: the last fold; requests still running leave the gauge.
    func finish() {
        guard !finished else { return }
        finished = true
        foldTimer?.cancel()
        foldTimer = nil
        tally.abandon(open)
        open = 0
        fold()
    }

    private func armFold() {
        foldTimer = eventLoop.assumeIsolated().scheduleTask(in: ServerMetrics.foldInterval) { [weak self] in
            guard let self else { return }
            self.foldTimer = nil
            self.fold()
        }
    }

    private func fold() {
        guard !tally.isEmpty else { return }
        server.fold(tally, export: export)
        tally = RequestTally()
    }
}

/// The monotonic clock in nanoseconds (`clock_gettime(CLOCK_MONOTONIC)` through NIO).
enum MonotonicClock {
    static func nanoseconds() -> UInt64 { NIODeadline.now().uptimeNanoseconds }
}
