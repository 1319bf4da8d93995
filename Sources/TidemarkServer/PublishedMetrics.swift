import BlockStorage
import CoreMetrics
import DirtyTracking

/// The swift-metrics objects ``ServerMetrics`` has made, kept so each series is created
/// once and state gauges of things that are gone (a removed bitmap, a closed view) are
/// destroyed instead of reporting their last value forever.
struct PublishedMetrics {
    /// Request series of one export and command.
    struct RequestSeries {
        let succeeded: Counter
        let failed: Counter
        let bytes: Counter
        /// A swift-metrics recorder handler made by the factory (a value histogram in
        /// seconds, in Prometheus), called directly: each replayed latency costs ~330
        /// instructions (callgrind), against ~810 through a `Timer` (a histogram of
        /// 128-bit `Duration`s) and ~600 through `Recorder.record`, whose generic
        /// conversion to `Double` is not specialized across modules.
        let duration: any RecorderHandler
    }

    private var requests: [String: [RequestSeries]] = [:]
    private var inFlight: [String: (gauge: Meter, value: Int)] = [:]
    /// State gauges by metric name and label values.
    private var gauges: [GaugeKey: Meter] = [:]
    /// Journal fsync counters and the tracker's count when last published.
    private var journalFsyncs: [String: (counter: Counter, published: UInt64)] = [:]
    /// Idle-poll counters by outcome and the count when last published.
    private var idlePolls: [String: (counter: Counter, published: Int)] = [:]
    /// When a pending checkpoint (export, checkpoint id or name) was first seen.
    private var pendingSince: [GaugeKey: ContinuousClock.Instant] = [:]

    struct GaugeKey: Hashable {
        var name: String
        var labels: [String]
    }

    // MARK: - Requests

    mutating func publish(_ tally: RequestTally, export: String, factory: any MetricsFactory) {
        let series = requests[export] ?? RequestKind.allCases.map { kind in
            let labels = [("export", export), ("command", kind.label)]
            return RequestSeries(
                succeeded: Counter(label: "tidemark_requests_total", dimensions: labels + [("result", "ok")], factory: factory),
                failed: Counter(label: "tidemark_requests_total", dimensions: labels + [("result", "error")], factory: factory),
                bytes: Counter(label: "tidemark_request_bytes_total", dimensions: labels, factory: factory),
                duration: factory.makeRecorder(
                    label: "tidemark_request_duration_seconds", dimensions: labels, aggregate: true))
        }
        requests[export] = series
        for kind in RequestKind.allCases {
            let index = kind.rawValue
            let entry = series[index]
            if tally.succeeded[index] > 0 { entry.succeeded.increment(by: tally.succeeded[index]) }
            if tally.failed[index] > 0 { entry.failed.increment(by: tally.failed[index]) }
            if tally.bytes[index] > 0 { entry.bytes.increment(by: tally.bytes[index]) }
            tally.latencies(of: kind) { entry.duration.record(Double($0) / 1e9) }
        }
        var current = inFlight[export] ?? (
            Meter(label: "tidemark_requests_in_flight", dimensions: [("export", export)], factory: factory), 0)
        current.value = max(0, current.value + tally.inFlightChange)
        current.gauge.set(current.value)
        inFlight[export] = current
    }

    // MARK: - State

    /// Sets the state gauges of every export to their values now; gauges of series that
    /// no longer exist are destroyed.
    mutating func sample(_ exports: [Export], now: ContinuousClock.Instant, factory: any MetricsFactory) {
        var values: [GaugeKey: Double] = [:]
        var stillPending: Set<GaugeKey> = []
        for export in exports {
            guard let views = export.openViews else { continue }
            let name = export.name
            var pendingCount = 0
            var oldest: ContinuousClock.Instant?
            for bitmap in export.tracker.query() {
                if bitmap.checkpointOf != nil {
                    pendingCount += 1
                    let key = GaugeKey(name: name, labels: [bitmap.checkpointID ?? bitmap.name])
                    let since = pendingSince[key] ?? now
                    pendingSince[key] = since
                    stillPending.insert(key)
                    oldest = min(oldest ?? since, since)
                } else {
                    let labels = [name, bitmap.name]
                    values[GaugeKey(name: "tidemark_bitmap_dirty_bytes", labels: labels)] = Double(bitmap.count)
                    values[GaugeKey(name: "tidemark_bitmap_recording", labels: labels)] = bitmap.recording ? 1 : 0
                }
            }
            values[GaugeKey(name: "tidemark_checkpoints_pending", labels: [name])] = Double(pendingCount)
            let age = oldest.map { now - $0 } ?? .zero
            values[GaugeKey(name: "tidemark_checkpoint_oldest_pending_age_seconds", labels: [name])] =
                Double(age.components.seconds) + Double(age.components.attoseconds) / 1e18
            for entry in views.all {
                values[GaugeKey(name: "tidemark_view_preserved_bytes", labels: [name, entry.checkpoint])] =
                    Double(entry.view.preservedBytes)
            }
            publishJournal(export: name, fsyncs: export.tracker.journalFsyncs, factory: factory)
        }
        pendingSince = pendingSince.filter { stillPending.contains($0.key) }
        for (key, gauge) in gauges where values[key] == nil {
            gauge.destroy()
            gauges[key] = nil
        }
        for (key, value) in values {
            let gauge = gauges[key] ?? Meter(label: key.name, dimensions: Self.dimensions(of: key), factory: factory)
            gauges[key] = gauge
            gauge.set(value)
        }
    }

    /// Only the pending-since times: run often (every second) so a checkpoint's age is
    /// right to a second even when scrapes are minutes apart.
    mutating func notePending(_ exports: [Export], now: ContinuousClock.Instant) {
        for export in exports where export.openViews != nil {
            for bitmap in export.tracker.query() where bitmap.checkpointOf != nil {
                let key = GaugeKey(name: export.name, labels: [bitmap.checkpointID ?? bitmap.name])
                if pendingSince[key] == nil { pendingSince[key] = now }
            }
        }
    }

    private mutating func publishJournal(export: String, fsyncs: UInt64, factory: any MetricsFactory) {
        var entry = journalFsyncs[export] ?? (
            Counter(label: "tidemark_journal_fsyncs_total", dimensions: [("export", export)], factory: factory), 0)
        if fsyncs > entry.published { entry.counter.increment(by: Int64(fsyncs - entry.published)) }
        entry.published = max(entry.published, fsyncs)
        journalFsyncs[export] = entry
    }

    /// `tidemark_idle_polls_total{outcome}`: whether polling pays off (`--poll-max-ns`).
    mutating func publishIdlePolls(caught: Int, expired: Int, factory: any MetricsFactory) {
        for (outcome, count) in [("caught", caught), ("expired", expired)] {
            var entry = idlePolls[outcome] ?? (
                Counter(label: "tidemark_idle_polls_total", dimensions: [("outcome", outcome)], factory: factory), 0)
            if count > entry.published { entry.counter.increment(by: Int64(count - entry.published)) }
            entry.published = max(entry.published, count)
            idlePolls[outcome] = entry
        }
    }

    private static func dimensions(of key: GaugeKey) -> [(String, String)] {
        let names: [String]
        switch key.name {
        case "tidemark_bitmap_dirty_bytes", "tidemark_bitmap_recording": names = ["export", "bitmap"]
        case "tidemark_view_preserved_bytes": names = ["export", "checkpoint"]
        default: names = ["export"]
        }
        return Array(zip(names, key.labels))
    }
}
