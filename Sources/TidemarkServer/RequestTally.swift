/// Request counts, bytes and a latency histogram for one export, in plain integers.
///
/// A connection keeps one on its event loop and adds to it with no lock and no call into
/// swift-metrics, so metrics cost the 4 KiB path two clock reads and a few additions;
/// it is folded into the server-wide ``ServerMetrics`` every ``ServerMetrics/foldInterval``
/// and when the connection closes, and published to swift-metrics at scrape time.
public struct RequestTally: Sendable, Equatable {
    /// Upper bounds of the latency buckets in nanoseconds (10 µs to 1 s: a page-cache hit
    /// to a slow fsync); one more bucket above them is +Inf.
    public static let bucketBounds: [Int64] = [
        10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
        1_000_000, 2_500_000, 5_000_000, 10_000_000, 25_000_000, 50_000_000,
        100_000_000, 250_000_000, 500_000_000, 1_000_000_000,
    ]
    static let bucketCount = bucketBounds.count + 1
    static let kindCount = RequestKind.allCases.count

    /// Completed requests with a successful reply, by ``RequestKind/rawValue``.
    public private(set) var succeeded: [Int]
    /// Completed requests with an error reply (refused ones included).
    public private(set) var failed: [Int]
    public private(set) var bytes: [Int]
    /// Per kind, `bucketCount` non-cumulative bucket counts (kind-major).
    public private(set) var bucketCounts: [Int]
    /// Per kind and bucket, the sum of the latencies counted in it, in nanoseconds: lets
    /// the publisher hand swift-metrics values whose buckets and total are both exact.
    public private(set) var bucketSums: [Int64]
    /// Requests started minus requests completed since the last fold.
    public private(set) var inFlightChange: Int

    public init() {
        succeeded = Array(repeating: 0, count: Self.kindCount)
        failed = Array(repeating: 0, count: Self.kindCount)
        bytes = Array(repeating: 0, count: Self.kindCount)
        bucketCounts = Array(repeating: 0, count: Self.kindCount * Self.bucketCount)
        bucketSums = Array(repeating: 0, count: Self.kindCount * Self.bucketCount)
        inFlightChange = 0
    }

    /// A tally of these values (the per-connection counters' fold).
    init(
        succeeded: [Int], failed: [Int], bytes: [Int], bucketCounts: [Int], bucketSums: [Int64], inFlightChange: Int
    ) {
        self.succeeded = succeeded
        self.failed = failed
        self.bytes = bytes
        self.bucketCounts = bucketCounts
        self.bucketSums = bucketSums
        self.inFlightChange = inFlightChange
    }

    /// True when nothing was recorded since the last fold.
    public var isEmpty: Bool { inFlightChange == 0 && succeeded.allSatisfy { $0 == 0 } && failed.allSatisfy { $0 == 0 } }

    /// The index of the bucket `nanoseconds` falls in (bounds are inclusive, as `le`).
    /// Constants rather than `bucketBounds`: no global array on the per-request path
    /// (`bucketIndexMatchesBounds` in the tests keeps the two in step).
    @inline(__always)
    static func bucket(for nanoseconds: Int64) -> Int {
        if nanoseconds <= 1_000_000 {
            if nanoseconds <= 50_000 {
                return nanoseconds <= 10_000 ? 0 : nanoseconds <= 25_000 ? 1 : 2
            }
            return nanoseconds <= 100_000 ? 3 : nanoseconds <= 250_000 ? 4 : nanoseconds <= 500_000 ? 5 : 6
        }
        if nanoseconds <= 50_000_000 {
            return nanoseconds <= 2_500_000 ? 7 : nanoseconds <= 5_000_000 ? 8 : nanoseconds <= 10_000_000 ? 9
                : nanoseconds <= 25_000_000 ? 10 : 11
        }
        return nanoseconds <= 100_000_000 ? 12 : nanoseconds <= 250_000_000 ? 13 : nanoseconds <= 500_000_000 ? 14
            : nanoseconds <= 1_000_000_000 ? 15 : 16
    }

    /// A request was decoded and is about to run.
    mutating func started() { inFlightChange += 1 }

    /// A request's reply was queued, `nanoseconds` after it started.
    mutating func completed(_ kind: RequestKind, bytes count: Int, nanoseconds: Int64, failed isFailure: Bool) {
        let index = kind.rawValue
        inFlightChange -= 1
        if isFailure { failed[index] += 1 } else { succeeded[index] += 1 }
        bytes[index] += count
        let clamped = max(0, nanoseconds)
        let slot = index * Self.bucketCount + Self.bucket(for: clamped)
        bucketCounts[slot] += 1
        bucketSums[slot] += clamped
    }

    /// `count` started requests will never complete (their connection closed).
    mutating func abandon(_ count: Int) { inFlightChange -= count }

    /// Adds `other` into this tally.
    public mutating func add(_ other: RequestTally) {
        for index in 0..<Self.kindCount {
            succeeded[index] += other.succeeded[index]
            failed[index] += other.failed[index]
            bytes[index] += other.bytes[index]
        }
        for slot in 0..<bucketCounts.count {
            bucketCounts[slot] += other.bucketCounts[slot]
            bucketSums[slot] += other.bucketSums[slot]
        }
        inFlightChange += other.inFlightChange
    }

    /// The latencies to record for `kind` so that a histogram with ``bucketBounds`` gets
    /// exactly these bucket counts and sum: per bucket, its count of values whose total is
    /// the bucket's sum (the average, spread by one nanosecond), each inside the bucket.
    public func latencies(of kind: RequestKind, _ body: (Int64) -> Void) {
        for bucket in 0..<Self.bucketCount {
            let slot = kind.rawValue * Self.bucketCount + bucket
            let count = Int64(bucketCounts[slot])
            guard count > 0 else { continue }
            let sum = bucketSums[slot]
            let quotient = sum / count
            let remainder = sum % count
            for index in 0..<count { body(index < remainder ? quotient + 1 : quotient) }
        }
    }
}
