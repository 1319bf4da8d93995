import Testing
@testable import TidemarkBackup

/// XXH64 against the published reference values, and its behaviour on every tail length.
@Suite("Backup: content hash")
struct ContentHashTests {
    @Test("reference values of XXH64 (seed 0)")
    func referenceValues() {
        #expect(ContentHash.xxh64([]) == 0xEF46_DB37_51D8_E999)
        #expect(ContentHash.xxh64(Array("a".utf8)) == 0xD24E_C4F1_A98C_6E5B)
        #expect(ContentHash.xxh64(Array("abc".utf8)) == 0x44BC_2CF5_AD77_0999)
    }

    @Test("every length up to 100 bytes hashes differently, and one flipped bit changes the hash")
    func tails() {
        let bytes = (0..<100).map { UInt8(truncatingIfNeeded: $0 &* 37 &+ 11) }
        var seen = Set<UInt64>()
        for length in 0...100 {
            let hash = ContentHash.xxh64(Array(bytes[0..<length]))
            #expect(seen.insert(hash).inserted, "length \(length)")
            if length > 0 {
                var flipped = Array(bytes[0..<length])
                flipped[length / 2] ^= 0x10
                #expect(ContentHash.xxh64(flipped) != hash, "length \(length)")
            }
        }
        #expect(ContentHash.hex(0xAB) == "00000000000000ab")
    }
}
