import NBDProtocol
import NIOCore

/// One connection's request accounting while `--metrics` is on; the connection holds
/// none at all otherwise, so the data path pays one nil check.
///
/// Confined to the connection's event loop: plain integers in memory of its own (no
/// copy-on-write check, no bounds check, no lock, no call into swift-metrics per
/// request; measured with callgrind, a request costs ~70 instructions here, besides two
/// clock reads). The tally is folded into ``ServerMetrics`` at most every
/// ``ServerMetrics/foldInterval`` (a timer armed by the first request after a fold) and
/// when the connection closes.
final class ConnectionMetrics {
    private let server: ServerMetrics
    private let export: String
    private let eventLoop: any EventLoop
    /// Per-request counters in one allocation of ``Layout/size`` integers, zeroed at each
    /// fold: succeeded, failed and bytes per kind, then bucket counts and bucket sums per
    /// kind and bucket.
    private let counters: UnsafeMutablePointer<Int>
    private var inFlightChange = 0
    private var isEmpty = true
    /// Requests started and not completed, for the in-flight gauge when the connection
    /// closes with some still running (their replies will never be counted).
    private var open = 0
    private var foldTimer: Scheduled<Void>?
    private var finished = false

    init(server: ServerMetrics, export: String, eventLoop: any EventLoop) {
        self.server = server
        self.export = export
        self.eventLoop = eventLoop
        counters = .allocate(capacity: Layout.size)
        counters.initialize(repeating: 0, count: Layout.size)
    }

    deinit {
        counters.deallocate()
    }

    /// Offsets in `counters`; every index comes from ``RequestKind`` and
    /// ``RequestTally/bucket(for:)``, so it is in range.
    enum Layout {
        static let kinds = RequestTally.kindCount
        static let buckets = RequestTally.bucketCount
        static let succeeded = 0
        static let failed = kinds
        static let bytes = 2 * kinds
        static let bucketCounts = 3 * kinds
        static let bucketSums = 3 * kinds + kinds * buckets
        static let size = 3 * kinds + 2 * kinds * buckets
    }

    /// A request starts: returns its start time for ``completed(_:bytes:startedAt:failed:)``.
    func started() -> UInt64 {
        open += 1
        inFlightChange += 1
        isEmpty = false
        return MonotonicClock.nanoseconds()
    }

    /// A request's reply was queued.
    func completed(_ kind: RequestKind, bytes: Int, startedAt start: UInt64, failed: Bool) {
        guard !finished else { return }
        open -= 1
        let elapsed = Int64(truncatingIfNeeded: MonotonicClock.nanoseconds() &- start)
        let index = kind.rawValue
        inFlightChange -= 1
        isEmpty = false
        counters[(failed ? Layout.failed : Layout.succeeded) &+ index] &+= 1
        counters[Layout.bytes &+ index] &+= bytes
        let slot = index &* Layout.buckets &+ RequestTally.bucket(for: elapsed)
        counters[Layout.bucketCounts &+ slot] &+= 1
        counters[Layout.bucketSums &+ slot] &+= Int(max(0, elapsed))
        if foldTimer == nil { armFold() }
    }

    /// What the completion of an executed command needs to be counted.
    struct Started {
        let kind: RequestKind
        let bytes: Int
        let time: UInt64

        init(_ command: NBDCommand, cost: UInt64, at time: UInt64) {
            kind = RequestKind(command)
            bytes = RequestKind.bytes(of: command, cost: cost)
            self.time = time
        }
    }

    /// An executed command's reply, made apart from the outbox (a large read, the I/O
    /// pool), was queued; an error in it makes the request count as failed.
    func completed(_ started: Started, reply: ByteBuffer) {
        completed(
            started.kind, bytes: started.bytes, startedAt: started.time,
            failed: NBDReplyEncoder.isErrorReply(reply, at: reply.readerIndex))
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
        inFlightChange -= open
        isEmpty = false
        open = 0
        fold()
    }

    /// The timer holds `self` strongly on purpose: a weak reference would give this object
    /// a side table, and every retain and release of it per request would take the slow
    /// path (measured: ~260 instructions a request). The cycle ends when the timer fires
    /// or ``finish()`` cancels it, which every connection's close does.
    private func armFold() {
        foldTimer = eventLoop.assumeIsolated().scheduleTask(in: ServerMetrics.foldInterval) { [self] in
            foldTimer = nil
            fold()
        }
    }

    private func fold() {
        guard !isEmpty else { return }
        func take(_ offset: Int, _ count: Int) -> [Int] {
            Array(UnsafeBufferPointer(start: counters + offset, count: count))
        }
        let kinds = Layout.kinds
        let slots = kinds * Layout.buckets
        let tally = RequestTally(
            succeeded: take(Layout.succeeded, kinds), failed: take(Layout.failed, kinds),
            bytes: take(Layout.bytes, kinds), bucketCounts: take(Layout.bucketCounts, slots),
            bucketSums: take(Layout.bucketSums, slots).map { Int64($0) }, inFlightChange: inFlightChange)
        counters.update(repeating: 0, count: Layout.size)
        inFlightChange = 0
        isEmpty = true
        server.fold(tally, export: export)
    }
}

/// The monotonic clock in nanoseconds (`clock_gettime(CLOCK_MONOTONIC)` through NIO).
enum MonotonicClock {
    static func nanoseconds() -> UInt64 { NIODeadline.now().uptimeNanoseconds }
}
