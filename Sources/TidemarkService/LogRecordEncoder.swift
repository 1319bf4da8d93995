import Logging

/// Turns one log event into one line of text or JSON.
///
/// Kept apart from the handler so the exact bytes are unit-tested without a file
/// descriptor. Numbers and booleans passed as `.stringConvertible` metadata stay numbers
/// in JSON (`"bytes_read":4096`), so a log shipper can sum and compare them.
public struct LogRecordEncoder: Sendable {
    /// Keys the encoder writes itself; metadata of the same name is written as `meta_KEY`
    /// instead of producing a duplicate key, which strict JSON parsers reject.
    static let reservedKeys: Set<String> = ["time", "level", "message", "event", "label"]

    public let format: LogFormat
    /// Text for the systemd journal: a `<N>` syslog priority prefix (the journal reads it
    /// and stores the level) and no timestamp (the journal has its own).
    public let journalPrefixes: Bool

    public init(format: LogFormat, journalPrefixes: Bool = false) {
        self.format = format
        self.journalPrefixes = journalPrefixes
    }

    /// The line for one event, newline included.
    /// - Parameters:
    ///   - time: microseconds since the Unix epoch.
    ///   - metadata: the handler's, the provider's and the call's metadata, merged.
    public func encode(
        level: Logger.Level, message: String, metadata: Logger.Metadata, label: String, time: Int64
    ) -> String {
        switch format {
        case .json: return encodeJSON(level: level, message: message, metadata: metadata, label: label, time: time)
        case .text: return encodeText(level: level, message: message, metadata: metadata, time: time)
        }
    }

    private func encodeJSON(
        level: Logger.Level, message: String, metadata: Logger.Metadata, label: String, time: Int64
    ) -> String {
        var line = "{\"time\":\""
        line += Self.rfc3339(microseconds: time)
        line += "\",\"level\":\""
        line += level.rawValue
        line += "\""
        if let event = metadata["event"] {
            line += ",\"event\":"
            Self.appendJSON(event, to: &line)
        }
        line += ",\"message\":"
        Self.appendJSONString(message, to: &line)
        line += ",\"label\":"
        Self.appendJSONString(label, to: &line)
        for key in metadata.keys.sorted() where key != "event" {
            guard let value = metadata[key] else { continue }
            line += ","
            Self.appendJSONString(Self.reservedKeys.contains(key) ? "meta_" + key : key, to: &line)
            line += ":"
            Self.appendJSON(value, to: &line)
        }
        line += "}\n"
        return line
    }

    private func encodeText(level: Logger.Level, message: String, metadata: Logger.Metadata, time: Int64) -> String {
        var line: String
        if journalPrefixes {
            line = "<\(Self.syslogPriority(level))>"
        } else {
            line = Self.rfc3339(microseconds: time) + " " + level.rawValue + " "
        }
        // A message can quote what a client sent (an export name may hold a newline): it
        // must not be able to forge a second log line.
        if message.unicodeScalars.contains(where: { $0.value < 0x20 || $0.value == 0x7f }) {
            var quoted = ""
            Self.appendJSONString(message, to: &quoted)
            line += quoted.dropFirst().dropLast()
        } else {
            line += message
        }
        for key in metadata.keys.sorted() {
            guard let value = metadata[key] else { continue }
            line += " " + key + "="
            let text = Self.plainText(value)
            if text.isEmpty || text.contains(where: { $0 == " " || $0 == "\"" || $0 == "=" || $0.isNewline }) {
                Self.appendJSONString(text, to: &line)
            } else {
                line += text
            }
        }
        line += "\n"
        return line
    }

    // MARK: - Pieces

    /// syslog(3) priorities, as the journal reads them from a `<N>` prefix.
    static func syslogPriority(_ level: Logger.Level) -> Int {
        switch level {
        case .trace, .debug: return 7
        case .info: return 6
        case .notice: return 5
        case .warning: return 4
        case .error: return 3
        case .critical: return 2
        }
    }

    /// `2025-01-31T12:34:56.123456Z`: RFC 3339 in UTC with microseconds, computed without
    /// the C library's time zone machinery (no locks, no /etc/localtime).
    public static func rfc3339(microseconds: Int64) -> String {
        let micros = ((microseconds % 1_000_000) + 1_000_000) % 1_000_000
        let seconds = (microseconds - micros) / 1_000_000
        let secondOfDay = ((seconds % 86_400) + 86_400) % 86_400
        let days = (seconds - secondOfDay) / 86_400
        // Howard Hinnant's civil_from_days.
        let z = days + 719_468
        let era = (z >= 0 ? z : z - 146_096) / 146_097
        let dayOfEra = z - era * 146_097
        let yearOfEra = (dayOfEra - dayOfEra / 1460 + dayOfEra / 36_524 - dayOfEra / 146_096) / 365
        let dayOfYear = dayOfEra - (365 * yearOfEra + yearOfEra / 4 - yearOfEra / 100)
        let monthIndex = (5 * dayOfYear + 2) / 153
        let day = dayOfYear - (153 * monthIndex + 2) / 5 + 1
        let month = monthIndex < 10 ? monthIndex + 3 : monthIndex - 9
        let year = yearOfEra + era * 400 + (month <= 2 ? 1 : 0)
        return pad(year, 4) + "-" + pad(month, 2) + "-" + pad(day, 2) + "T" + pad(secondOfDay / 3600, 2) + ":"
            + pad(secondOfDay / 60 % 60, 2) + ":" + pad(secondOfDay % 60, 2) + "." + pad(micros, 6) + "Z"
    }

    private static func pad(_ value: Int64, _ width: Int) -> String {
        let digits = String(value)
        return digits.count >= width ? digits : String(repeating: "0", count: width - digits.count) + digits
    }

    private static func plainText(_ value: Logger.MetadataValue) -> String {
        switch value {
        case .string(let text): return text
        case .stringConvertible(let convertible): return convertible.description
        case .dictionary, .array:
            var json = ""
            appendJSON(value, to: &json)
            return json
        }
    }

    static func appendJSON(_ value: Logger.MetadataValue, to line: inout String) {
        switch value {
        case .string(let text):
            appendJSONString(text, to: &line)
        case .stringConvertible(let convertible):
            switch convertible {
            case let flag as Bool:
                line += flag ? "true" : "false"
            case let number as any BinaryInteger:
                line += number.description
            case let number as Double where number.isFinite:
                line += number.description
            default:
                appendJSONString(convertible.description, to: &line)
            }
        case .dictionary(let dictionary):
            line += "{"
            for (index, key) in dictionary.keys.sorted().enumerated() {
                guard let element = dictionary[key] else { continue }
                if index > 0 { line += "," }
                appendJSONString(key, to: &line)
                line += ":"
                appendJSON(element, to: &line)
            }
            line += "}"
        case .array(let elements):
            line += "["
            for (index, element) in elements.enumerated() {
                if index > 0 { line += "," }
                appendJSON(element, to: &line)
            }
            line += "]"
        }
    }

    /// A JSON string literal (RFC 8259): quotes, backslashes and control characters
    /// escaped; everything else, including non-ASCII, written as UTF-8.
    static func appendJSONString(_ text: String, to line: inout String) {
        line += "\""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": line += "\\\""
            case "\\": line += "\\\\"
            case "\n": line += "\\n"
            case "\r": line += "\\r"
            case "\t": line += "\\t"
            case _ where scalar.value < 0x20 || scalar.value == 0x7f:
                let hex = String(scalar.value, radix: 16)
                line += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default:
                line.unicodeScalars.append(scalar)
            }
        }
        line += "\""
    }
}
