import Testing
import QMPWire

/// Inputs found by the libFuzzer harnesses (Fuzz/, README "Fuzzing"), kept as tests.
@Suite("Fuzz regressions: QMP JSON")
struct QMPFuzzRegressionTests {
    /// FuzzQMP: `1e400` parsed as a Double infinity, which serializes as `null`, so the value
    /// a command saw was not the one logged or echoed, and parse → serialize → parse changed
    /// it. Numbers outside Double's range are now refused, as QEMU refuses them.
    @Test("numbers beyond Double's range are refused", arguments: ["1e400", "-1e400", "[1E+999]", #"{"granularity":123e9999}"#])
    func hugeNumbersAreRefused(text: String) {
        #expect(throws: (any Error).self) { try JSONValue.parse(Array(text.utf8)) }
    }

    @Test("large finite numbers still parse and survive a round trip",
          arguments: ["1e308", "-1.7976931348623157e308", "123456789012345678901234567890", "5e-324"])
    func largeFiniteNumbersRoundTrip(text: String) throws {
        let value = try JSONValue.parse(Array(text.utf8))
        let again = try JSONValue.parse(Array(value.serialized().utf8))
        guard case .double(let first) = value, case .double(let second) = again else {
            Issue.record("\(text) parsed as \(value), then \(again)")
            return
        }
        #expect(first == second)
    }

    /// FuzzQMP (a harness check, not a parser bug): `-320e-3204744747757` underflows to -0.0,
    /// serialized as `-0`, which parses back as the integer 0: the same number, and the text
    /// is stable from then on.
    @Test("an underflowing negative number comes back as zero, and stays zero")
    func underflowToNegativeZero() throws {
        let value = try JSONValue.parse(Array("-320e-3204744747757".utf8))
        #expect(value == .double(-0.0))
        #expect(value.serialized() == "-0")
        let again = try JSONValue.parse(Array(value.serialized().utf8))
        #expect(again == .int(0))
        #expect(again.serialized() == "0")
    }
}
