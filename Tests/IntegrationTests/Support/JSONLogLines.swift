import Foundation

/// A server's stderr written with `--log-format json`, every line parsed as one JSON
/// object. Parsing is strict: a line that is not a JSON object fails the test, since a
/// log shipper would drop or mangle it.
struct JSONLogLines {
    typealias Entry = [String: Any]

    let entries: [Entry]

    init(_ log: String) throws {
        var entries: [Entry] = []
        for (index, line) in log.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            if line.isEmpty && index == log.split(separator: "\n", omittingEmptySubsequences: false).count - 1 { continue }
            guard let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? Entry else {
                throw HarnessError("stderr line \(index + 1) is not a JSON object: \(line)\nwhole log:\n\(log)")
            }
            entries.append(object)
        }
        self.entries = entries
    }

    /// Entries whose `event` is `event`.
    func events(_ event: String) -> [Entry] {
        entries.filter { $0["event"] as? String == event }
    }

    /// `2025-01-31T12:34:56.123456Z`: RFC 3339, UTC, microseconds.
    static func isTimestamp(_ value: Any?) -> Bool {
        guard let text = value as? String else { return false }
        return text.wholeMatch(of: /\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z/) != nil
    }
}
