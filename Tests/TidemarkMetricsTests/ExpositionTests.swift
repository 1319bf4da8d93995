import BlockStorage
import CoreMetrics
import DirtyTracking
import Foundation
import NBDProtocol
import NIOCore
import Prometheus
import Synchronization
import Testing
@testable import TidemarkMetrics
@testable import TidemarkServer

/// What `GET /metrics` shows, rendered by the real Prometheus registry from what the
/// server's accounting folds in: names, labels, units and histogram buckets.
@Suite("Metrics exposition")
struct ExpositionTests {
    /// A fresh registry with the factory `serve --metrics` bootstraps (no global state).
    static func makeMetrics(clock: @escaping @Sendable () -> ContinuousClock.Instant = { ContinuousClock.now })
        -> (ServerMetrics, PrometheusCollectorRegistry)
    {
        let registry = PrometheusCollectorRegistry()
        return (ServerMetrics(factory: MetricsEndpoint.makeFactory(registry: registry), clock: clock), registry)
    }

    /// The exposition's sample lines as `name{labels}` → value.
    static func samples(_ registry: PrometheusCollectorRegistry) -> [String: String] {
        var result: [String: String] = [:]
        for line in registry.emitToString().split(separator: "\n") where !line.hasPrefix("#") {
            guard let space = line.lastIndex(of: " ") else { continue }
            result[String(line[..<space])] = String(line[line.index(after: space)...])
        }
        return result
    }

    @Test("request counters, bytes and the latency histogram: exact buckets, sum and count")
    func requestSeries() throws {
        let (metrics, registry) = Self.makeMetrics()
        var tally = RequestTally()
        for nanoseconds: Int64 in [5_000, 30_000, 2_000_000] {
            tally.started()
            tally.completed(.write, bytes: 4096, nanoseconds: nanoseconds, failed: false)
        }
        tally.started()
        tally.completed(.read, bytes: 65536, nanoseconds: 100_000, failed: true)
        tally.started()  // still in flight
        metrics.fold(tally, export: "disk")
        metrics.collect(registry: ExportRegistry())
        let samples = Self.samples(registry)

        let write = #"export="disk",command="write""#
        #expect(samples[#"tidemark_requests_total{\#(write),result="ok"}"#] == "3")
        #expect(samples[#"tidemark_requests_total{\#(write),result="error"}"#] == "0")
        #expect(samples[#"tidemark_requests_total{export="disk",command="read",result="error"}"#] == "1")
        #expect(samples[#"tidemark_request_bytes_total{\#(write)}"#] == "12288")
        #expect(samples[#"tidemark_request_bytes_total{export="disk",command="read"}"#] == "65536")
        #expect(samples[#"tidemark_requests_in_flight{export="disk"}"#] == "1.0")

        // Cumulative buckets from 10 µs to 1 s, +Inf, then an exact sum in seconds.
        let expected: [(String, String)] = [
            ("1e-05", "1"), ("2.5e-05", "1"), ("5e-05", "2"), ("0.0001", "2"), ("0.00025", "2"),
            ("0.0005", "2"), ("0.001", "2"), ("0.0025", "3"), ("0.005", "3"), ("0.01", "3"), ("0.025", "3"),
            ("0.05", "3"), ("0.1", "3"), ("0.25", "3"), ("0.5", "3"), ("1.0", "3"), ("+Inf", "3"),
        ]
        for (bound, count) in expected {
            #expect(samples[#"tidemark_request_duration_seconds_bucket{\#(write),le="\#(bound)"}"#] == count, "le=\(bound)")
        }
        #expect(samples[#"tidemark_request_duration_seconds_count{\#(write)}"#] == "3")
        let sum = try #require(samples[#"tidemark_request_duration_seconds_sum{\#(write)}"#].flatMap(Double.init))
        #expect(abs(sum - 0.002035) < 1e-12, "sum \(sum)")
        let text = registry.emitToString()
        #expect(text.contains("# TYPE tidemark_request_duration_seconds histogram"))
        #expect(text.contains("# TYPE tidemark_requests_total counter"))

        // A second fold adds to the same series.
        var more = RequestTally()
        more.completed(.write, bytes: 4096, nanoseconds: 2_000_000_000, failed: false)
        metrics.fold(more, export: "disk")
        metrics.collect(registry: ExportRegistry())
        let after = Self.samples(registry)
        #expect(after[#"tidemark_requests_total{\#(write),result="ok"}"#] == "4")
        #expect(after[#"tidemark_request_duration_seconds_bucket{\#(write),le="1.0"}"#] == "3")
        #expect(after[#"tidemark_request_duration_seconds_bucket{\#(write),le="+Inf"}"#] == "4")
        #expect(after[#"tidemark_requests_in_flight{export="disk"}"#] == "0.0")
    }

    @Test("latencies handed to swift-metrics reproduce each bucket's count and sum")
    func latencySpreading() {
        var tally = RequestTally()
        let values: [Int64] = [10_000, 10_001, 24_999, 25_000, 7, 999_999_999, 1_000_000_001, 3_000_000_000]
        for value in values { tally.completed(.flush, bytes: 0, nanoseconds: value, failed: false) }
        var replayed: [Int64] = []
        tally.latencies(of: .flush) { replayed.append($0) }
        #expect(replayed.count == values.count)
        #expect(replayed.reduce(0, +) == values.reduce(0, +))
        var original = Array(repeating: 0, count: RequestTally.bucketCount)
        var again = original
        for value in values { original[RequestTally.bucket(for: value)] += 1 }
        for value in replayed { again[RequestTally.bucket(for: value)] += 1 }
        #expect(original == again)
    }

    @Test("the per-request bucket index agrees with the published bounds at and around every bound")
    func bucketIndexMatchesBounds() {
        func reference(_ value: Int64) -> Int {
            RequestTally.bucketBounds.firstIndex { value <= $0 } ?? RequestTally.bucketBounds.count
        }
        for bound in RequestTally.bucketBounds {
            for value in [bound - 1, bound, bound + 1] {
                #expect(RequestTally.bucket(for: value) == reference(value), "\(value) ns")
            }
        }
        for value: Int64 in [0, 1, 9_999, .max] { #expect(RequestTally.bucket(for: value) == reference(value)) }
    }

    @Test("bitmaps, pending checkpoints and their age are sampled at scrape; gone series disappear")
    func stateGauges() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("tidemark-metrics-\(UUID())").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let path = directory + "/image.raw"
        _ = try RawImage.createSparseFileIfMissing(path: path, size: 16 << 20)
        let image = try RawImage(path: path, readOnly: false)
        let export = Export(name: "disk", description: "", image: image, readOnly: false)
        let exports = ExportRegistry()
        try exports.add(export)
        try export.tracker.add(name: "b", persistent: false)
        try export.tracker.add(name: "off", persistent: false, recording: false)
        try export.tracker.recordModification(offset: 0, length: 100_000)

        let now = Mutex(ContinuousClock.now)
        let (metrics, registry) = Self.makeMetrics(clock: { now.withLock { $0 } })
        metrics.collect(registry: exports)
        var samples = Self.samples(registry)
        #expect(samples[#"tidemark_bitmap_dirty_bytes{export="disk",bitmap="b"}"#] == "131072.0")
        #expect(samples[#"tidemark_bitmap_recording{export="disk",bitmap="b"}"#] == "1.0")
        #expect(samples[#"tidemark_bitmap_recording{export="disk",bitmap="off"}"#] == "0.0")
        #expect(samples[#"tidemark_checkpoints_pending{export="disk"}"#] == "0.0")
        #expect(samples[#"tidemark_checkpoint_oldest_pending_age_seconds{export="disk"}"#] == "0.0")
        #expect(samples[#"tidemark_journal_fsyncs_total{export="disk"}"#] == "0")

        try export.tracker.perform([.createCheckpoint(CheckpointRequest(bitmap: "b", increment: "c1", consume: false))])
        metrics.tick(registry: exports)
        now.withLock { $0 += .seconds(42) }
        try export.tracker.remove(name: "off")
        metrics.collect(registry: exports)
        samples = Self.samples(registry)
        #expect(samples[#"tidemark_checkpoints_pending{export="disk"}"#] == "1.0")
        #expect(samples[#"tidemark_checkpoint_oldest_pending_age_seconds{export="disk"}"#] == "42.0")
        // The increment took the bits; the live bitmap records from empty.
        #expect(samples[#"tidemark_bitmap_dirty_bytes{export="disk",bitmap="b"}"#] == "0.0")
        #expect(samples[#"tidemark_bitmap_recording{export="disk",bitmap="off"}"#] == nil)
        #expect(!registry.emitToString().contains(#"bitmap="off""#))
    }

    @Test("reply inspection finds simple and structured errors, and only those")
    func replyErrors() {
        var buffer = ByteBuffer()
        NBDReplyEncoder.writeSimpleReply(cookie: 1, error: 0, into: &buffer)
        #expect(!NBDReplyEncoder.isErrorReply(buffer, at: 0))
        let second = buffer.writerIndex
        NBDReplyEncoder.writeSimpleReply(cookie: 2, error: 5, into: &buffer)
        #expect(NBDReplyEncoder.isErrorReply(buffer, at: second))
        var chunks = ByteBuffer()
        NBDReplyEncoder.writeOffsetDataHeader(cookie: 3, offset: 0, length: 4, done: false, into: &chunks)
        chunks.writeBytes([1, 2, 3, 4])
        #expect(!NBDReplyEncoder.isErrorReply(chunks, at: 0))
        NBDReplyEncoder.writeErrorChunk(cookie: 3, error: 5, message: "boom", into: &chunks)
        #expect(NBDReplyEncoder.isErrorReply(chunks, at: 0))
        #expect(!NBDReplyEncoder.isErrorReply(ByteBuffer(bytes: [0x67, 0x44]), at: 0))
    }
}
