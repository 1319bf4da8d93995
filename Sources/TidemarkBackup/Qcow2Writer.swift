import CLinuxIO
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Writes one qcow2 file of a backup chain, streaming: data clusters are appended in the
/// order they arrive, metadata (L2 tables, L1 table, refcounts, header) goes in at
/// ``finish()``.
///
/// Why our own writer: a backup must record "this range now reads as zero" without
/// storing zeroes (qcow2 zero clusters), must point at the previous backup as its backing
/// file, and must accept data from several connections at once, in any order; driving
/// `qemu-img` or `qemu-io` per extent would be slow and would need a running QEMU block
/// layer. The format profile is fixed (see ``Qcow2Format``) and `qemu-img check` is
/// clean on every file it produces.
///
/// Layout: cluster 0 holds the header, the backing-format extension and the backing file
/// name; data clusters follow from cluster 1; ``finish()`` appends the L2 tables, the L1
/// table, the refcount table and the refcount blocks. Every cluster of the file is used
/// exactly once, so every refcount is 1 and every L1/L2 entry carries the COPIED flag.
///
/// Thread safety: ``writeData(at:bytes:)`` and ``markZero(at:length:)`` may be called from
/// several threads; cluster allocation and the L2 map are guarded by a mutex, the data
/// itself is written outside it.
public final class Qcow2Writer: Sendable {
    /// Guest clusters and host clusters are both 64 KiB.
    public static let clusterSize = Qcow2Format.clusterSize

    public let path: String
    public let virtualSize: UInt64
    public let backingFile: String?
    private let file: BackupFile
    private let state: Mutex<State>
    /// Host bytes below this offset were waited for and dropped from the page cache. (A
    /// write still running below it, on a descheduled thread, stays cached; the final
    /// fsync covers it.)
    private let droppedBehind = Mutex<UInt64>(0)

    /// How far behind the newest allocation data is waited for and dropped from the page
    /// cache, and in what steps (see ``dropBehind(allocatedEnd:)``).
    static let dropBehindLag: UInt64 = 32 << 20
    static let dropBehindStep: UInt64 = 8 << 20

    private struct State {
        /// Next free host cluster index (cluster 0 is the header).
        var nextHostCluster: UInt64 = 1
        /// L2 tables by L1 index; absent tables are all unallocated.
        var l2Tables: [Int: [UInt64]] = [:]
        var finished = false
    }

    /// Creates (truncating) `path` for a disk of `virtualSize` bytes whose unwritten
    /// clusters read from `backingFile` (a name relative to the file's directory), or as
    /// zeroes when there is none.
    public init(path: String, virtualSize: UInt64, backingFile: String?) throws(BackupError) {
        if let backingFile, backingFile.utf8.count > Qcow2Format.maximumBackingNameLength || backingFile.isEmpty {
            throw BackupError.invalidArgument("backing file name '\(backingFile)' must be 1 to 1023 bytes")
        }
        self.path = path
        self.virtualSize = virtualSize
        self.backingFile = backingFile
        file = try BackupFile(path: path, flags: O_RDWR | O_CREAT | O_TRUNC)
        state = Mutex(State())
        // A header that no tool accepts until `finish` rewrites it: the magic is left
        // zero, so a half-written file is never mistaken for an image.
        try file.write([UInt8](repeating: 0, count: Int(Self.clusterSize)), at: 0)
    }

    /// Stores `bytes` as the data of the guest range starting at the cluster-aligned
    /// `guestOffset`. The range must be whole clusters, except that it may end at the
    /// virtual size. Clusters that are entirely zero are recorded as zero clusters instead
    /// of being stored.
    public func writeData(at guestOffset: UInt64, bytes: UnsafeRawBufferPointer) throws(BackupError) {
        let cluster = Self.clusterSize
        let length = UInt64(bytes.count)
        guard guestOffset % cluster == 0, guestOffset + length <= virtualSize,
            length % cluster == 0 || guestOffset + length == virtualSize
        else {
            throw BackupError.invalidArgument(
                "internal: unaligned qcow2 write of \(length) bytes at \(guestOffset) (size \(virtualSize))")
        }
        guard let base = bytes.baseAddress, length > 0 else { return }
        // Runs of non-zero clusters are stored contiguously with one pwrite each.
        var index: UInt64 = 0
        let clusters = (length + cluster - 1) / cluster
        while index < clusters {
            let runStart = index
            let startsZero = Self.isZero(base, from: index * cluster, length: min(cluster, length - index * cluster))
            index += 1
            while index < clusters,
                Self.isZero(base, from: index * cluster, length: min(cluster, length - index * cluster)) == startsZero
            {
                index += 1
            }
            let runOffset = runStart * cluster
            let runLength = min(index * cluster, length) - runOffset
            if startsZero {
                try markZero(at: guestOffset + runOffset, length: runLength)
                continue
            }
            let hostCluster = try allocate(
                guestCluster: (guestOffset + runOffset) / cluster, count: index - runStart)
            try file.write(
                UnsafeRawBufferPointer(start: base + Int(runOffset), count: Int(runLength)),
                at: hostCluster * cluster)
            // Start its writeback now. Left alone, the kernel writes back only when dirty
            // pages pile up, and the fsync before the rename would wait for most of the
            // backup; this way the disk works while the copy goes on. Advisory: the final
            // fsync reports real errors.
            _ = clinuxio_start_writeback(file.descriptor, hostCluster * cluster, runLength)
            dropBehind(allocatedEnd: hostCluster * cluster + runLength)
        }
    }

    /// Waits for the data written more than ``dropBehindLag`` before the newest allocation
    /// to reach the disk and drops it from the page cache.
    ///
    /// Why: a backup's data is written once and not read again, so keeping it cached only
    /// evicts what the server and the guests use. Waiting also keeps the copy at most the
    /// lag ahead of the disk, so the final fsync has little to do, and page-cache pages
    /// are recycled while still warm instead of being freshly allocated for every byte.
    private func dropBehind(allocatedEnd: UInt64) {
        guard allocatedEnd > Self.dropBehindLag else { return }
        let target = allocatedEnd - Self.dropBehindLag
        let range: (UInt64, UInt64)? = droppedBehind.withLock { dropped in
            guard target >= dropped + Self.dropBehindStep else { return nil }
            defer { dropped = target }
            return (dropped, target - dropped)
        }
        guard let (offset, length) = range else { return }
        _ = clinuxio_drop_written(file.descriptor, off_t(offset), off_t(length))
    }

    /// Records the cluster-aligned guest range as reading zero (qcow2 zero clusters: no
    /// data stored, the backing file is not consulted).
    public func markZero(at guestOffset: UInt64, length: UInt64) throws(BackupError) {
        let cluster = Self.clusterSize
        guard guestOffset % cluster == 0, guestOffset + length <= virtualSize,
            length % cluster == 0 || guestOffset + length == virtualSize
        else {
            throw BackupError.invalidArgument("internal: unaligned zero range of \(length) bytes at \(guestOffset)")
        }
        let first = guestOffset / cluster
        let end = (guestOffset + length + cluster - 1) / cluster
        state.withLock { state in
            for guestCluster in first..<end {
                Self.setEntry(&state, guestCluster: guestCluster, entry: Qcow2Format.zeroFlag)
            }
        }
    }

    /// Reserves `count` consecutive host clusters and maps guest clusters to them.
    private func allocate(guestCluster: UInt64, count: UInt64) throws(BackupError) -> UInt64 {
        let result: UInt64? = state.withLock { state in
            guard !state.finished else { return nil }
            let host = state.nextHostCluster
            state.nextHostCluster += count
            for index in 0..<count {
                let offset = (host + index) * Self.clusterSize
                Self.setEntry(&state, guestCluster: guestCluster + index, entry: offset | Qcow2Format.copiedFlag)
            }
            return host
        }
        guard let result else { throw BackupError.invalidArgument("internal: write after finish") }
        return result
    }

    private static func setEntry(_ state: inout State, guestCluster: UInt64, entry: UInt64) {
        let table = Int(guestCluster / Qcow2Format.l2Entries)
        let slot = Int(guestCluster % Qcow2Format.l2Entries)
        state.l2Tables[table, default: [UInt64](repeating: 0, count: Int(Qcow2Format.l2Entries))][slot] = entry
    }

    /// True when `length` bytes at `offset` are all zero (8 bytes at a time).
    static func isZero(_ base: UnsafeRawPointer, from offset: UInt64, length: UInt64) -> Bool {
        let start = base + Int(offset)
        var index = 0
        let count = Int(length)
        while index + 8 <= count {
            if start.loadUnaligned(fromByteOffset: index, as: UInt64.self) != 0 { return false }
            index += 8
        }
        while index < count {
            if start.load(fromByteOffset: index, as: UInt8.self) != 0 { return false }
            index += 1
        }
        return true
    }

    /// Writes the metadata and the header and makes the file durable. The file is a valid
    /// qcow2 image only after this returns.
    public func finish() throws(BackupError) {
        let cluster = Self.clusterSize
        let (dataEnd, tables) = state.withLock { state -> (UInt64, [Int: [UInt64]]) in
            state.finished = true
            return (state.nextHostCluster, state.l2Tables)
        }
        var next = dataEnd
        // L2 tables.
        let l1Size = Qcow2Format.l1Size(virtualSize: virtualSize)
        var l1 = [UInt64](repeating: 0, count: Int(l1Size))
        for index in tables.keys.sorted() {
            guard let table = tables[index], index < l1.count else { continue }
            try file.write(BigEndian.encodeTable(table), at: next * cluster)
            l1[index] = next * cluster | Qcow2Format.copiedFlag
            next += 1
        }
        // L1 table (at least one cluster, so that its offset is never 0).
        let l1Offset = next * cluster
        let l1Clusters = max(1, Qcow2Format.roundUp(l1Size * 8, cluster) / cluster)
        if !l1.isEmpty { try file.write(BigEndian.encodeTable(l1), at: l1Offset) }
        next += l1Clusters
        // Refcount table and blocks: they count themselves, so find the fixed point.
        let base = next
        var blocks: UInt64 = 1
        var tableClusters: UInt64 = 1
        while true {
            let total = base + tableClusters + blocks
            let neededBlocks = (total + Qcow2Format.refcountsPerBlock - 1) / Qcow2Format.refcountsPerBlock
            let neededTable = max(1, Qcow2Format.roundUp(neededBlocks * 8, cluster) / cluster)
            if neededBlocks == blocks && neededTable == tableClusters { break }
            blocks = neededBlocks
            tableClusters = neededTable
        }
        let totalClusters = base + tableClusters + blocks
        let refcountTableOffset = base * cluster
        var refcountTable = [UInt64](repeating: 0, count: Int(tableClusters * cluster / 8))
        for block in 0..<blocks {
            let blockOffset = (base + tableClusters + block) * cluster
            refcountTable[Int(block)] = blockOffset
            // Every cluster of the file is in use exactly once.
            let first = block * Qcow2Format.refcountsPerBlock
            let covered = min(Qcow2Format.refcountsPerBlock, totalClusters - first)
            var bytes = [UInt8](repeating: 0, count: Int(cluster))
            for index in 0..<Int(covered) { bytes[index * 2 + 1] = 1 }
            try file.write(bytes, at: blockOffset)
        }
        try file.write(BigEndian.encodeTable(refcountTable), at: refcountTableOffset)
        try file.truncate(to: totalClusters * cluster)
        try file.write(
            header(l1Size: l1Size, l1Offset: l1Offset, refcountTableOffset: refcountTableOffset,
                   refcountTableClusters: tableClusters),
            at: 0)
        try file.sync()
        file.close()
    }

    /// The header cluster's meaningful bytes: header, extensions, backing file name.
    private func header(
        l1Size: UInt64, l1Offset: UInt64, refcountTableOffset: UInt64, refcountTableClusters: UInt64
    ) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: Int(Qcow2Format.headerLength))
        BigEndian.put32(Qcow2Format.magic, into: &bytes, at: 0)
        BigEndian.put32(Qcow2Format.version, into: &bytes, at: 4)
        BigEndian.put32(Qcow2Format.clusterBits, into: &bytes, at: 20)
        BigEndian.put64(virtualSize, into: &bytes, at: 24)
        BigEndian.put32(0, into: &bytes, at: 32)  // no encryption
        BigEndian.put32(UInt32(l1Size), into: &bytes, at: 36)
        BigEndian.put64(l1Offset, into: &bytes, at: 40)
        BigEndian.put64(refcountTableOffset, into: &bytes, at: 48)
        BigEndian.put32(UInt32(refcountTableClusters), into: &bytes, at: 56)
        BigEndian.put32(Qcow2Format.refcountOrder, into: &bytes, at: 96)
        BigEndian.put32(Qcow2Format.headerLength, into: &bytes, at: 100)
        if backingFile != nil {
            let format = Array("qcow2".utf8)
            var extensionBytes = [UInt8](repeating: 0, count: 8 + Int(Qcow2Format.roundUp(UInt64(format.count), 8)))
            BigEndian.put32(Qcow2Format.extensionBackingFormat, into: &extensionBytes, at: 0)
            BigEndian.put32(UInt32(format.count), into: &extensionBytes, at: 4)
            extensionBytes.replaceSubrange(8..<(8 + format.count), with: format)
            bytes += extensionBytes
        }
        bytes += [UInt8](repeating: 0, count: 8)  // end of extensions
        if let backingFile {
            let name = Array(backingFile.utf8)
            BigEndian.put64(UInt64(bytes.count), into: &bytes, at: 8)
            BigEndian.put32(UInt32(name.count), into: &bytes, at: 16)
            bytes += name
        }
        return bytes
    }
}
