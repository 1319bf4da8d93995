/// What a backup will do, cluster by cluster: copy these ranges, record those as zeroes,
/// leave the rest to the backing file.
///
/// Why a separate, pure value: the rounding rules are where backups go wrong, so they are
/// unit-tested on their own. A qcow2 cluster (64 KiB) is all-or-nothing: it is stored,
/// marked zero, or left to the backing file. Block-status ranges need not be aligned
/// (bitmap granules can be 512 B or 4 KiB), so:
/// - a data range is rounded outward to whole clusters, and the whole cluster is read from
///   the server (the parts outside the range are unchanged there, so reading them is
///   correct and spares reading the old chain);
/// - a zero range becomes zero clusters only where it covers whole clusters; a partly
///   covered cluster is copied as data instead;
/// - where data and zero meet in one cluster, data wins.
/// The last cluster may be short: ranges are clipped to the virtual size, and a range
/// reaching the end of the disk covers the short last cluster whole.
public struct BackupPlan: Sendable, Equatable {
    /// What to do with a run of clusters.
    public enum Action: Sendable, Equatable {
        case copy
        case zero
    }

    /// A cluster-aligned run (the end may be the virtual size).
    public struct Run: Sendable, Equatable, CustomStringConvertible {
        public var start: UInt64
        public var end: UInt64
        public var action: Action

        public init(_ start: UInt64, _ end: UInt64, _ action: Action) {
            self.start = start
            self.end = end
            self.action = action
        }

        public var length: UInt64 { end - start }
        public var description: String { "[\(start), \(end)) \(action)" }
    }

    public let virtualSize: UInt64
    public let clusterSize: UInt64
    /// Sorted, non-overlapping, neighbours with the same action merged.
    public private(set) var runs: [Run] = []

    public init(virtualSize: UInt64, clusterSize: UInt64 = Qcow2Format.clusterSize) {
        self.virtualSize = virtualSize
        self.clusterSize = clusterSize
    }

    /// Bytes that will be copied.
    public var bytesToCopy: UInt64 {
        runs.filter { $0.action == .copy }.reduce(0) { $0 + $1.length }
    }

    /// Bytes that will be recorded as zeroes.
    public var bytesToZero: UInt64 {
        runs.filter { $0.action == .zero }.reduce(0) { $0 + $1.length }
    }

    /// Adds a range whose current content must be copied. Ranges must be added in
    /// increasing offset order.
    public mutating func addData(offset: UInt64, length: UInt64) {
        guard length > 0, offset < virtualSize else { return }
        let end = min(offset + length, virtualSize)
        append(Run(floor(offset), ceiling(end), .copy))
    }

    /// Adds a range that now reads as zeroes. Ranges must be added in increasing offset
    /// order.
    public mutating func addZero(offset: UInt64, length: UInt64) {
        guard length > 0, offset < virtualSize else { return }
        let end = min(offset + length, virtualSize)
        let wholeStart = ceiling(offset)
        // A range reaching the end of the disk covers the short last cluster whole.
        let wholeEnd = end == virtualSize ? virtualSize : floor(end)
        guard wholeStart < wholeEnd else {
            append(Run(floor(offset), ceiling(end), .copy))
            return
        }
        if offset < wholeStart { append(Run(floor(offset), wholeStart, .copy)) }
        append(Run(wholeStart, wholeEnd, .zero))
        if wholeEnd < end { append(Run(wholeEnd, ceiling(end), .copy)) }
    }

    /// The copy runs cut into pieces of at most `requestSize` bytes (a multiple of the
    /// cluster size), aligned to `requestSize` so that reads start on round offsets.
    public func copyRequests(requestSize: UInt64) -> [(offset: UInt64, length: UInt64)] {
        let size = max(clusterSize, requestSize / clusterSize * clusterSize)
        var requests: [(offset: UInt64, length: UInt64)] = []
        for run in runs where run.action == .copy {
            var position = run.start
            while position < run.end {
                let boundary = (position / size + 1) * size
                let end = min(run.end, boundary)
                requests.append((position, end - position))
                position = end
            }
        }
        return requests
    }

    private func floor(_ value: UInt64) -> UInt64 {
        value / clusterSize * clusterSize
    }

    private func ceiling(_ value: UInt64) -> UInt64 {
        min((value + clusterSize - 1) / clusterSize * clusterSize, virtualSize)
    }

    /// Appends `run`, resolving an overlap with the runs before it (data wins) and merging
    /// neighbours with the same action.
    private mutating func append(_ incoming: Run) {
        var run = incoming
        guard run.start < run.end else { return }
        while let last = runs.last, run.start < last.end {
            if last.action == run.action || last.action == .copy {
                // Same action: join. Earlier data wins over new zeroes: the new run starts
                // after it.
                if last.action == run.action {
                    run.start = min(run.start, last.start)
                    run.end = max(run.end, last.end)
                    runs.removeLast()
                } else {
                    run.start = last.end
                    if run.start >= run.end { return }
                }
            } else {
                // New data over earlier zeroes: cut the zeroes back.
                runs.removeLast()
                if last.start < run.start { runs.append(Run(last.start, run.start, last.action)) }
                if last.end > run.end { run.end = last.end }  // unreachable for sorted input
            }
        }
        if let last = runs.last, last.end == run.start, last.action == run.action {
            runs[runs.count - 1].end = run.end
        } else {
            runs.append(run)
        }
    }
}
