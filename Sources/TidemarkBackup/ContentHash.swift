/// XXH64, the 64-bit xxHash (Yann Collet's algorithm), written from its published
/// description: four 64-bit lanes over 32-byte stripes, then the tail, then an avalanche.
///
/// Why this and not SHA-256: the package has no crypto dependency, the manifest's
/// checksums guard against corruption and wrong-chain bugs rather than against an attacker,
/// and a backup hashes every byte it copies, so the hash has to run at memory speed
/// (several GB/s) to stay off the critical path. FNV-1a, byte at a time, would not.
///
/// Reference values: XXH64("") = 0xEF46DB3751D8E999, XXH64("a") = 0xD24EC4F1A98C6E5B,
/// XXH64("abc") = 0x44BC2CF5AD770999 (seed 0); the unit tests check them.
public enum ContentHash {
    static let prime1: UInt64 = 0x9E37_79B1_85EB_CA87
    static let prime2: UInt64 = 0xC2B2_AE3D_27D4_EB4F
    static let prime3: UInt64 = 0x1656_67B1_9E37_79F9
    static let prime4: UInt64 = 0x85EB_CA77_C2B2_AE63
    static let prime5: UInt64 = 0x27D4_EB2F_1656_67C5

    /// XXH64 of `bytes` with seed 0.
    public static func xxh64(_ bytes: UnsafeRawBufferPointer, seed: UInt64 = 0) -> UInt64 {
        let count = bytes.count
        guard let base = bytes.baseAddress else { return finish(seed &+ prime5 &+ 0) }
        var index = 0
        var hash: UInt64
        if count >= 32 {
            var lane1 = seed &+ prime1 &+ prime2
            var lane2 = seed &+ prime2
            var lane3 = seed
            var lane4 = seed &- prime1
            let limit = count - 32
            while index <= limit {
                lane1 = round(lane1, load64(base, index))
                lane2 = round(lane2, load64(base, index + 8))
                lane3 = round(lane3, load64(base, index + 16))
                lane4 = round(lane4, load64(base, index + 24))
                index += 32
            }
            hash = rotate(lane1, 1) &+ rotate(lane2, 7) &+ rotate(lane3, 12) &+ rotate(lane4, 18)
            hash = merge(hash, lane1)
            hash = merge(hash, lane2)
            hash = merge(hash, lane3)
            hash = merge(hash, lane4)
        } else {
            hash = seed &+ prime5
        }
        hash &+= UInt64(count)
        while index + 8 <= count {
            hash ^= round(0, load64(base, index))
            hash = rotate(hash, 27) &* prime1 &+ prime4
            index += 8
        }
        if index + 4 <= count {
            let word = UInt64(UInt32(littleEndian: base.loadUnaligned(fromByteOffset: index, as: UInt32.self)))
            hash ^= word &* prime1
            hash = rotate(hash, 23) &* prime2 &+ prime3
            index += 4
        }
        while index < count {
            hash ^= UInt64(base.load(fromByteOffset: index, as: UInt8.self)) &* prime5
            hash = rotate(hash, 11) &* prime1
            index += 1
        }
        return finish(hash)
    }

    /// XXH64 of an array (convenience for tests and small inputs).
    public static func xxh64(_ bytes: [UInt8]) -> UInt64 {
        bytes.withUnsafeBytes { xxh64($0) }
    }

    /// The hash as 16 lowercase hex digits, as the manifest stores it.
    public static func hex(_ value: UInt64) -> String {
        let digits = String(value, radix: 16)
        return String(repeating: "0", count: 16 - digits.count) + digits
    }

    @inline(__always)
    private static func load64(_ base: UnsafeRawPointer, _ offset: Int) -> UInt64 {
        UInt64(littleEndian: base.loadUnaligned(fromByteOffset: offset, as: UInt64.self))
    }

    @inline(__always)
    private static func rotate(_ value: UInt64, _ bits: UInt64) -> UInt64 {
        (value << bits) | (value >> (64 - bits))
    }

    @inline(__always)
    private static func round(_ accumulator: UInt64, _ input: UInt64) -> UInt64 {
        rotate(accumulator &+ input &* prime2, 31) &* prime1
    }

    @inline(__always)
    private static func merge(_ hash: UInt64, _ lane: UInt64) -> UInt64 {
        (hash ^ round(0, lane)) &* prime1 &+ prime4
    }

    @inline(__always)
    private static func finish(_ value: UInt64) -> UInt64 {
        var hash = value
        hash ^= hash >> 33
        hash &*= prime2
        hash ^= hash >> 29
        hash &*= prime3
        hash ^= hash >> 32
        return hash
    }
}
