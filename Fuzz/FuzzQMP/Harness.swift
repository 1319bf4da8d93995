// libFuzzer harness: the QMP control socket's framing and JSON.
//
// Input: [config byte][8-byte split seed][bytes a control client sends].
// QMPMessageSplitter gets the bytes whole and cut at seed-chosen points, with the same
// messages out (runs of garbage reports count as one); every message is one bounded
// `{...}`. Every message, and the whole input, that JSONValue.parse accepts must survive
// parse → serialize → parse as the same value, and serialize the same way again.
import FuzzSupport

import QMPWire

/// Same value; numbers compare by value (the serializer writes 1.0 as 1).
func equivalent(_ a: JSONValue, _ b: JSONValue) -> Bool {
    switch (a, b) {
    case (.int(let x), .double(let y)), (.double(let y), .int(let x)): return Double(x) == y
    case (.array(let x), .array(let y)): return x.count == y.count && zip(x, y).allSatisfy(equivalent)
    case (.object(let x), .object(let y)):
        return x.count == y.count && x.allSatisfy { key, value in y[key].map { equivalent(value, $0) } ?? false }
    default: return a == b
    }
}

func roundTrip(_ bytes: [UInt8]) {
    guard let value = try? JSONValue.parse(bytes) else { return }
    let text = value.serialized()
    let again: JSONValue
    do {
        again = try JSONValue.parse(Array(text.utf8))
    } catch {
        fail("serialized \(value) as \(text), which does not parse: \(error)")
    }
    require(equivalent(value, again), "round trip changed \(value) into \(again) via \(text)")
    // The text is stable from the second serialization on: the first may still turn a
    // double into an int (1.0 → 1, -0.0 → -0 → 0), which compares equal above.
    let second = again.serialized()
    let third = (try? JSONValue.parse(Array(second.utf8)))?.serialized()
    require(third == second, "serialization not stable: \(text), \(second), then \(third ?? "a parse error")")
}

func collapse(_ outputs: [QMPMessageSplitter.Output]) -> [QMPMessageSplitter.Output] {
    var result: [QMPMessageSplitter.Output] = []
    for output in outputs where !(output == .garbage && result.last == .garbage) { result.append(output) }
    return result
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ start: UnsafeRawPointer, _ count: Int) -> CInt {
    fuzz(UnsafeRawBufferPointer(start: start, count: count))
    return 0
}

func fuzz(_ buffer: UnsafeRawBufferPointer) {
    var input = FuzzInput(buffer)
    let config = input.byte()
    var splitter = StreamSplitter(seed: input.u64())
    let stream = input.rest()
    let limit = [64, 1024, QMPMessageSplitter.defaultMaximumMessageSize, 7][Int(config & 3)]

    var whole = QMPMessageSplitter(maximumMessageSize: limit)
    let wholeOutputs = whole.feed(stream)
    var cut = QMPMessageSplitter(maximumMessageSize: limit)
    var cutOutputs: [QMPMessageSplitter.Output] = []
    for piece in splitter.pieces(of: stream) { cutOutputs += cut.feed(piece) }
    require(collapse(wholeOutputs) == collapse(cutOutputs), "feeding in pieces changed the messages")

    for case .message(let message) in wholeOutputs {
        // The splitter counts braces and brackets alike, so `{...]` is framed too (and then
        // refused by the parser); only the opening byte is certain.
        require(message.first == UInt8(ascii: "{") && [UInt8(ascii: "}"), UInt8(ascii: "]")].contains(message.last!),
                "message is not framed by brackets")
        require(message.count <= limit, "message of \(message.count) bytes over the limit \(limit)")
        roundTrip(message)
    }
    roundTrip(stream)
}
