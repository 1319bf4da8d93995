import BlockStorage
import CLinuxIO
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A point of a qcow2 backing chain served as a disk: reads, page-cache-only reads and
/// the allocation map, for the NBD server.
///
/// Why not ``ChainReader``: serving needs every read to be cheap and safe from many
/// threads at once. Each 512 MiB range of the disk (one L2 table's span) is resolved once
/// through every layer into a ``ResolvedTable`` that says, per cluster, "hole", "zero" or
/// "data in layer L at host offset H"; those tables are cached (the cache holds every
/// table the chain needs up to a memory budget), so a read costs one dictionary lookup and
/// one `pread` per contiguous run, and holes and zero clusters are answered without
/// touching the files. Tables are read from disk lazily and bounds-checked then: a
/// damaged table fails the reads it covers with ``StorageError/damagedImage(path:reason:)``
/// and never yields bytes from outside the files.
public final class ChainImage: ImageReader, @unchecked Sendable {
    // @unchecked: every stored property is immutable after init except `tables`, which
    // sits behind a Mutex; the layers' descriptors are only used with positioned I/O.

    /// Size of the disk in bytes.
    public let size: UInt64
    public let clusterSize: UInt64
    /// The chain's files, bottom (the full backup) first; the last is the point served.
    public let layerPaths: [String]
    private let layers: [Qcow2Image]
    private let descriptors: [Int32]
    private let fileLengths: [UInt64]
    private let entriesPerTable: UInt64
    /// `log2(clusterSize)`.
    private let clusterShift: UInt64
    /// Bit i set when some layer has an L2 table for L1 index i.
    private let mappedRanges: [UInt64]
    private let tableCount: Int
    private let tables: Mutex<[Int: ResolvedTable]>
    private let tableCapacity: Int

    /// Most layers a served chain may have (a resolved entry keeps the layer in 8 bits).
    public static let maximumLayers = 255
    /// Memory the resolved tables may use; a chain needing more evicts and re-resolves.
    public static let tableBudgetBytes = 256 << 20

    /// Opens a chain of already validated images, bottom first (each image's backing file
    /// must be the previous one; the caller checked names and sizes).
    public init(layers: [Qcow2Image]) throws(BackupError) {
        guard let top = layers.last else { throw BackupError.invalidArgument("a chain needs at least one image") }
        guard layers.count <= Self.maximumLayers else {
            throw BackupError.invalidArgument(
                "the chain has \(layers.count) files; at most \(Self.maximumLayers) can be served (restore it, or start a new chain)")
        }
        for image in layers where image.clusterSize != top.clusterSize || image.virtualSize != top.virtualSize {
            throw BackupError.invalidImage(
                path: image.path, reason: "cluster size or virtual size differs from the rest of the chain")
        }
        self.layers = layers
        layerPaths = layers.map(\.path)
        descriptors = layers.map(\.descriptor)
        var lengths: [UInt64] = []
        for image in layers { lengths.append(image.fileLength) }
        fileLengths = lengths
        size = top.virtualSize
        clusterSize = top.clusterSize
        clusterShift = UInt64(top.clusterSize.trailingZeroBitCount)
        entriesPerTable = top.clusterSize / 8
        let span = entriesPerTable * top.clusterSize
        let count = Int((top.virtualSize + span - 1) / span)
        tableCount = count
        var mapped = [UInt64](repeating: 0, count: (count + 63) / 64)
        var mappedCount = 0
        for index in 0..<count {
            if layers.contains(where: { $0.hasL2Table(l1Index: index) }) {
                mapped[index >> 6] |= 1 << UInt64(index & 63)
                mappedCount += 1
            }
        }
        mappedRanges = mapped
        let tableBytes = Int(entriesPerTable) * 8
        tableCapacity = max(1, min(mappedCount, Self.tableBudgetBytes / tableBytes))
        tables = Mutex([:])
    }

    // MARK: - Resolution

    /// What one cluster reads as, from a resolved entry.
    enum Run: Equatable {
        case hole
        case zero
        case data(layer: Int, hostOffset: UInt64)
    }

    @inline(__always)
    private func isMapped(_ table: Int) -> Bool {
        mappedRanges[table >> 6] & (1 << UInt64(table & 63)) != 0
    }

    /// The resolved table for L1 index `index`; nil when no layer maps the range (all
    /// holes). With `cachedOnly`, `.some(nil)` is never returned for an uncached table:
    /// the result is `.uncached` instead.
    private enum Lookup {
        case unmapped
        case table(ResolvedTable)
        case uncached
    }

    private func lookup(table index: Int, cachedOnly: Bool) throws(StorageError) -> Lookup {
        guard isMapped(index) else { return .unmapped }
        if let cached = tables.withLock({ $0[index] }) { return .table(cached) }
        if cachedOnly { return .uncached }
        let resolved = try resolve(table: index)
        tables.withLock { cache in
            if cache.count >= tableCapacity, let victim = cache.keys.first { cache[victim] = nil }
            cache[index] = resolved
        }
        return .table(resolved)
    }

    /// Merges the L2 tables of every layer for one L1 index, bottom to top.
    private func resolve(table index: Int) throws(StorageError) -> ResolvedTable {
        var entries = [UInt64](repeating: ResolvedTable.hole, count: Int(entriesPerTable))
        for (layerIndex, image) in layers.enumerated() {
            let l2: [UInt64]?
            do throws(BackupError) {
                l2 = try image.readL2Table(l1Index: index)
            } catch {
                throw Self.storageError(error)
            }
            guard let l2 else { continue }
            for slot in 0..<entries.count {
                let entry = l2[slot]
                if entry == 0 { continue }
                let state: Qcow2Image.ClusterState
                do throws(BackupError) {
                    state = try image.decode(entry: entry, cluster: UInt64(index) * entriesPerTable + UInt64(slot))
                } catch {
                    throw Self.storageError(error)
                }
                switch state {
                case .unallocated: continue
                case .zero: entries[slot] = ResolvedTable.zero
                case .data(let hostOffset):
                    guard hostOffset < fileLengths[layerIndex] else {
                        throw StorageError.damagedImage(
                            path: image.path, reason: "data cluster at \(hostOffset) is past the end of the file")
                    }
                    entries[slot] = ResolvedTable.data(layer: layerIndex, hostOffset: hostOffset)
                }
            }
        }
        return ResolvedTable(entries: entries)
    }

    static func storageError(_ error: BackupError) -> StorageError {
        switch error {
        case .invalidImage(let path, let reason): return .damagedImage(path: path, reason: reason)
        case .unsupportedImageFeature(let path, let feature):
            return .damagedImage(path: path, reason: "uses \(feature), which the chain reader does not support")
        case .fileSystem(_, let operation, let code): return .ioFailed(operation: operation, errno: code)
        default: return .ioFailed(operation: error.description, errno: EIO)
        }
    }

    /// Calls `body` for each maximal run of `[offset, end)` with one source (data runs are
    /// contiguous in one file). Returns false when `cachedOnly` met an uncached table.
    @inline(__always)
    private func forEachRun(
        from offset: UInt64, to end: UInt64, cachedOnly: Bool,
        _ body: (Run, UInt64, UInt64) throws(StorageError) -> Bool
    ) throws(StorageError) -> Bool {
        var position = offset
        let span = entriesPerTable << clusterShift
        while position < end {
            let tableIndex = Int(position / span)
            let tableEnd = min(end, UInt64(tableIndex + 1) * span)
            let table: ResolvedTable
            switch try lookup(table: tableIndex, cachedOnly: cachedOnly) {
            case .uncached: return false
            case .unmapped:
                guard try body(.hole, position, tableEnd - position) else { return true }
                position = tableEnd
                continue
            case .table(let resolved): table = resolved
            }
            let base = UInt64(tableIndex) * span
            while position < tableEnd {
                let slot = Int((position - base) >> clusterShift)
                let first = table.entries[slot]
                var runEnd = min(tableEnd, base + UInt64(slot + 1) << clusterShift)
                var next = slot + 1
                let firstKind = first & ResolvedTable.kindMask
                var expected = first &+ clusterSize
                while runEnd < tableEnd {
                    let entry = table.entries[next]
                    let continues = firstKind == ResolvedTable.dataKind ? entry == expected : entry == first
                    guard continues else { break }
                    expected = expected &+ clusterSize
                    next += 1
                    runEnd = min(tableEnd, base + UInt64(next) << clusterShift)
                }
                let run: Run
                switch firstKind {
                case ResolvedTable.dataKind:
                    run = .data(layer: ResolvedTable.layer(of: first), hostOffset: ResolvedTable.hostOffset(of: first))
                case ResolvedTable.zeroKind: run = .zero
                default: run = .hole
                }
                guard try body(run, position, runEnd - position) else { return true }
                position = runEnd
            }
        }
        return true
    }

    // MARK: - ImageReader

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(StorageError) {
        _ = try fill(buffer, at: offset, cachedOnly: false)
    }

    public func readIfCached(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Bool {
        (try? fill(buffer, at: offset, cachedOnly: true)) ?? false
    }

    /// Fills `buffer` from the chain: zeroes for holes and zero clusters, the layer's data
    /// elsewhere. `cachedOnly`: tables and data only from memory and the page cache, and
    /// false as soon as something is not there.
    private func fill(
        _ buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, cachedOnly: Bool
    ) throws(StorageError) -> Bool {
        guard let base = buffer.baseAddress else { return true }
        try StorageError.checkRange(offset: offset, length: UInt64(buffer.count), size: size)
        var complete = true
        let finished = try forEachRun(from: offset, to: offset + UInt64(buffer.count), cachedOnly: cachedOnly) {
            (run, position, length) throws(StorageError) in
            let target = base + Int(position - offset)
            switch run {
            case .hole, .zero:
                memset(target, 0, Int(length))
            case .data(let layer, let hostOffset):
                let at = off_t(hostOffset + (position & (clusterSize - 1)))
                if cachedOnly {
                    guard clinuxio_pread_nowait(descriptors[layer], target, Int(length), at) == Int(length) else {
                        complete = false
                        return false
                    }
                } else if clinuxio_pread_full(descriptors[layer], target, Int(length), at) != 0 {
                    throw StorageError.ioFailed(operation: "read \(layerPaths[layer])", errno: errno)
                }
            }
            return true
        }
        return finished && complete
    }

    /// Runs of `[offset, offset+length)`: data (allocated in some layer), zero (a zero
    /// cluster: reads as zeroes, not a hole) and hole (unallocated through every layer).
    /// A table that cannot be read reports the rest as data, the safe answer; its reads fail.
    public func allocationExtents(at offset: UInt64, length: UInt64, maxExtents: Int) -> [AllocationExtent] {
        let (sum, overflow) = offset.addingReportingOverflow(length)
        let end = overflow ? size : min(sum, size)
        guard offset < end else { return [] }
        var extents: [AllocationExtent] = []
        var reached = offset
        _ = try? forEachRun(from: offset, to: end, cachedOnly: false) { (run, position, runLength) throws(StorageError) in
            let extent: AllocationExtent
            switch run {
            case .hole: extent = AllocationExtent(length: runLength, isHole: true, isZero: true)
            case .zero: extent = AllocationExtent(length: runLength, isHole: false, isZero: true)
            case .data: extent = AllocationExtent(length: runLength, isHole: false, isZero: false)
            }
            if let last = extents.last, last.isHole == extent.isHole, last.isZero == extent.isZero {
                extents[extents.count - 1].length += runLength
            } else {
                guard extents.count < maxExtents else { return false }
                extents.append(extent)
            }
            reached = position + runLength
            return true
        }
        if reached < end && extents.count < maxExtents {
            extents.append(AllocationExtent(length: end - reached, isHole: false, isZero: false))
        }
        return extents
    }

    /// Resolves the range's tables and asks the kernel to read its data runs ahead.
    public func prefetch(at offset: UInt64, length: UInt64) {
        let (sum, overflow) = offset.addingReportingOverflow(length)
        let end = overflow ? size : min(sum, size)
        guard offset < end else { return }
        _ = try? forEachRun(from: offset, to: end, cachedOnly: false) { (run, position, runLength) throws(StorageError) in
            if case .data(let layer, let hostOffset) = run {
                let within = position & (clusterSize - 1)
                _ = clinuxio_fadvise_willneed(descriptors[layer], off_t(hostOffset + within), off_t(runLength))
            }
            return true
        }
    }

    /// Where guest cluster `index` comes from (tests and tools).
    func run(ofCluster index: UInt64) throws(StorageError) -> Run {
        var found = Run.hole
        _ = try forEachRun(from: index << clusterShift, to: min(size, (index + 1) << clusterShift), cachedOnly: false) {
            (run, _, _) throws(StorageError) in
            found = run
            return false
        }
        return found
    }

    /// Number of resolved tables in memory (tests).
    var cachedTableCount: Int { tables.withLock { $0.count } }
}
