/// Cuts a QMP byte stream into top-level JSON objects; anything else at the top level
/// (arrays, strings, numbers, words) is reported as garbage, skipped whole.
///
/// QMP clients may send several commands in one write, one command across several
/// writes, with or without newlines between them, so the splitter tracks nesting,
/// strings and escapes byte by byte. Messages are bounded: a hostile client cannot make
/// the server buffer without limit.
public struct QMPMessageSplitter {
    /// What feeding bytes produced.
    public enum Output: Equatable {
        case message([UInt8])
        /// A message grew past the limit; its bytes up to the next top-level close are
        /// discarded and the client gets an error.
        case oversized
        /// Bytes outside any object that are not whitespace.
        case garbage
    }

    public static let defaultMaximumMessageSize = 1 << 20

    public let maximumMessageSize: Int
    private var current: [UInt8] = []
    private var depth = 0
    private var inString = false
    private var escaped = false
    private var overflowed = false
    /// The top-level value being framed is an array, not an object.
    private var framingArray = false

    public init(maximumMessageSize: Int = Self.defaultMaximumMessageSize) {
        self.maximumMessageSize = maximumMessageSize
    }

    /// Feeds bytes and returns every complete message or problem they finish.
    public mutating func feed(_ bytes: some Sequence<UInt8>) -> [Output] {
        var outputs: [Output] = []
        for byte in bytes {
            // Strings are scanned the same inside a message and at the top level, where
            // one is garbage but must still be skipped whole: braces in it start nothing.
            if inString {
                if depth > 0 { keep(byte) }
                if escaped {
                    escaped = false
                } else if byte == UInt8(ascii: "\\") {
                    escaped = true
                } else if byte == UInt8(ascii: "\"") {
                    inString = false
                }
                continue
            }
            if depth == 0 {
                switch byte {
                case UInt8(ascii: "{"), UInt8(ascii: "["):
                    // Arrays are framed too and reported whole as garbage, so the objects
                    // inside them are never run.
                    depth = 1
                    current = [byte]
                    overflowed = false
                    framingArray = byte == UInt8(ascii: "[")
                case UInt8(ascii: "\""):
                    inString = true
                    if outputs.last != .garbage { outputs.append(.garbage) }
                case UInt8(ascii: " "), UInt8(ascii: "\n"), UInt8(ascii: "\r"), UInt8(ascii: "\t"):
                    continue
                default:
                    if outputs.last != .garbage { outputs.append(.garbage) }
                }
                continue
            }
            keep(byte)
            switch byte {
            case UInt8(ascii: "\""):
                inString = true
            case UInt8(ascii: "{"), UInt8(ascii: "["):
                depth += 1
            case UInt8(ascii: "}"), UInt8(ascii: "]"):
                depth -= 1
                if depth == 0 {
                    if framingArray {
                        if outputs.last != .garbage { outputs.append(.garbage) }
                    } else {
                        outputs.append(overflowed ? .oversized : .message(current))
                    }
                    current = []
                }
            default:
                break
            }
        }
        return outputs
    }

    /// Appends a byte of the message being framed, up to the size limit.
    private mutating func keep(_ byte: UInt8) {
        guard !overflowed else { return }
        if current.count >= maximumMessageSize {
            overflowed = true
            current = []
        } else {
            current.append(byte)
        }
    }
}
