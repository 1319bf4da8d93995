#if canImport(Glibc)
import Glibc
#endif

// Each harness defines libFuzzer's entry point itself:
//     @_cdecl("LLVMFuzzerTestOneInput")
//     public func fuzzOne(_ start: UnsafeRawPointer, _ count: Int) -> CInt
// SwiftPM compiles targets with `-parse-as-library` under `--sanitize=fuzzer` and libFuzzer
// supplies `main`.

/// Stops the run with a message when an invariant does not hold: libFuzzer records the
/// input as a crash.
public func require(
    _ condition: @autoclosure () -> Bool, _ message: @autoclosure () -> String,
    file: StaticString = #fileID, line: UInt = #line
) {
    if !condition() {
        fputs("FUZZ INVARIANT FAILED (\(file):\(line)): \(message())\n", stderr)
        abort()
    }
}

/// Reads values off the front of the input, as libFuzzer's FuzzedDataProvider does;
/// past the end every read gives zeroes.
public struct FuzzInput {
    public let bytes: [UInt8]
    public private(set) var position = 0

    public init(_ buffer: UnsafeRawBufferPointer) { bytes = Array(buffer) }
    public init(bytes: [UInt8]) { self.bytes = bytes }

    public var remaining: Int { bytes.count - position }

    public mutating func byte() -> UInt8 {
        guard position < bytes.count else { return 0 }
        defer { position += 1 }
        return bytes[position]
    }

    public mutating func u16() -> UInt16 { UInt16(byte()) << 8 | UInt16(byte()) }
    public mutating func u32() -> UInt32 { UInt32(u16()) << 16 | UInt32(u16()) }
    public mutating func u64() -> UInt64 { UInt64(u32()) << 32 | UInt64(u32()) }

    /// Up to `count` bytes.
    public mutating func take(_ count: Int) -> [UInt8] {
        let end = min(bytes.count, position + max(0, count))
        defer { position = end }
        return Array(bytes[position..<end])
    }

    /// Everything left.
    public mutating func rest() -> [UInt8] { take(remaining) }
}

/// Cuts a stream into the pieces a socket might deliver, from a seed: single bytes,
/// header-sized reads and large reads all occur.
public struct StreamSplitter {
    private var state: UInt64

    public init(seed: UInt64) { state = seed | 1 }

    private mutating func next() -> UInt64 {
        state ^= state << 13
        state ^= state >> 7
        state ^= state << 17
        return state
    }

    public mutating func pieces(of bytes: [UInt8]) -> [[UInt8]] {
        var result: [[UInt8]] = []
        var position = 0
        while position < bytes.count {
            let roll = next()
            let length: Int
            switch roll % 4 {
            case 0: length = 1
            case 1: length = Int((roll >> 8) % 32) + 1
            case 2: length = Int((roll >> 8) % 300) + 1
            default: length = Int((roll >> 8) % 70_000) + 1
            }
            let end = min(bytes.count, position + length)
            result.append(Array(bytes[position..<end]))
            position = end
        }
        return result
    }
}

/// Stops the run: an invariant failed.
public func fail(_ message: String, file: StaticString = #fileID, line: UInt = #line) -> Never {
    fputs("FUZZ INVARIANT FAILED (\(file):\(line)): \(message)\n", stderr)
    abort()
}
