import BlockStorage
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A writable disk on top of a read-only ``ChainImage``: writes go to a sparse overlay
/// file beside the chain, never into the backup files, and reads take the overlay where
/// it was written and the chain elsewhere.
///
/// Why a raw sparse file with a granule map (not a qcow2 overlay): the overlay's offsets
/// are the disk's, so it is written with plain positioned I/O, its bitmaps and page cache
/// work as for any raw image, and what it holds is one bit per granule. A write that
/// covers part of a granule not yet in the overlay first copies the chain's granule in
/// (under one lock, so two writes to a new granule cannot copy over each other), then
/// marks it. FLUSH makes the data durable and then the map (``OverlayMap``): after a crash
/// every flushed write is read back, and a granule written after the last FLUSH reads as
/// the chain again (its map bit was never saved), which is what an unflushed write may do.
public final class ChainOverlay: ImageReader, Sendable {
    /// The unit of the allocation map.
    public static let granule: UInt64 = 64 << 10

    public let chain: ChainImage
    /// The overlay file (the disk's offsets; sparse).
    public let data: RawImage
    public let map: OverlayMap
    private let state: Mutex<State>
    /// Held while a write copies granules in and marks them, and by ``flush()``'s save.
    private let fillLock: Mutex<FillBuffer>
    private let flushLock = Mutex<Void>(())

    private struct State: Sendable {
        var words: [UInt64]
        /// Bits changed since the last saved map.
        var changed = false
    }

    /// One granule of scratch for copying the chain in, reused under ``fillLock``.
    private final class FillBuffer: @unchecked Sendable {
        let bytes = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(ChainOverlay.granule), alignment: 4096)
        deinit { bytes.deallocate() }
    }

    /// Opens (or creates) the overlay at `dataPath` with its map at `dataPath.map`.
    /// - Parameter identity: names the chain point; a map saved for another is refused.
    public convenience init(chain: ChainImage, dataPath: String, identity: String) throws(StorageError) {
        try self.init(chain: chain, dataPath: dataPath, mapPath: dataPath + ".map", identity: identity, allowLarger: false)
    }

    /// Opens `dataPath` (created sparse if missing) with its map at `mapPath`. With
    /// `allowLarger`, the data may be larger than the disk (a live restore's target device);
    /// it may never be smaller.
    public init(chain: ChainImage, dataPath: String, mapPath: String, identity: String, allowLarger: Bool) throws(StorageError) {
        self.chain = chain
        let created = try RawImage.createSparseFileIfMissing(path: dataPath, size: chain.size)
        let data = try RawImage(path: dataPath, readOnly: false)
        guard data.size == chain.size || (allowLarger && data.size > chain.size) else {
            throw StorageError.damagedImage(
                path: dataPath,
                reason: "it is \(data.size) bytes but the chain's disk is \(chain.size) bytes"
                    + (data.size < chain.size ? ": too small to hold it" : ""))
        }
        self.data = data
        map = OverlayMap(path: mapPath, identity: identity, diskSize: chain.size, granule: Self.granule)
        // A map left from a data file that is gone would claim granules the new file does
        // not hold: it goes before anything is written.
        if created { try map.remove() }
        let loaded = created ? nil : try map.load()
        state = Mutex(State(words: loaded ?? [UInt64](repeating: 0, count: map.wordCount)))
        fillLock = Mutex(FillBuffer())
    }

    /// Number of granules of the disk.
    public var granuleCount: Int { Int((chain.size + Self.granule - 1) / Self.granule) }

    /// Copies the chain into the overlay where it holds nothing yet: the next run of
    /// granules not in the overlay at or after `cursor`, at most `buffer.count` bytes,
    /// read from the chain (or zeroed where the chain reads as zeroes) and marked.
    /// Returns the bytes of the disk now covered, 0 when every granule is in the overlay.
    ///
    /// The live restore's copier: client writes mark their granules first and are skipped;
    /// the copy holds the fill lock, so it never overwrites a client's write.
    public func copyNext(cursor: inout Int, buffer: UnsafeMutableRawBufferPointer) throws(StorageError) -> UInt64 {
        let maximum = max(1, buffer.count / Int(Self.granule))
        let count = granuleCount
        return try fillLock.withLock { (_: inout FillBuffer) throws(StorageError) -> UInt64 in
            let (first, last) = state.withLock { state -> (Int, Int) in
                var index = cursor
                while index < count {
                    let word = state.words[index >> 6]
                    if word == .max && index & 63 == 0 {
                        index += 64
                        continue
                    }
                    if !Self.isSet(state.words, index) { break }
                    index += 1
                }
                var end = index
                while end < count, end - index < maximum, !Self.isSet(state.words, end) { end += 1 }
                return (index, end)
            }
            guard first < count else {
                cursor = count
                return 0
            }
            let start = UInt64(first) * Self.granule
            let end = min(size, UInt64(last) * Self.granule)
            let extents = chain.allocationExtents(at: start, length: end - start, maxExtents: 1)
            if let only = extents.first, only.isZero, only.length == end - start {
                try data.writeZeroes(at: start, length: end - start, allowHole: true, fastOnly: false)
            } else {
                let piece = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<Int(end - start)])
                try chain.read(into: piece, at: start)
                try data.write(UnsafeRawBufferPointer(piece), at: start)
            }
            mark(first...(last - 1))
            cursor = last
            return end - start
        }
    }

    public var size: UInt64 { chain.size }

    // MARK: - Map

    private func granules(_ offset: UInt64, _ length: UInt64) -> ClosedRange<Int> {
        Int(offset / Self.granule)...Int((offset + length - 1) / Self.granule)
    }

    private static func isSet(_ words: [UInt64], _ index: Int) -> Bool {
        words[index >> 6] & (1 << UInt64(index & 63)) != 0
    }

    /// True when every granule of the range is in the overlay.
    private func allWritten(_ range: ClosedRange<Int>) -> Bool {
        state.withLock { state in range.allSatisfy { Self.isSet(state.words, $0) } }
    }

    private func mark(_ range: ClosedRange<Int>) {
        state.withLock { state in
            for index in range { state.words[index >> 6] |= 1 << UInt64(index & 63) }
            state.changed = true
        }
    }

    /// Number of granules in the overlay (tests, status).
    public var writtenGranules: Int {
        state.withLock { $0.words.reduce(0) { $0 + $1.nonzeroBitCount } }
    }

    /// Calls `body(inOverlay, position, length)` for each run of `[offset, end)` whose
    /// granules are all in the overlay or all not.
    private func forEachRun(
        _ offset: UInt64, _ end: UInt64, _ body: (Bool, UInt64, UInt64) throws(StorageError) -> Bool
    ) throws(StorageError) {
        var position = offset
        while position < end {
            let (inOverlay, runEnd) = state.withLock { state -> (Bool, UInt64) in
                var granule = Int(position / Self.granule)
                let first = Self.isSet(state.words, granule)
                var runEnd = min(end, UInt64(granule + 1) * Self.granule)
                while runEnd < end {
                    granule += 1
                    guard Self.isSet(state.words, granule) == first else { break }
                    runEnd = min(end, UInt64(granule + 1) * Self.granule)
                }
                return (first, runEnd)
            }
            guard try body(inOverlay, position, runEnd - position) else { return }
            position = runEnd
        }
    }

    // MARK: - ImageReader

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(StorageError) {
        guard let base = buffer.baseAddress else { return }
        try StorageError.checkRange(offset: offset, length: UInt64(buffer.count), size: size)
        try forEachRun(offset, offset + UInt64(buffer.count)) { (inOverlay, position, length) throws(StorageError) in
            let target = UnsafeMutableRawBufferPointer(start: base + Int(position - offset), count: Int(length))
            if inOverlay {
                try data.read(into: target, at: position)
            } else {
                try chain.read(into: target, at: position)
            }
            return true
        }
    }

    public func readIfCached(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Bool {
        guard let base = buffer.baseAddress else { return true }
        guard (try? StorageError.checkRange(offset: offset, length: UInt64(buffer.count), size: size)) != nil else { return false }
        var complete = true
        try? forEachRun(offset, offset + UInt64(buffer.count)) { (inOverlay, position, length) throws(StorageError) in
            let target = UnsafeMutableRawBufferPointer(start: base + Int(position - offset), count: Int(length))
            complete = inOverlay ? data.readIfCached(into: target, at: position) : chain.readIfCached(into: target, at: position)
            return complete
        }
        return complete
    }

    /// The chain's map where the overlay holds nothing, data where it does.
    public func allocationExtents(at offset: UInt64, length: UInt64, maxExtents: Int) -> [AllocationExtent] {
        let (sum, overflow) = offset.addingReportingOverflow(length)
        let end = overflow ? size : min(sum, size)
        guard offset < end else { return [] }
        var extents: [AllocationExtent] = []
        func append(_ extent: AllocationExtent) -> Bool {
            if let last = extents.last, last.isHole == extent.isHole, last.isZero == extent.isZero {
                extents[extents.count - 1].length += extent.length
                return true
            }
            guard extents.count < maxExtents else { return false }
            extents.append(extent)
            return true
        }
        try? forEachRun(offset, end) { (inOverlay, position, runLength) throws(StorageError) in
            if inOverlay { return append(AllocationExtent(length: runLength, isHole: false, isZero: false)) }
            for extent in chain.allocationExtents(at: position, length: runLength, maxExtents: maxExtents) {
                guard append(extent) else { return false }
            }
            return true
        }
        return extents
    }

    public func prefetch(at offset: UInt64, length: UInt64) {
        let (sum, overflow) = offset.addingReportingOverflow(length)
        let end = overflow ? size : min(sum, size)
        guard offset < end else { return }
        try? forEachRun(offset, end) { (inOverlay, position, runLength) throws(StorageError) in
            if inOverlay { data.prefetch(at: position, length: runLength) } else { chain.prefetch(at: position, length: runLength) }
            return true
        }
    }

    // MARK: - Writes

    /// Writes `bytes` at `offset` into the overlay.
    public func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws(StorageError) {
        guard !bytes.isEmpty else { return }
        try modify(offset: offset, length: UInt64(bytes.count), fastOnly: false) { () throws(StorageError) in
            try data.write(bytes, at: offset)
        }
    }

    /// Makes `[offset, offset+length)` read as zeroes (holes in the overlay where whole
    /// granules are covered). With `fastOnly`, refuses (`.notSupported`) when part of a
    /// granule would first have to be copied from the chain.
    public func writeZeroes(at offset: UInt64, length: UInt64, fastOnly: Bool) throws(StorageError) {
        guard length > 0 else { return }
        try modify(offset: offset, length: length, fastOnly: fastOnly) { () throws(StorageError) in
            try data.writeZeroes(at: offset, length: length, allowHole: true, fastOnly: false)
        }
    }

    private func modify(
        offset: UInt64, length: UInt64, fastOnly: Bool, _ change: () throws(StorageError) -> Void
    ) throws(StorageError) {
        try StorageError.checkRange(offset: offset, length: length, size: size)
        let range = granules(offset, length)
        if allWritten(range) {
            try change()
            return
        }
        let end = offset + length
        try fillLock.withLock { (scratch: inout FillBuffer) throws(StorageError) in
            for granule in Set([range.lowerBound, range.upperBound]) {
                let start = UInt64(granule) * Self.granule
                let granuleEnd = min(size, start + Self.granule)
                let covered = offset <= start && end >= granuleEnd
                if covered || allWritten(granule...granule) { continue }
                if fastOnly { throw StorageError.notSupported(operation: "fast zeroing of part of a granule of a backup") }
                // The whole granule must come from the chain (even where the chain reads as
                // zeroes: the overlay file may hold an unflushed write from before a crash).
                let piece = UnsafeMutableRawBufferPointer(rebasing: scratch.bytes[0..<Int(granuleEnd - start)])
                try chain.read(into: piece, at: start)
                try data.write(UnsafeRawBufferPointer(piece), at: start)
            }
            try change()
            mark(range)
        }
    }

    /// Makes every write so far durable: the overlay's data, then its map.
    public func flush() throws(StorageError) {
        try flushLock.withLock { (_: inout Void) throws(StorageError) in
            let snapshot = state.withLock { state -> [UInt64]? in
                guard state.changed else { return nil }
                state.changed = false
                return state.words
            }
            do throws(StorageError) {
                try data.flush()
                if let snapshot { try map.save(snapshot) }
            } catch {
                if snapshot != nil { state.withLock { $0.changed = true } }
                throw error
            }
        }
    }
}
