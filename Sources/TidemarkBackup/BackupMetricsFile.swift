import CLinuxIO
import FoundationEssentials

#if canImport(Glibc)
import Glibc
#endif

/// The outcome of backup runs for node_exporter's textfile collector
/// (`tidemark backup … --metrics-file DIR/tidemark.prom`).
///
/// Each run rewrites the file atomically (a temporary file beside it, then a rename), so
/// the collector never reads half a file. A failed run sets only its failure timestamp
/// and keeps everything else, read back from the file itself: "the last success was 30
/// hours ago" stays visible after any number of failures. Series of other chains in the
/// same file are kept too.
///
/// - `tidemark_backup_last_success_timestamp_seconds{chain}`
/// - `tidemark_backup_last_failure_timestamp_seconds{chain}`
/// - `tidemark_backup_last_bytes{chain,kind}`: bytes copied by the last successful run of
///   that kind (`full`, `incremental`)
/// - `tidemark_backup_last_duration_seconds{chain,kind}`
public struct BackupMetricsFile: Sendable {
    public let path: String

    static let help: [(name: String, help: String)] = [
        ("tidemark_backup_last_success_timestamp_seconds", "Unix time of the last successful backup of the chain."),
        ("tidemark_backup_last_failure_timestamp_seconds", "Unix time of the last failed backup of the chain."),
        ("tidemark_backup_last_bytes", "Bytes copied by the last successful backup of this kind."),
        ("tidemark_backup_last_duration_seconds", "Duration of the last successful backup of this kind."),
    ]
    /// The file may not grow past this when read back (it holds a few lines per chain).
    static let maximumSize = 1 << 20

    public init(path: String) {
        self.path = path
    }

    /// Records a successful run.
    public func recordSuccess(
        chain: String, kind: String, bytes: UInt64, durationSeconds: Double, at time: Double = Self.now()
    ) throws {
        var series = read()
        let chainLabel = Self.labels([("chain", chain)])
        let kindLabels = Self.labels([("chain", chain), ("kind", kind)])
        series["tidemark_backup_last_success_timestamp_seconds" + chainLabel] = Self.format(time)
        series["tidemark_backup_last_bytes" + kindLabels] = String(bytes)
        series["tidemark_backup_last_duration_seconds" + kindLabels] = Self.format(durationSeconds)
        try write(series)
    }

    /// Records a failed run; the last success's values stay.
    public func recordFailure(chain: String, at time: Double = Self.now()) throws {
        var series = read()
        series["tidemark_backup_last_failure_timestamp_seconds" + Self.labels([("chain", chain)])] = Self.format(time)
        try write(series)
    }

    /// Wall-clock seconds since 1970.
    public static func now() -> Double {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        return Double(now.tv_sec) + Double(now.tv_nsec) / 1e9
    }

    /// The series in the current file (`name{labels}` → value), only those of the
    /// metrics above; nothing when the file is missing, too large or not ours.
    func read() -> [String: String] {
        guard let data = try? Data(contentsOf: URL(fileURLWithPath: path)), data.count <= Self.maximumSize else {
            return [:]
        }
        var series: [String: String] = [:]
        for line in String(decoding: data, as: UTF8.self).split(separator: "\n") where !line.hasPrefix("#") {
            guard let space = line.lastIndex(of: " ") else { continue }
            let key = String(line[..<space])
            let value = String(line[line.index(after: space)...])
            guard Self.help.contains(where: { key.hasPrefix($0.name + "{") }), Double(value) != nil else { continue }
            series[key] = value
        }
        return series
    }

    private func write(_ series: [String: String]) throws {
        var text = ""
        for (name, help) in Self.help {
            let lines = series.filter { $0.key.hasPrefix(name + "{") }.sorted { $0.key < $1.key }
            guard !lines.isEmpty else { continue }
            text += "# HELP \(name) \(help)\n# TYPE \(name) gauge\n"
            for (key, value) in lines { text += "\(key) \(value)\n" }
        }
        // Beside the file, so the rename is atomic; not *.prom, so the collector skips it.
        let temporary = "\(path).tmp-\(getpid())"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw BackupError.fileSystem(path: temporary, operation: "create", errno: errno) }
        var bytes = text
        let written = bytes.withUTF8 { clinuxio_write_all(fd, $0.baseAddress, $0.count) }
        let writeError = errno
        close(fd)
        guard written == 0 else {
            unlink(temporary)
            throw BackupError.fileSystem(path: temporary, operation: "write", errno: writeError)
        }
        guard rename(temporary, path) == 0 else {
            let renameError = errno
            unlink(temporary)
            throw BackupError.fileSystem(path: path, operation: "rename", errno: renameError)
        }
    }

    /// `{name="value",…}` with the exposition format's escapes.
    static func labels(_ pairs: [(String, String)]) -> String {
        let rendered = pairs.map { name, value in
            var escaped = ""
            for character in value {
                switch character {
                case "\\": escaped += "\\\\"
                case "\"": escaped += "\\\""
                case "\n": escaped += "\\n"
                default: escaped.append(character)
                }
            }
            return "\(name)=\"\(escaped)\""
        }
        return "{" + rendered.joined(separator: ",") + "}"
    }

    static func format(_ value: Double) -> String {
        value == value.rounded() && abs(value) < 1e15 ? String(Int64(value)) : String(value)
    }
}
