import Foundation
import Testing
@testable import TidemarkBackup

/// Damaged qcow2 files found by the FuzzQcow2 harness (Fuzz/, README "Fuzzing"): each is
/// refused with `invalidImage`, where before it trapped or allocated what the file could not
/// justify.
@Suite("Fuzz regressions: qcow2 reader")
struct Qcow2FuzzRegressionTests {
    /// A version 3 header (no backing file, 16-bit refcounts) in a `count`-byte file.
    static func image(
        clusterBits: UInt32 = 12, virtualSize: UInt64, l1Size: UInt32, l1Offset: UInt64, count: Int = 4096
    ) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        BigEndian.put32(0x5146_49FB, into: &bytes, at: 0)
        BigEndian.put32(3, into: &bytes, at: 4)
        BigEndian.put32(clusterBits, into: &bytes, at: 20)
        BigEndian.put64(virtualSize, into: &bytes, at: 24)
        BigEndian.put32(l1Size, into: &bytes, at: 36)
        BigEndian.put64(l1Offset, into: &bytes, at: 40)
        BigEndian.put32(4, into: &bytes, at: 96)
        BigEndian.put32(104, into: &bytes, at: 100)
        return bytes
    }

    static func write(_ bytes: [UInt8]) throws -> (directory: String, path: String) {
        let directory = FileManager.default.temporaryDirectory
            .appendingPathComponent("tidemark-qcow2-fuzz-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let path = directory + "/" + BackupDirectory.imageName(index: 0)
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        return (directory, path)
    }

    static func isInvalidImage(_ error: BackupError) -> Bool {
        if case .invalidImage = error { return true }
        return false
    }

    @Test("a virtual size near 2^64 is refused instead of overflowing the L1 size check")
    func hugeVirtualSize() throws {
        let (directory, path) = try Self.write(Self.image(virtualSize: UInt64.max, l1Size: 1, l1Offset: 4096, count: 8192))
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let error = #expect(throws: BackupError.self) { try Qcow2Image(path: path) }
        #expect(error.map(Self.isInvalidImage) == true)
    }

    @Test("an L1 offset beyond off_t is refused instead of trapping in pread")
    func l1OffsetBeyondOffT() throws {
        let (directory, path) = try Self.write(Self.image(virtualSize: 1 << 20, l1Size: 1, l1Offset: 1 << 63))
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let error = #expect(throws: BackupError.self) { try Qcow2Image(path: path) }
        #expect(error.map(Self.isInvalidImage) == true)
    }

    @Test("an L1 table of 2^25 entries outside a 4 KiB file is refused before 256 MiB is allocated")
    func l1TableOutsideTheFile() throws {
        let (directory, path) = try Self.write(Self.image(virtualSize: 1 << 20, l1Size: 1 << 25, l1Offset: 4096))
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let error = #expect(throws: BackupError.self) { try Qcow2Image(path: path) }
        #expect(error.map(Self.isInvalidImage) == true)
    }

    @Test("unaligned L2 tables and data clusters are refused, aligned ones still read")
    func unalignedTables() throws {
        // 4 KiB clusters: header, L1 at 4096, L2 at 8192; guest clusters 0 and 1.
        var bytes = Self.image(virtualSize: 8192, l1Size: 1, l1Offset: 4096, count: 12288)
        BigEndian.put64(8192 + 512, into: &bytes, at: 4096)  // unaligned L2
        let (directory, path) = try Self.write(bytes)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let unalignedL2 = try Qcow2Image(path: path)
        let error = #expect(throws: BackupError.self) { try unalignedL2.clusterState(0) }
        #expect(error.map(Self.isInvalidImage) == true)

        BigEndian.put64(8192, into: &bytes, at: 4096)
        BigEndian.put64(4096 + 512, into: &bytes, at: 8192)  // cluster 0: unaligned data
        BigEndian.put64(4096, into: &bytes, at: 8192 + 8)  // cluster 1: aligned data
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        let image = try Qcow2Image(path: path)
        let dataError = #expect(throws: BackupError.self) { try image.clusterState(0) }
        #expect(dataError.map(Self.isInvalidImage) == true)
        #expect(try image.clusterState(1) == .data(hostOffset: 4096))
    }

    @Test("a chain read whose end passes UInt64.max is refused instead of overflowing")
    func readPastUInt64Max() throws {
        let (directory, _) = try Self.write(Self.image(virtualSize: 8192, l1Size: 1, l1Offset: 4096, count: 8192))
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let manifest = BackupManifest(
            index: 0, file: BackupDirectory.imageName(index: 0), kind: .full, bitmap: nil, checkpoint: nil,
            created: "", virtualSize: 8192, source: "test", backingFile: nil, bytesCopied: 0, bytesZeroed: 0,
            extents: [])
        let reader = try ChainReader(directory: BackupDirectory(path: directory), chain: [manifest], point: 0)
        #expect(try reader.read(count: 8192, at: 0) == [UInt8](repeating: 0, count: 8192))
        #expect(throws: BackupError.self) { try reader.read(count: 16, at: UInt64.max - 8) }
    }
}
