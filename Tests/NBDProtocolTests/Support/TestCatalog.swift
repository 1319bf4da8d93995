import NBDProtocol

/// A small in-memory export catalog for driving the handshake.
///
/// - "disk": 1 GiB, writable, minimum block 512, `base:allocation` and one bitmap.
/// - "ro": 1000 bytes, read-only, byte-granular (minimum block 1), no description.
/// - "bitmaps": 64 MiB, writable, several qemu contexts (for wildcard tests).
struct TestCatalog: NBDExportCatalog {
    var exports: [NBDExportSummary]

    func exportSummaries() -> [NBDExportSummary] { exports }

    func exportSummary(named name: String) -> NBDExportSummary? {
        if name.isEmpty { return exports.first }
        return exports.first { $0.name == name }
    }

    static let disk = NBDExportSummary(
        name: "disk", description: "the main disk", size: 1 << 30, isReadOnly: false,
        minimumBlockSize: 512, metaContexts: ["base:allocation", "qemu:dirty-bitmap:b0"])

    static let readOnly = NBDExportSummary(
        name: "ro", description: "", size: 1000, isReadOnly: true,
        minimumBlockSize: 1, metaContexts: ["base:allocation"])

    static let bitmaps = NBDExportSummary(
        name: "bitmaps", description: "many contexts", size: 64 << 20, isReadOnly: false,
        minimumBlockSize: 512,
        metaContexts: [
            "base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1",
        ])

    static let standard = TestCatalog(exports: [disk, readOnly, bitmaps])
}

/// Transmission flags spelled out as the wire values the tests expect.
enum ExpectedFlags {
    /// HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_CACHE | CAN_MULTI_CONN.
    static let base: UInt16 = 0x0001 | 0x0004 | 0x0008 | 0x0400 | 0x0100
    /// base | SEND_TRIM | SEND_WRITE_ZEROES | SEND_FAST_ZERO.
    static let writable: UInt16 = base | 0x0020 | 0x0040 | 0x0800
    /// base | READ_ONLY.
    static let readOnly: UInt16 = base | 0x0002
    /// SEND_DF, only once structured replies are negotiated.
    static let sendDF: UInt16 = 0x0080
}
