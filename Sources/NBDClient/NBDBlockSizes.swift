/// The block-size constraints a server advertised in `NBD_INFO_BLOCK_SIZE`.
///
/// Each value is 0 when the server advertised nothing (libnbd also reports 0 when it
/// ignored a malformed advertisement), so tests can tell "not sent" from a real size.
public struct NBDBlockSizes: Sendable, Hashable, CustomStringConvertible {
    /// Smallest addressable length and alignment.
    public var minimum: UInt32
    /// Size for efficient I/O.
    public var preferred: UInt32
    /// Largest READ/WRITE payload the server accepts.
    public var maximum: UInt32

    public init(minimum: UInt32, preferred: UInt32, maximum: UInt32) {
        self.minimum = minimum
        self.preferred = preferred
        self.maximum = maximum
    }

    public var description: String {
        "min \(minimum), preferred \(preferred), max \(maximum)"
    }
}
