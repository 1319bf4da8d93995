/// A run of bytes with one allocation state, as `SEEK_DATA`/`SEEK_HOLE` report it.
public struct AllocationExtent: Equatable, Sendable {
    /// Byte length of the run (never zero).
    public var length: UInt64
    /// True when the run is a hole: unallocated and reading as zeroes.
    public var isHole: Bool

    public init(length: UInt64, isHole: Bool) {
        self.length = length
        self.isHole = isHole
    }
}
