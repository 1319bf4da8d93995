/// A run of bytes with one allocation state, as `SEEK_DATA`/`SEEK_HOLE` report it.
public struct AllocationExtent: Equatable, Sendable {
    /// Byte length of the run (never zero).
    public var length: UInt64
    /// True when the run is a hole: unallocated and reading as zeroes.
    public var isHole: Bool
    /// True when the run reads as zeroes: every hole, and allocated zeroes an image format
    /// records as such (a qcow2 zero cluster), which NBD reports as ZERO without HOLE.
    public var isZero: Bool

    public init(length: UInt64, isHole: Bool) {
        self.length = length
        self.isHole = isHole
        self.isZero = isHole
    }

    public init(length: UInt64, isHole: Bool, isZero: Bool) {
        self.length = length
        self.isHole = isHole
        self.isZero = isZero || isHole
    }
}
