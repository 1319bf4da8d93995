/// The constants of the qcow2 format (QEMU's `docs/interop/qcow2.txt`) that Tidemark's
/// writer and reader use, and big-endian helpers: every number in qcow2 is big-endian.
///
/// Tidemark writes one fixed profile — version 3, 64 KiB clusters, 16-bit refcounts, no
/// compression, encryption or extended L2 — so the writer needs no choices and the reader
/// can refuse everything else with a clear message.
public enum Qcow2Format {
    /// "QFI\xfb".
    package static let magic: UInt32 = 0x5146_49FB
    package static let version: UInt32 = 3
    package static let clusterBits: UInt32 = 16
    /// 64 KiB.
    public static let clusterSize: UInt64 = 1 << 16
    /// 16-bit refcounts.
    package static let refcountOrder: UInt32 = 4
    /// Length of the version 3 header without the optional compression-type field.
    package static let headerLength: UInt32 = 104
    /// L2 entries per 64 KiB table (8 bytes each): one table maps 512 MiB.
    package static let l2Entries: UInt64 = clusterSize / 8
    /// 16-bit refcounts per 64 KiB refcount block: one block covers 2 GiB of file.
    package static let refcountsPerBlock: UInt64 = clusterSize / 2
    /// Largest virtual size the reader accepts (QEMU's limit: 2^55 bytes with 2 MiB clusters).
    package static let maximumVirtualSize: UInt64 = 1 << 55
    /// Longest backing file name the format allows.
    package static let maximumBackingNameLength = 1023

    /// Header extension types.
    package static let extensionEnd: UInt32 = 0
    package static let extensionBackingFormat: UInt32 = 0xE279_2ACA

    /// L1/L2 entry bits.
    package static let copiedFlag: UInt64 = 1 << 63
    package static let compressedFlag: UInt64 = 1 << 62
    package static let zeroFlag: UInt64 = 1
    /// Bits 9–55: the host offset of an L2 table or a data cluster.
    package static let offsetMask: UInt64 = 0x00FF_FFFF_FFFF_FE00

    /// Incompatible feature bits.
    package static let incompatibleDirty: UInt64 = 1 << 0
    package static let incompatibleCorrupt: UInt64 = 1 << 1
    package static let incompatibleExternalData: UInt64 = 1 << 2
    package static let incompatibleCompressionType: UInt64 = 1 << 3
    package static let incompatibleExtendedL2: UInt64 = 1 << 4

    /// Rounds `value` up to a multiple of `alignment` (a power of two).
    @inline(__always)
    package static func roundUp(_ value: UInt64, _ alignment: UInt64) -> UInt64 {
        (value + alignment - 1) & ~(alignment - 1)
    }

    /// Rounds `value` down to a multiple of `alignment` (a power of two).
    @inline(__always)
    package static func roundDown(_ value: UInt64, _ alignment: UInt64) -> UInt64 {
        value & ~(alignment - 1)
    }

    /// Number of L1 entries (L2 tables) a disk of `virtualSize` bytes needs.
    package static func l1Size(virtualSize: UInt64) -> UInt64 {
        (virtualSize + l2Entries * clusterSize - 1) / (l2Entries * clusterSize)
    }
}

/// Big-endian reads and writes into byte arrays, for headers and tables.
package enum BigEndian {
    package static func put32(_ value: UInt32, into bytes: inout [UInt8], at offset: Int) {
        for index in 0..<4 { bytes[offset + index] = UInt8(truncatingIfNeeded: value >> (24 - 8 * index)) }
    }

    package static func put64(_ value: UInt64, into bytes: inout [UInt8], at offset: Int) {
        for index in 0..<8 { bytes[offset + index] = UInt8(truncatingIfNeeded: value >> (56 - 8 * index)) }
    }

    package static func get32(_ bytes: [UInt8], at offset: Int) -> UInt32 {
        var value: UInt32 = 0
        for index in 0..<4 { value = value << 8 | UInt32(bytes[offset + index]) }
        return value
    }

    package static func get64(_ bytes: [UInt8], at offset: Int) -> UInt64 {
        var value: UInt64 = 0
        for index in 0..<8 { value = value << 8 | UInt64(bytes[offset + index]) }
        return value
    }

    /// A table of 64-bit entries as bytes.
    package static func encodeTable(_ entries: [UInt64]) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: entries.count * 8)
        for (index, entry) in entries.enumerated() where entry != 0 {
            put64(entry, into: &bytes, at: index * 8)
        }
        return bytes
    }

    /// Bytes as a table of 64-bit entries.
    package static func decodeTable(_ bytes: [UInt8]) -> [UInt64] {
        (0..<(bytes.count / 8)).map { get64(bytes, at: $0 * 8) }
    }
}
