import Logging

#if canImport(Glibc)
import Glibc
#endif

/// Tidemark's swift-log handler: one line per event, text or JSON (`--log-format`), with
/// the metadata the server attaches (`export`, `connection`, `peer`, `event`, …).
///
/// swift-log's `StreamLogHandler` writes local time without sub-seconds and metadata as a
/// free-form prefix; a log shipper needs UTC with microseconds and fields it can index.
public struct LogLineHandler: LogHandler {
    public var logLevel: Logger.Level
    public var metadata: Logger.Metadata = [:]
    public var metadataProvider: Logger.MetadataProvider?
    private let label: String
    private let encoder: LogRecordEncoder
    private let output: LogOutput

    public init(label: String, level: Logger.Level, encoder: LogRecordEncoder, output: LogOutput = .standardError) {
        self.label = label
        self.logLevel = level
        self.encoder = encoder
        self.output = output
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var merged = metadata
        if let provided = metadataProvider?.get(), !provided.isEmpty {
            merged.merge(provided) { _, new in new }
        }
        if let own = event.metadata, !own.isEmpty {
            merged.merge(own) { _, new in new }
        }
        if let error = event.error, merged["error"] == nil {
            merged["error"] = "\(error)"
        }
        let line = encoder.encode(
            level: event.level, message: event.message.description, metadata: merged, label: label,
            time: Self.now())
        output.write(line)
    }

    /// Wall-clock microseconds since the Unix epoch.
    static func now() -> Int64 {
        var time = timespec()
        clock_gettime(CLOCK_REALTIME, &time)
        return Int64(time.tv_sec) * 1_000_000 + Int64(time.tv_nsec) / 1000
    }
}
