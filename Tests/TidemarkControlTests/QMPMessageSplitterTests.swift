import Testing
import QMPWire
import TidemarkControl

@Suite("QMP message splitter")
struct QMPMessageSplitterTests {
    private func messages(_ outputs: [QMPMessageSplitter.Output]) -> [String] {
        outputs.compactMap { output in
            if case .message(let bytes) = output { return String(decoding: bytes, as: UTF8.self) }
            return nil
        }
    }

    @Test("several objects in one feed, with and without separators")
    func severalObjects() {
        var splitter = QMPMessageSplitter()
        let outputs = splitter.feed(Array(#"{"execute":"a"}{"execute":"b"}"#.utf8) + Array("\r\n {\"execute\":\"c\"}\n".utf8))
        #expect(messages(outputs) == [#"{"execute":"a"}"#, #"{"execute":"b"}"#, #"{"execute":"c"}"#])
    }

    @Test("one object split byte by byte")
    func byteByByte() {
        var splitter = QMPMessageSplitter()
        let text = #"{"execute":"x","arguments":{"a":[1,{"b":"}"}]},"id":"q\"{"}"#
        var collected: [QMPMessageSplitter.Output] = []
        for byte in text.utf8 { collected += splitter.feed([byte]) }
        #expect(messages(collected) == [text])
    }

    @Test("braces inside strings and escaped quotes do not end a message")
    func bracesInStrings() {
        var splitter = QMPMessageSplitter()
        let text = #"{"s":"}}}\\\"{"}"#
        #expect(messages(splitter.feed(Array(text.utf8))) == [text])
    }

    @Test("an oversized message is refused and the next one still parses")
    func oversized() {
        var splitter = QMPMessageSplitter(maximumMessageSize: 32)
        let big = "{\"k\":\"" + String(repeating: "x", count: 100) + "\"}"
        let outputs = splitter.feed(Array((big + #"{"ok":1}"#).utf8))
        #expect(outputs == [.oversized, .message(Array(#"{"ok":1}"#.utf8))])
    }

    @Test("bytes outside an object are reported once per run")
    func garbage() {
        var splitter = QMPMessageSplitter()
        let outputs = splitter.feed(Array("nonsense{\"a\":1}".utf8))
        #expect(outputs == [.garbage, .message(Array(#"{"a":1}"#.utf8))])
    }
}

@Suite("QMP arguments")
struct QMPArgumentsTests {
    @Test("missing, mistyped and unexpected parameters get QEMU's messages")
    func errors() throws {
        let arguments = try QMPArguments(["node": "disk", "granularity": "big"], allowed: ["node", "name", "granularity"])
        #expect(throws: QMPError(.genericError, "Parameter 'name' is missing")) { try arguments.string("name") }
        #expect(throws: QMPError(.genericError, "Invalid parameter type for 'granularity', expected: non-negative integer, got a string")) {
            try arguments.optionalUInt("granularity")
        }
        #expect(throws: QMPError(.genericError, "Parameter 'bogus' is unexpected")) {
            try QMPArguments(["bogus": true], allowed: ["node"])
        }
        #expect(try arguments.string("node") == "disk")
        #expect(try arguments.bool("persistent", default: true) == true)
    }

    @Test("JSON values round-trip through text")
    func roundTrip() throws {
        let value: JSONValue = ["a": [1, "two", true, .null], "b": ["c": -5]]
        #expect(try JSONValue.parse(Array(value.serialized().utf8)) == value)
    }
}
