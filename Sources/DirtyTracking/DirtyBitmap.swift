/// One bit per granule of an image: set when anything in the granule may have changed.
///
/// Leaf words hold the bits; a summary level keeps one bit per leaf word that is non-zero,
/// so scans skip clean regions 4096 granules at a time without reading them (at 64 KiB
/// granularity a 1 TiB image has 256 Ki leaf words and only 4 Ki summary words). The type
/// is a value, but it is meant to be mutated in place (inside a lock, through `inout`):
/// copying it on the write path would copy megabytes.
public struct DirtyBitmap: Sendable, Equatable {
    /// Bytes covered by one bit (a power of two).
    public let granularity: UInt64
    /// Bytes covered by the whole bitmap: the image size.
    public let size: UInt64
    /// Number of granules; the last one may be partial.
    public let granuleCount: Int
    private let granularityShift: UInt64
    private(set) var words: [UInt64]
    private var summary: [UInt64]
    /// Number of dirty granules, kept up to date by every mutation.
    public private(set) var dirtyGranules: Int

    /// - Parameters:
    ///   - size: image size in bytes.
    ///   - granularity: bytes per bit; must be a power of two.
    public init(size: UInt64, granularity: UInt64) {
        precondition(granularity > 0 && granularity & (granularity - 1) == 0, "granularity must be a power of two")
        self.granularity = granularity
        self.size = size
        self.granularityShift = UInt64(granularity.trailingZeroBitCount)
        self.granuleCount = Int((size + granularity - 1) >> UInt64(granularity.trailingZeroBitCount))
        let wordCount = (granuleCount + 63) / 64
        self.words = [UInt64](repeating: 0, count: wordCount)
        self.summary = [UInt64](repeating: 0, count: (wordCount + 63) / 64)
        self.dirtyGranules = 0
    }

    /// Rebuilds a bitmap from stored leaf words (as `leafWords` gave them).
    /// - Returns: nil when the word count does not match the size and granularity.
    public init?(size: UInt64, granularity: UInt64, leafWords: [UInt64]) {
        self.init(size: size, granularity: granularity)
        guard leafWords.count == words.count else { return nil }
        words = leafWords
        // Bits past the last granule must stay clear.
        if let last = words.indices.last, granuleCount % 64 != 0 {
            words[last] &= (UInt64(1) << UInt64(granuleCount % 64)) - 1
        }
        var count = 0
        for (index, word) in words.enumerated() where word != 0 {
            summary[index >> 6] |= UInt64(1) << UInt64(index & 63)
            count += word.nonzeroBitCount
        }
        dirtyGranules = count
    }

    /// The leaf words, for persistence.
    public var leafWords: [UInt64] { words }

    /// Dirty bytes as QEMU counts them: whole granules, the partial last one included.
    public var dirtyBytes: UInt64 { UInt64(dirtyGranules) << granularityShift }

    /// True when no granule is dirty.
    public var isClean: Bool { dirtyGranules == 0 }

    // MARK: - Mutation

    /// Marks every granule that `[offset, offset+length)` touches (rounded outward).
    public mutating func markDirty(offset: UInt64, length: UInt64) {
        guard length > 0, offset < size else { return }
        let end = Self.clippedEnd(offset: offset, length: length, size: size)
        let first = Int(offset >> granularityShift)
        let last = Int((end - 1) >> granularityShift)
        setBits(first...last)
    }

    /// Marks the granules `range` dirty.
    public mutating func setBits(_ range: ClosedRange<Int>) {
        let lower = max(range.lowerBound, 0)
        let upper = min(range.upperBound, granuleCount - 1)
        guard lower <= upper else { return }
        var wordIndex = lower >> 6
        let lastWord = upper >> 6
        while wordIndex <= lastWord {
            let low = wordIndex == lower >> 6 ? lower & 63 : 0
            let high = wordIndex == lastWord ? upper & 63 : 63
            let mask = Self.mask(low: low, high: high)
            let old = words[wordIndex]
            let new = old | mask
            if new != old {
                words[wordIndex] = new
                dirtyGranules += (new ^ old).nonzeroBitCount
                summary[wordIndex >> 6] |= UInt64(1) << UInt64(wordIndex & 63)
            }
            wordIndex += 1
        }
    }

    /// Clears every bit.
    public mutating func clearAll() {
        for index in summaryIndicesOfDirtyWords() { words[index] = 0 }
        for index in summary.indices { summary[index] = 0 }
        dirtyGranules = 0
    }

    /// ORs `other` into this bitmap. Equal granularities OR word by word; different ones
    /// mark every granule of this bitmap that a dirty range of `other` touches, so coarse
    /// into fine dirties every fine bit and fine into coarse the whole coarse granule.
    /// - Precondition: both cover the same size.
    public mutating func merge(_ other: DirtyBitmap) {
        precondition(other.size == size, "merged bitmaps must cover the same size")
        if other.granularity == granularity {
            for index in other.summaryIndicesOfDirtyWords() {
                let old = words[index]
                let new = old | other.words[index]
                guard new != old else { continue }
                words[index] = new
                dirtyGranules += (new ^ old).nonzeroBitCount
                summary[index >> 6] |= UInt64(1) << UInt64(index & 63)
            }
            return
        }
        other.forEachDirtyRun(offset: 0, length: other.size) { start, length in
            markDirty(offset: start, length: length)
            return true
        }
    }

    // MARK: - Queries

    /// True when granule `index` is dirty.
    public func isDirty(granule index: Int) -> Bool {
        guard index >= 0, index < granuleCount else { return false }
        return words[index >> 6] & (UInt64(1) << UInt64(index & 63)) != 0
    }

    /// The first dirty granule at or after `index`, skipping clean words via the summary.
    public func nextDirty(from index: Int) -> Int? {
        guard index < granuleCount else { return nil }
        var wordIndex = max(index, 0) >> 6
        let masked = words[wordIndex] & ~Self.belowMask(max(index, 0) & 63)
        if masked != 0 { return wordIndex * 64 + masked.trailingZeroBitCount }
        wordIndex += 1
        guard wordIndex < words.count else { return nil }
        var summaryIndex = wordIndex >> 6
        var summaryWord = summary[summaryIndex] & ~Self.belowMask(wordIndex & 63)
        while summaryWord == 0 {
            summaryIndex += 1
            guard summaryIndex < summary.count else { return nil }
            summaryWord = summary[summaryIndex]
        }
        let found = summaryIndex * 64 + summaryWord.trailingZeroBitCount
        return found * 64 + words[found].trailingZeroBitCount
    }

    /// The first clean granule at or after `index`, or `granuleCount` if none.
    public func nextClean(from index: Int) -> Int {
        guard index < granuleCount else { return granuleCount }
        var wordIndex = max(index, 0) >> 6
        var inverted = ~words[wordIndex] & ~Self.belowMask(max(index, 0) & 63)
        while inverted == 0 {
            wordIndex += 1
            guard wordIndex < words.count else { return granuleCount }
            // A word absent from the summary is all clean.
            if summary[wordIndex >> 6] & (UInt64(1) << UInt64(wordIndex & 63)) == 0 { return wordIndex * 64 }
            inverted = ~words[wordIndex]
        }
        return min(wordIndex * 64 + inverted.trailingZeroBitCount, granuleCount)
    }

    /// Calls `body(offset, length)` for each maximal dirty byte range overlapping
    /// `[offset, offset+length)`, clipped to it, in order, until `body` returns false.
    public func forEachDirtyRun(offset: UInt64, length: UInt64, _ body: (UInt64, UInt64) -> Bool) {
        let end = Self.clippedEnd(offset: offset, length: length, size: size)
        guard offset < end else { return }
        var granule = Int(offset >> granularityShift)
        while let start = nextDirty(from: granule) {
            let startByte = max(UInt64(start) << granularityShift, offset)
            guard startByte < end else { return }
            let stop = nextClean(from: start)
            let stopByte = min(UInt64(stop) << granularityShift, end)
            guard body(startByte, stopByte - startByte) else { return }
            granule = stop
        }
    }

    // MARK: - Helpers

    /// `min(size, offset + length)` without overflowing.
    static func clippedEnd(offset: UInt64, length: UInt64, size: UInt64) -> UInt64 {
        let (end, overflow) = offset.addingReportingOverflow(length)
        return overflow ? size : min(size, end)
    }

    private func summaryIndicesOfDirtyWords() -> [Int] {
        var result: [Int] = []
        for (summaryIndex, summaryWord) in summary.enumerated() where summaryWord != 0 {
            var bits = summaryWord
            while bits != 0 {
                result.append(summaryIndex * 64 + bits.trailingZeroBitCount)
                bits &= bits - 1
            }
        }
        return result
    }

    /// Bits `low...high` set.
    private static func mask(low: Int, high: Int) -> UInt64 {
        let upper: UInt64 = high == 63 ? ~0 : (UInt64(1) << UInt64(high + 1)) - 1
        return upper & ~belowMask(low)
    }

    /// Bits below `bit` set.
    private static func belowMask(_ bit: Int) -> UInt64 {
        bit == 0 ? 0 : (UInt64(1) << UInt64(bit)) - 1
    }
}
