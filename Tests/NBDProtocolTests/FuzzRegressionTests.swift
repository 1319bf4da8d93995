import NBDProtocol
import NIOCore
import Testing

/// Inputs found by the libFuzzer harnesses (Fuzz/, README "Fuzzing"), kept as tests.
@Suite("Fuzz regressions: NBD protocol")
struct NBDFuzzRegressionTests {
    /// FuzzRequests: a WRITE header with a bad magic made `bytesNeeded` ask the connection
    /// handler to reserve its whole claimed payload (up to 32 MiB) and `bytesMissing` to wait
    /// for it, before the decoder rejected the magic: 28 bytes from a client cost the server
    /// 32 MiB per connection, and the bad header was only refused once the payload came.
    @Test("a bad-magic WRITE header reserves nothing and is refused at once")
    func badMagicWriteReservesNothing() {
        var decoder = NBDRequestDecoder()
        var buffer = ByteBuffer()
        buffer.writeMultipleIntegers(
            UInt32(0x2560_9514), UInt16(0), NBDCommandType.write.rawValue, UInt64(1), UInt64(0),
            NBDLimits.maximumPayload)
        #expect(decoder.bytesNeeded(in: buffer) == nil)
        #expect(decoder.bytesMissing(in: buffer) == 0)
        #expect(decoder.decode(&buffer).violation == .badMagic(0x2560_9514))
    }

    /// The fuzzer's own input: a bad magic (0x00809513) on a 512-byte WRITE, header complete.
    @Test("the recorded input: bytesMissing says 0, the decoder reports the magic")
    func recordedBadMagicInput() {
        var decoder = NBDRequestDecoder()
        var buffer = ByteBuffer(bytes: [
            0x00, 0x80, 0x95, 0x13, 0x00, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0, 0x01,
            0, 0, 0, 0, 0, 0, 0x10, 0x00, 0x00, 0x00, 0x02, 0x00, 0x78, 0x78,
        ])
        #expect(decoder.bytesMissing(in: buffer) == 0)
        #expect(decoder.decode(&buffer).violation == .badMagic(0x0080_9513))
    }
}
