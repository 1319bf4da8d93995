#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Reads one qcow2 file: its header, backing file name and the state of each guest
/// cluster.
///
/// Why our own reader: restore and verify must work where QEMU is not installed and must
/// look at the chain exactly as Tidemark wrote it (zero clusters, backing names). It
/// reads the profile ``Qcow2Writer`` writes, and qcow2 v2/v3 files with any cluster size
/// that use no compressed clusters, encryption, external data file or extended L2
/// entries; it refuses those with ``BackupError/unsupportedImageFeature(path:feature:)``.
public final class Qcow2Image {
    /// What a guest cluster holds in this file alone (the backing chain is the caller's).
    public enum ClusterState: Equatable, Sendable {
        /// Not in this file: read it from the backing file (or as zeroes without one).
        case unallocated
        /// Reads as zeroes.
        case zero
        /// Stored at this host offset.
        case data(hostOffset: UInt64)
    }

    public let path: String
    public let virtualSize: UInt64
    public let clusterSize: UInt64
    /// The backing file name as stored (relative to this file's directory), if any.
    public let backingFile: String?
    /// The backing format from the header extension, if any.
    public let backingFormat: String?
    private let file: BackupFile
    /// The file's length when opened: tables must lie inside it.
    public let fileLength: UInt64
    private let l1: [UInt64]
    private let version: UInt32
    private var l2Cache: [UInt64: [UInt64]] = [:]

    public init(path: String) throws(BackupError) {
        self.path = path
        file = try BackupFile(path: path, flags: O_RDONLY)
        fileLength = try file.length()
        let header = try file.read(count: 4096, at: 0)
        guard BigEndian.get32(header, at: 0) == Qcow2Format.magic else {
            throw BackupError.invalidImage(path: path, reason: "no qcow2 magic (an unfinished or foreign file?)")
        }
        version = BigEndian.get32(header, at: 4)
        guard version == 2 || version == 3 else {
            throw BackupError.invalidImage(path: path, reason: "qcow2 version \(version)")
        }
        let clusterBits = BigEndian.get32(header, at: 20)
        guard (9...21).contains(clusterBits) else {
            throw BackupError.invalidImage(path: path, reason: "cluster_bits \(clusterBits)")
        }
        clusterSize = 1 << UInt64(clusterBits)
        virtualSize = BigEndian.get64(header, at: 24)
        if BigEndian.get32(header, at: 32) != 0 {
            throw BackupError.unsupportedImageFeature(path: path, feature: "encryption")
        }
        let l1Size = UInt64(BigEndian.get32(header, at: 36))
        let l1Offset = BigEndian.get64(header, at: 40)
        // QEMU's own bound (QCOW_MAX_IMAGE_SIZE is 2^55 in practice): it keeps every guest
        // offset and cluster count far from overflowing.
        guard virtualSize <= Qcow2Format.maximumVirtualSize else {
            throw BackupError.invalidImage(path: path, reason: "virtual size \(virtualSize) is too large")
        }
        let l2Coverage = clusterSize / 8 * clusterSize
        let l1Needed = virtualSize / l2Coverage + (virtualSize % l2Coverage == 0 ? 0 : 1)
        guard l1Size >= l1Needed, l1Size <= 1 << 25 else {
            throw BackupError.invalidImage(path: path, reason: "L1 table of \(l1Size) entries for \(virtualSize) bytes")
        }
        // The L1 table must be cluster-aligned and inside the file, as QEMU requires: a
        // damaged header must not make the reader allocate 256 MiB for a table that is not there.
        if l1Size > 0 {
            let (l1End, overflow) = l1Offset.addingReportingOverflow(l1Size * 8)
            guard l1Offset % clusterSize == 0, !overflow, l1End <= fileLength else {
                throw BackupError.invalidImage(
                    path: path, reason: "L1 table of \(l1Size) entries at \(l1Offset) is not inside the \(fileLength)-byte file")
            }
        }
        var headerLength: UInt64 = 72
        if version == 3 {
            let incompatible = BigEndian.get64(header, at: 72)
            if incompatible & Qcow2Format.incompatibleExternalData != 0 {
                throw BackupError.unsupportedImageFeature(path: path, feature: "an external data file")
            }
            if incompatible & Qcow2Format.incompatibleExtendedL2 != 0 {
                throw BackupError.unsupportedImageFeature(path: path, feature: "extended L2 entries (subclusters)")
            }
            if incompatible & Qcow2Format.incompatibleCompressionType != 0 {
                throw BackupError.unsupportedImageFeature(path: path, feature: "a non-zlib compression type")
            }
            if incompatible & (Qcow2Format.incompatibleDirty | Qcow2Format.incompatibleCorrupt) != 0 {
                throw BackupError.invalidImage(path: path, reason: "marked dirty or corrupt; run qemu-img check -r all")
            }
            if incompatible & ~UInt64(0x1F) != 0 {
                throw BackupError.unsupportedImageFeature(path: path, feature: "unknown incompatible features 0x\(String(incompatible, radix: 16))")
            }
            headerLength = UInt64(BigEndian.get32(header, at: 100))
            guard headerLength >= 104, headerLength < 4096 - 8 else {
                throw BackupError.invalidImage(path: path, reason: "header length \(headerLength)")
            }
        }
        // Header extensions (version 3 only): find the backing format.
        var format: String?
        if version == 3 {
            var position = Int(Qcow2Format.roundUp(headerLength, 8))
            while position + 8 <= header.count {
                let type = BigEndian.get32(header, at: position)
                let length = Int(BigEndian.get32(header, at: position + 4))
                if type == Qcow2Format.extensionEnd { break }
                guard position + 8 + length <= header.count else {
                    throw BackupError.invalidImage(path: path, reason: "header extension 0x\(String(type, radix: 16)) overruns the header")
                }
                if type == Qcow2Format.extensionBackingFormat {
                    format = String(decoding: header[(position + 8)..<(position + 8 + length)], as: UTF8.self)
                }
                position += 8 + Int(Qcow2Format.roundUp(UInt64(length), 8))
            }
        }
        backingFormat = format
        let backingOffset = BigEndian.get64(header, at: 8)
        let backingLength = Int(BigEndian.get32(header, at: 16))
        if backingOffset != 0 {
            guard backingLength > 0, backingLength <= Qcow2Format.maximumBackingNameLength, backingOffset < clusterSize else {
                throw BackupError.invalidImage(path: path, reason: "backing file name of \(backingLength) bytes at \(backingOffset)")
            }
            let name = try file.read(count: backingLength, at: backingOffset)
            backingFile = String(decoding: name, as: UTF8.self)
        } else {
            backingFile = nil
        }
        if l1Size > 0 {
            l1 = BigEndian.decodeTable(try file.read(count: Int(l1Size * 8), at: l1Offset))
        } else {
            l1 = []
        }
    }

    /// The open descriptor (positioned reads only: the image is shared between threads).
    public var descriptor: Int32 { file.descriptor }

    /// Number of L1 entries.
    public var l1Count: Int { l1.count }

    /// True when L1 entry `l1Index` points to an L2 table.
    public func hasL2Table(l1Index: Int) -> Bool {
        l1Index < l1.count && l1[l1Index] & Qcow2Format.offsetMask != 0
    }

    /// The L2 table of L1 entry `l1Index`, read from the file (not cached), or nil when
    /// the entry maps nothing. The table must be cluster-aligned and inside the file, as
    /// QEMU requires of a sound image.
    public func readL2Table(l1Index: Int) throws(BackupError) -> [UInt64]? {
        guard l1Index < l1.count else { return nil }
        let l2Offset = l1[l1Index] & Qcow2Format.offsetMask
        if l2Offset == 0 { return nil }
        guard l2Offset % clusterSize == 0, l2Offset <= fileLength, clusterSize <= fileLength - l2Offset else {
            throw BackupError.invalidImage(path: path, reason: "L2 table at \(l2Offset) is unaligned or past the end of the file")
        }
        return BigEndian.decodeTable(try file.read(count: Int(clusterSize), at: l2Offset))
    }

    /// What the L2 entry `entry` of guest cluster `cluster` means in this file alone.
    public func decode(entry: UInt64, cluster: UInt64) throws(BackupError) -> ClusterState {
        if entry & Qcow2Format.compressedFlag != 0 {
            throw BackupError.unsupportedImageFeature(path: path, feature: "compressed clusters")
        }
        if version == 3 && entry & Qcow2Format.zeroFlag != 0 { return .zero }
        let host = entry & Qcow2Format.offsetMask
        if host == 0 { return .unallocated }
        guard host % clusterSize == 0 else {
            throw BackupError.invalidImage(path: path, reason: "data cluster at \(host) is not cluster-aligned")
        }
        return .data(hostOffset: host)
    }

    /// The state of guest cluster `index` (in units of ``clusterSize``) in this file.
    public func clusterState(_ index: UInt64) throws(BackupError) -> ClusterState {
        let entriesPerTable = clusterSize / 8
        let l1Index = index / entriesPerTable
        guard l1Index < UInt64(l1.count) else {
            throw BackupError.invalidImage(path: path, reason: "cluster \(index) is past the L1 table")
        }
        let l2Offset = l1[Int(l1Index)] & Qcow2Format.offsetMask
        if l2Offset == 0 { return .unallocated }
        let table: [UInt64]
        if let cached = l2Cache[l2Offset] {
            table = cached
        } else {
            // Aligned and inside the file (checked by readL2Table): the cache then holds at
            // most one table per cluster of the file.
            guard let read = try readL2Table(l1Index: Int(l1Index)) else { return .unallocated }
            table = read
            l2Cache[l2Offset] = table
        }
        return try decode(entry: table[Int(index % entriesPerTable)], cluster: index)
    }

    /// Reads host bytes (the data of a cluster found by ``clusterState(_:)``).
    public func readHost(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(BackupError) {
        try file.read(into: buffer, at: offset)
    }
}
