/// One L2 table's span of a chain, merged through every layer: per cluster, a hole, a
/// zero cluster, or data in one layer at one host offset, packed in one `UInt64`.
///
/// Layout: bits 0–1 the kind, bits 9–55 the host offset (cluster-aligned, as in qcow2),
/// bits 56–63 the layer. Consecutive data clusters of one layer at consecutive host
/// offsets differ by exactly the cluster size, which lets ``ChainImage`` find contiguous
/// runs with one comparison per cluster.
final class ResolvedTable: Sendable {
    let entries: [UInt64]

    init(entries: [UInt64]) {
        self.entries = entries
    }

    static let kindMask: UInt64 = 0b11
    static let holeKind: UInt64 = 0
    static let zeroKind: UInt64 = 1
    static let dataKind: UInt64 = 2
    static let hole: UInt64 = holeKind
    static let zero: UInt64 = zeroKind

    static func data(layer: Int, hostOffset: UInt64) -> UInt64 {
        UInt64(layer) << 56 | (hostOffset & Qcow2Format.offsetMask) | dataKind
    }

    static func layer(of entry: UInt64) -> Int { Int(entry >> 56) }
    static func hostOffset(of entry: UInt64) -> UInt64 { entry & Qcow2Format.offsetMask }
}
