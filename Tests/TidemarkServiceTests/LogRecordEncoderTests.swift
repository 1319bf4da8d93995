import Foundation
import Logging
import Testing
import TidemarkService

/// The exact lines `--log-format json|text` produce, checked by parsing them back.
@Suite("Log record encoder")
struct LogRecordEncoderTests {
    /// 2024-02-29T23:59:58.000042Z, a leap day, in microseconds since the epoch.
    static let leapDayMicros: Int64 = 1_709_251_198_000_042

    @Test("RFC 3339 UTC timestamps with microseconds, across leap days and the epoch")
    func timestamps() {
        #expect(LogRecordEncoder.rfc3339(microseconds: 0) == "1970-01-01T00:00:00.000000Z")
        #expect(LogRecordEncoder.rfc3339(microseconds: Self.leapDayMicros) == "2024-02-29T23:59:58.000042Z")
        #expect(LogRecordEncoder.rfc3339(microseconds: 951_782_400_999_999) == "2000-02-29T00:00:00.999999Z")
        #expect(LogRecordEncoder.rfc3339(microseconds: 4_102_444_799_000_000) == "2099-12-31T23:59:59.000000Z")
        // Before the epoch: the fraction still counts up from the previous whole second.
        #expect(LogRecordEncoder.rfc3339(microseconds: -1) == "1969-12-31T23:59:59.999999Z")
    }

    @Test("a JSON line parses, keeps numbers as numbers and escapes what a client sent")
    func jsonLine() throws {
        let encoder = LogRecordEncoder(format: .json)
        let line = encoder.encode(
            level: .warning, message: "handshake refused: unknown export 'a\"b\\\nc\u{1}'",
            metadata: [
                "event": "handshake.refused",
                "connection": .stringConvertible(UInt64(7)),
                "duration_ms": .stringConvertible(1.5),
                "tls": .stringConvertible(false),
                "peer": "127.0.0.1:4000",
                "time": "a metadata key that collides",
                "nested": ["list": [.stringConvertible(1), "two"]],
            ],
            label: "tidemark", time: Self.leapDayMicros)
        #expect(line.hasSuffix("}\n"))
        #expect(line.filter { $0 == "\n" }.count == 1, "one line: \(line)")
        let object = try #require(
            JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any], "not an object: \(line)")
        #expect(object["time"] as? String == "2024-02-29T23:59:58.000042Z")
        #expect(object["level"] as? String == "warning")
        #expect(object["event"] as? String == "handshake.refused")
        #expect(object["message"] as? String == "handshake refused: unknown export 'a\"b\\\nc\u{1}'")
        #expect(object["connection"] as? Int == 7)
        #expect(object["duration_ms"] as? Double == 1.5)
        #expect(object["tls"] as? Bool == false)
        #expect(object["peer"] as? String == "127.0.0.1:4000")
        #expect(object["meta_time"] as? String == "a metadata key that collides")
        let nested = try #require(object["nested"] as? [String: Any])
        #expect((nested["list"] as? [Any])?.count == 2)
        // The reserved fields come first, in this order, for people reading raw lines.
        #expect(line.hasPrefix("{\"time\":\"2024-02-29T23:59:58.000042Z\",\"level\":\"warning\",\"event\":"))
    }

    @Test("a text line: time, level, message, then sorted key=value fields, on one line")
    func textLine() {
        let encoder = LogRecordEncoder(format: .text)
        let line = encoder.encode(
            level: .info, message: "NBD connection closed",
            metadata: ["export": "disk", "bytes_read": .stringConvertible(UInt64(42)), "peer": "a b"],
            label: "tidemark", time: Self.leapDayMicros)
        #expect(line == "2024-02-29T23:59:58.000042Z info NBD connection closed bytes_read=42 export=disk peer=\"a b\"\n")
        // A newline from the network cannot forge a second line.
        let forged = encoder.encode(
            level: .warning, message: "unknown export 'x\n2024-01-01T00:00:00Z info fake'", metadata: [:],
            label: "tidemark", time: 0)
        #expect(forged.filter { $0 == "\n" }.count == 1, "\(forged)")
    }

    @Test("journal text: a syslog priority prefix per level, no timestamp")
    func journalLine() {
        let encoder = LogRecordEncoder(format: .text, journalPrefixes: true)
        let expected: [(Logger.Level, String)] = [
            (.debug, "<7>"), (.info, "<6>"), (.notice, "<5>"), (.warning, "<4>"), (.error, "<3>"), (.critical, "<2>"),
        ]
        for (level, prefix) in expected {
            let line = encoder.encode(level: level, message: "m", metadata: [:], label: "tidemark", time: 0)
            #expect(line == prefix + "m\n")
        }
    }
}
