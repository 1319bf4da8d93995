import DirtyTracking
import Testing
import TestSupport

/// `DirtyBitmap`: the bits, at every boundary of its two levels, and against an oracle.
@Suite("DirtyBitmap")
struct DirtyBitmapTests {
    static let kib: UInt64 = 1024
    static let mib: UInt64 = 1024 * 1024

    // MARK: - Shape

    @Test("granule count rounds the partial last granule up; a fresh bitmap is clean")
    func shape() {
        let exact = DirtyBitmap(size: 10 * 65536, granularity: 65536)
        #expect(exact.granuleCount == 10)
        let partial = DirtyBitmap(size: 10 * 65536 + 1, granularity: 65536)
        #expect(partial.granuleCount == 11)
        #expect(partial.isClean)
        #expect(partial.dirtyGranules == 0)
        #expect(partial.dirtyBytes == 0)
        #expect(partial.nextDirty(from: 0) == nil)
        #expect(partial.nextClean(from: 0) == 0)
        #expect(partial.runs().isEmpty)
        #expect(partial.leafWords.count == 1)
        // 64 granules fill one word exactly; 65 need two.
        #expect(DirtyBitmap(size: 64 * 512, granularity: 512).leafWords.count == 1)
        #expect(DirtyBitmap(size: 65 * 512, granularity: 512).leafWords.count == 2)
    }

    @Test("an empty (0-byte) bitmap ignores marks and reports nothing")
    func emptyBitmap() {
        var bitmap = DirtyBitmap(size: 0, granularity: 65536)
        #expect(bitmap.granuleCount == 0)
        bitmap.markDirty(offset: 0, length: 512)
        bitmap.setBits(0...3)
        #expect(bitmap.isClean)
        #expect(bitmap.nextDirty(from: 0) == nil)
        #expect(bitmap.nextClean(from: 0) == 0)
        #expect(bitmap.runs().isEmpty)
    }

    // MARK: - First and last bit

    @Test("the first bit: byte 0 dirties granule 0 only")
    func firstBit() {
        var bitmap = DirtyBitmap(size: 100 * 512, granularity: 512)
        bitmap.markDirty(offset: 0, length: 1)
        #expect(bitmap.dirtyIndices == [0])
        #expect(bitmap.dirtyGranules == 1)
        #expect(bitmap.dirtyBytes == 512)
        #expect(bitmap.nextDirty(from: 0) == 0)
        #expect(bitmap.nextDirty(from: 1) == nil)
        #expect(bitmap.nextClean(from: 0) == 1)
        #expect(bitmap.runs() == [ByteRun(0, 512)])
    }

    @Test("the last bit: the last byte dirties the last granule; marks at or past the end are ignored")
    func lastBit() {
        let size: UInt64 = 100 * 512
        var bitmap = DirtyBitmap(size: size, granularity: 512)
        bitmap.markDirty(offset: size, length: 4096)
        bitmap.markDirty(offset: size + 512, length: 1)
        bitmap.markDirty(offset: 0, length: 0)
        #expect(bitmap.isClean)
        bitmap.markDirty(offset: size - 1, length: 1)
        #expect(bitmap.dirtyIndices == [99])
        #expect(bitmap.nextDirty(from: 0) == 99)
        #expect(bitmap.nextDirty(from: 99) == 99)
        #expect(bitmap.nextDirty(from: 100) == nil)
        #expect(bitmap.nextClean(from: 99) == 100)
        #expect(bitmap.nextClean(from: 100) == 100)
        #expect(bitmap.runs() == [ByteRun(size - 512, 512)])
        // A length running past the end (even one that would overflow) is clipped.
        var overflow = DirtyBitmap(size: size, granularity: 512)
        overflow.markDirty(offset: size - 1, length: .max)
        #expect(overflow.dirtyIndices == [99])
        overflow.markDirty(offset: 512 * 98, length: 2048)
        #expect(overflow.dirtyIndices == [98, 99])
    }

    @Test("setBits clips a range past either end")
    func setBitsClips() {
        var bitmap = DirtyBitmap(size: 100 * 512, granularity: 512)
        bitmap.setBits(98...500)
        #expect(bitmap.dirtyIndices == [98, 99])
        bitmap.setBits(-5...0)
        #expect(bitmap.dirtyIndices == [0, 98, 99])
        bitmap.setBits(100...200)
        #expect(bitmap.dirtyGranules == 3)
    }

    // MARK: - Word edges

    @Test("single bits at the word edges", arguments: [0, 1, 62, 63, 64, 65, 127, 128, 129, 191, 192])
    func wordEdge(granule: Int) {
        var bitmap = DirtyBitmap(size: 300 * 512, granularity: 512)
        bitmap.setBits(granule...granule)
        #expect(bitmap.dirtyIndices == [granule])
        #expect(bitmap.dirtyGranules == 1)
        #expect(bitmap.nextDirty(from: 0) == granule)
        #expect(bitmap.nextDirty(from: granule) == granule)
        #expect(bitmap.nextDirty(from: granule + 1) == nil)
        #expect(bitmap.nextClean(from: granule) == granule + 1)
        #expect(bitmap.nextClean(from: 0) == (granule == 0 ? 1 : 0))
        #expect(bitmap.runs() == [ByteRun(UInt64(granule) * 512, 512)])
        // Through markDirty, from the granule's last byte.
        var marked = DirtyBitmap(size: 300 * 512, granularity: 512)
        marked.markDirty(offset: UInt64(granule) * 512 + 511, length: 1)
        #expect(marked == bitmap)
    }

    @Test("runs crossing a word edge: 63...64 and 63...65 are one run")
    func runAcrossWordEdge() {
        var bitmap = DirtyBitmap(size: 300 * 512, granularity: 512)
        bitmap.setBits(63...64)
        #expect(bitmap.dirtyGranules == 2)
        #expect(bitmap.nextClean(from: 63) == 65)
        #expect(bitmap.runs() == [ByteRun(63 * 512, 1024)])
        bitmap.setBits(65...65)
        #expect(bitmap.runs() == [ByteRun(63 * 512, 3 * 512)])
        // A byte range from the last byte of granule 63 to the first of 65.
        var marked = DirtyBitmap(size: 300 * 512, granularity: 512)
        marked.markDirty(offset: 64 * 512 - 1, length: 512 + 2)
        #expect(marked == bitmap)
        // Whole words: 64...127 full, neighbours clean.
        var full = DirtyBitmap(size: 300 * 512, granularity: 512)
        full.setBits(64...127)
        #expect(full.nextDirty(from: 0) == 64)
        #expect(full.nextClean(from: 64) == 128)
        #expect(full.nextClean(from: 100) == 128)
        #expect(full.dirtyGranules == 64)
        #expect(full.leafWords == [0, .max, 0, 0, 0])
    }

    // MARK: - Summary edges

    /// 3 summary words' worth of leaf words, plus a few granules.
    static let summarySize: UInt64 = (3 * 4096 + 10) * 512

    @Test("single bits at the summary edges", arguments: [4095, 4096, 4097, 8191, 8192, 3 * 4096 + 9])
    func summaryEdge(granule: Int) {
        var bitmap = DirtyBitmap(size: Self.summarySize, granularity: 512)
        bitmap.setBits(granule...granule)
        #expect(bitmap.dirtyIndices == [granule])
        #expect(bitmap.nextDirty(from: 0) == granule)
        #expect(bitmap.nextDirty(from: granule - 64) == granule)
        #expect(bitmap.nextDirty(from: granule) == granule)
        #expect(bitmap.nextDirty(from: granule + 1) == nil)
        #expect(bitmap.nextClean(from: granule) == granule + 1)
        #expect(bitmap.nextClean(from: granule - 1) == granule - 1)
        #expect(bitmap.runs() == [ByteRun(UInt64(granule) * 512, 512)])
    }

    @Test("a run across a summary edge, and long runs of full words")
    func runAcrossSummaryEdge() {
        var bitmap = DirtyBitmap(size: Self.summarySize, granularity: 512)
        bitmap.setBits(4095...4097)
        #expect(bitmap.nextClean(from: 4095) == 4098)
        #expect(bitmap.runs() == [ByteRun(4095 * 512, 3 * 512)])
        // Two far-apart bits: the scan must skip the clean summary word between them.
        bitmap.setBits(3 * 4096 + 5...3 * 4096 + 5)
        #expect(bitmap.nextDirty(from: 4098) == 3 * 4096 + 5)
        #expect(bitmap.runs().count == 2)
        // Every word dirty from 0 to past the second summary word.
        var full = DirtyBitmap(size: Self.summarySize, granularity: 512)
        full.setBits(0...(8192 + 5))
        #expect(full.nextClean(from: 0) == 8198)
        #expect(full.nextClean(from: 4096) == 8198)
        #expect(full.nextDirty(from: 8198) == nil)
        #expect(full.runs() == [ByteRun(0, 8198 * 512)])
        // Everything dirty: nextClean reports granuleCount.
        var all = DirtyBitmap(size: Self.summarySize, granularity: 512)
        all.setBits(0...Int.max - 1)
        #expect(all.dirtyGranules == all.granuleCount)
        #expect(all.nextClean(from: 0) == all.granuleCount)
        #expect(all.nextClean(from: all.granuleCount - 1) == all.granuleCount)
        #expect(all.runs() == [ByteRun(0, Self.summarySize)])
    }

    // MARK: - Granularity and rounding

    @Test("a partial last granule: marked, counted as a whole granule, reported clipped to the size")
    func partialLastGranule() {
        let size: UInt64 = 10 * 65536 + 100
        var bitmap = DirtyBitmap(size: size, granularity: 65536)
        bitmap.markDirty(offset: 10 * 65536 + 50, length: 10)
        #expect(bitmap.dirtyIndices == [10])
        #expect(bitmap.dirtyBytes == 65536, "QEMU counts whole granules, the partial last one included")
        #expect(bitmap.runs() == [ByteRun(10 * 65536, 100)])
        bitmap.markDirty(offset: 9 * 65536, length: 1)
        #expect(bitmap.runs() == [ByteRun(9 * 65536, 65536 + 100)])
        #expect(bitmap.nextClean(from: 9) == 11)
        var byEnd = DirtyBitmap(size: size, granularity: 65536)
        byEnd.markDirty(offset: size - 1, length: 1000)
        #expect(byEnd.dirtyIndices == [10])
    }

    @Test("markDirty rounds outward: a 512-byte write dirties one whole 64 KiB granule")
    func roundsOutward() {
        var bitmap = DirtyBitmap(size: 16 * Self.mib, granularity: 64 * Self.kib)
        bitmap.markDirty(offset: 2 * Self.mib, length: 512)
        #expect(bitmap.runs() == [ByteRun(2 * Self.mib, 64 * Self.kib)])
        #expect(bitmap.dirtyBytes == 64 * Self.kib)
        // Unaligned on both sides, straddling a granule edge: two granules.
        bitmap.markDirty(offset: 3 * Self.mib - 1, length: 2)
        #expect(bitmap.runs() == [ByteRun(2 * Self.mib, 64 * Self.kib), ByteRun(3 * Self.mib - 64 * Self.kib, 128 * Self.kib)])
        // A write ending exactly on an edge does not touch the next granule.
        var exact = DirtyBitmap(size: 16 * Self.mib, granularity: 64 * Self.kib)
        exact.markDirty(offset: 64 * Self.kib, length: 64 * Self.kib)
        #expect(exact.dirtyIndices == [1])
        exact.markDirty(offset: 64 * Self.kib - 512, length: 512)
        #expect(exact.dirtyIndices == [0, 1])
    }

    @Test("clearAll clears everything and the bitmap is fully usable afterwards")
    func clearAll() {
        var bitmap = DirtyBitmap(size: Self.summarySize, granularity: 512)
        for granule in stride(from: 0, to: bitmap.granuleCount, by: 97) { bitmap.setBits(granule...granule + 3) }
        #expect(!bitmap.isClean)
        bitmap.clearAll()
        #expect(bitmap.isClean)
        #expect(bitmap.dirtyGranules == 0)
        #expect(bitmap.dirtyBytes == 0)
        #expect(bitmap.nextDirty(from: 0) == nil)
        #expect(bitmap.nextClean(from: 0) == 0)
        #expect(bitmap.nextClean(from: 4096) == 4096)
        #expect(bitmap.runs().isEmpty)
        #expect(bitmap.leafWords.allSatisfy { $0 == 0 })
        #expect(bitmap == DirtyBitmap(size: Self.summarySize, granularity: 512))
        // No stale summary bit leads a scan astray after the clear.
        bitmap.setBits(9000...9000)
        #expect(bitmap.nextDirty(from: 0) == 9000)
        #expect(bitmap.nextClean(from: 97) == 97)
        #expect(bitmap.runs() == [ByteRun(9000 * 512, 512)])
        bitmap.clearAll()
        bitmap.clearAll()
        #expect(bitmap.isClean)
    }

    // MARK: - Leaf words

    @Test("init from leaf words: wrong word count is rejected, bits past the end are cleared")
    func initFromLeafWords() throws {
        let size: UInt64 = 70 * 512
        #expect(DirtyBitmap(size: size, granularity: 512, leafWords: [0]) == nil)
        #expect(DirtyBitmap(size: size, granularity: 512, leafWords: [0, 0, 0]) == nil)
        let full = try #require(DirtyBitmap(size: size, granularity: 512, leafWords: [.max, .max]))
        #expect(full.dirtyGranules == 70)
        #expect(full.leafWords == [.max, (1 << 6) - 1])
        #expect(full.isDirty(granule: 69))
        #expect(!full.isDirty(granule: 70))
        #expect(full.nextClean(from: 0) == 70)
        #expect(full.runs() == [ByteRun(0, size)])
        var expected = DirtyBitmap(size: size, granularity: 512)
        expected.setBits(0...69)
        #expect(full == expected)
        // A size that fills its words exactly keeps every bit.
        let exact = try #require(DirtyBitmap(size: 128 * 512, granularity: 512, leafWords: [.max, .max]))
        #expect(exact.dirtyGranules == 128)
        // Zero words: a clean bitmap equal to a fresh one.
        let clean = try #require(DirtyBitmap(size: size, granularity: 512, leafWords: [0, 0]))
        #expect(clean == DirtyBitmap(size: size, granularity: 512))
    }

    @Test("leaf words round-trip a sparse bitmap across summary words")
    func leafWordsRoundTrip() throws {
        var bitmap = DirtyBitmap(size: Self.summarySize + 300, granularity: 512)
        var generator = SeededGenerator(seed: 42)
        for _ in 0..<200 {
            let granule = Int.random(in: 0..<bitmap.granuleCount, using: &generator)
            bitmap.setBits(granule...granule + Int.random(in: 0..<70, using: &generator))
        }
        let copy = try #require(DirtyBitmap(size: bitmap.size, granularity: 512, leafWords: bitmap.leafWords))
        #expect(copy == bitmap)
        #expect(copy.runs() == bitmap.runs())
        #expect(copy.dirtyGranules == bitmap.dirtyGranules)
    }

    // MARK: - Merge

    @Test("merge with equal granularity is an OR")
    func mergeEqual() {
        let size: UInt64 = Self.summarySize
        var target = DirtyBitmap(size: size, granularity: 512)
        var source = DirtyBitmap(size: size, granularity: 512)
        target.setBits(10...20)
        target.setBits(4090...4095)
        source.setBits(15...30)
        source.setBits(4096...4100)
        source.setBits(12_000...12_000)
        target.merge(source)
        #expect(target.runs() == [ByteRun(10 * 512, 21 * 512), ByteRun(4090 * 512, 11 * 512), ByteRun(12_000 * 512, 512)])
        #expect(target.dirtyGranules == 21 + 11 + 1)
        #expect(source.dirtyGranules == 16 + 5 + 1, "the source is unchanged")
        // Merging a clean bitmap, or the same bits again, changes nothing.
        let before = target
        target.merge(DirtyBitmap(size: size, granularity: 512))
        target.merge(source)
        #expect(target == before)
    }

    @Test("merge coarse into fine dirties every fine bit of the coarse granule")
    func mergeCoarseIntoFine() {
        let size: UInt64 = 10 * 65536 + 4096 + 512
        var coarse = DirtyBitmap(size: size, granularity: 65536)
        coarse.setBits(3...3)
        coarse.setBits(10...10)  // the partial last granule
        var fine = DirtyBitmap(size: size, granularity: 4096)
        fine.setBits(0...0)
        fine.merge(coarse)
        #expect(fine.dirtyIndices == [0] + Array(48...63) + [160, 161])
        #expect(fine.runs() == [ByteRun(0, 4096), ByteRun(3 * 65536, 65536), ByteRun(10 * 65536, 4096 + 512)])
    }

    @Test("merge fine into coarse dirties the whole coarse granule")
    func mergeFineIntoCoarse() {
        let size: UInt64 = 10 * 65536 + 4096 + 512
        var fine = DirtyBitmap(size: size, granularity: 512)
        fine.markDirty(offset: 68 * 1024, length: 512)  // inside coarse granule 1
        fine.markDirty(offset: 4 * 65536 - 512, length: 1024)  // straddles granules 3 and 4
        fine.markDirty(offset: size - 1, length: 1)  // the partial last granule
        var coarse = DirtyBitmap(size: size, granularity: 65536)
        coarse.merge(fine)
        #expect(coarse.dirtyIndices == [1, 3, 4, 10])
        #expect(coarse.runs() == [ByteRun(65536, 65536), ByteRun(3 * 65536, 2 * 65536), ByteRun(10 * 65536, 4096 + 512)])
    }

    // MARK: - forEachDirtyRun

    @Test("forEachDirtyRun clips to its window and stops when the body says so")
    func forEachDirtyRunWindow() {
        var bitmap = DirtyBitmap(size: Self.mib, granularity: 65536)
        bitmap.setBits(1...2)
        bitmap.setBits(5...5)
        bitmap.setBits(15...15)
        #expect(bitmap.runs(offset: 100_000, length: 300_000)
            == [ByteRun(100_000, 3 * 65536 - 100_000), ByteRun(5 * 65536, 65536)])
        #expect(bitmap.runs(offset: 3 * 65536, length: 2 * 65536).isEmpty)
        #expect(bitmap.runs(offset: 5 * 65536 + 1, length: 10) == [ByteRun(5 * 65536 + 1, 10)])
        #expect(bitmap.runs(offset: 15 * 65536, length: 10 * Self.mib) == [ByteRun(15 * 65536, 65536)])
        #expect(bitmap.runs(offset: Self.mib, length: 10).isEmpty)
        #expect(bitmap.runs(offset: 0, length: 0).isEmpty)
        var calls = 0
        bitmap.forEachDirtyRun(offset: 0, length: Self.mib) { _, _ in
            calls += 1
            return false
        }
        #expect(calls == 1)
    }

    // MARK: - Oracle

    @Test("thousands of random operations agree with a [Bool] oracle", arguments: [
        (seed: UInt64(1), granularity: UInt64(512), granules: 9_000),
        (seed: UInt64(2), granularity: UInt64(4096), granules: 4096 * 2 + 1),
        (seed: UInt64(3), granularity: UInt64(65536), granules: 130),
    ])
    func randomOperations(seed: UInt64, granularity: UInt64, granules: Int) {
        var generator = SeededGenerator(seed: seed)
        // A partial last granule (except when the random tail is zero).
        let size = UInt64(granules - 1) * granularity + UInt64.random(in: 1...granularity, using: &generator)
        var bitmap = DirtyBitmap(size: size, granularity: granularity)
        var oracle = BitmapOracle(size: size, granularity: granularity)
        var mismatches: [String] = []
        func check(_ step: Int, full: Bool) {
            guard mismatches.count < 10 else { return }
            if bitmap.dirtyGranules != oracle.count {
                mismatches.append("step \(step): count \(bitmap.dirtyGranules), oracle \(oracle.count)")
            }
            for _ in 0..<4 {
                let from = Int.random(in: 0...oracle.granuleCount, using: &generator)
                if bitmap.nextDirty(from: from) != oracle.nextDirty(from: from) {
                    mismatches.append("step \(step): nextDirty(\(from)) \(String(describing: bitmap.nextDirty(from: from))), oracle \(String(describing: oracle.nextDirty(from: from)))")
                }
                if bitmap.nextClean(from: from) != oracle.nextClean(from: from) {
                    mismatches.append("step \(step): nextClean(\(from)) \(bitmap.nextClean(from: from)), oracle \(oracle.nextClean(from: from))")
                }
            }
            let offset = UInt64.random(in: 0...size, using: &generator)
            let length = UInt64.random(in: 0...size, using: &generator)
            if bitmap.runs(offset: offset, length: length) != oracle.runs(offset: offset, length: length) {
                mismatches.append("step \(step): runs(\(offset), \(length)) differ")
            }
            guard full else { return }
            for granule in 0..<oracle.granuleCount where bitmap.isDirty(granule: granule) != oracle.bits[granule] {
                mismatches.append("step \(step): granule \(granule) is \(bitmap.isDirty(granule: granule)), oracle \(oracle.bits[granule])")
                break
            }
            if bitmap.runs() != oracle.runs(offset: 0, length: size) {
                mismatches.append("step \(step): full runs differ")
            }
            if let copy = DirtyBitmap(size: size, granularity: granularity, leafWords: bitmap.leafWords), copy != bitmap {
                mismatches.append("step \(step): leaf-word round trip differs")
            }
        }
        /// Short ranges mostly (a few granules), sometimes long ones: keeps the map sparse.
        func randomLength() -> UInt64 {
            switch Int.random(in: 0..<10, using: &generator) {
            case 0: return UInt64.random(in: 0...size, using: &generator)
            case 1...3: return UInt64.random(in: 1...(64 * granularity), using: &generator)
            default: return UInt64.random(in: 1...(3 * granularity), using: &generator)
            }
        }
        for step in 0..<3000 {
            switch Int.random(in: 0..<100, using: &generator) {
            case 0..<70:
                let offset = UInt64.random(in: 0...(size + granularity), using: &generator)
                let length = randomLength()
                bitmap.markDirty(offset: offset, length: length)
                oracle.markDirty(offset: offset, length: length)
            case 70..<85:
                let lower = Int.random(in: -2...(oracle.granuleCount + 2), using: &generator)
                let upper = lower + Int.random(in: 0...130, using: &generator)
                bitmap.setBits(lower...upper)
                oracle.setBits(lower...upper)
            case 85..<95:
                // Merge a random other bitmap, sometimes of another granularity.
                let otherGranularity = [granularity, granularity * 2, max(512, granularity / 8)]
                    .randomElement(using: &generator)!
                var other = DirtyBitmap(size: size, granularity: otherGranularity)
                var otherOracle = BitmapOracle(size: size, granularity: otherGranularity)
                for _ in 0..<Int.random(in: 0...5, using: &generator) {
                    let offset = UInt64.random(in: 0..<size, using: &generator)
                    let length = randomLength()
                    other.markDirty(offset: offset, length: length)
                    otherOracle.markDirty(offset: offset, length: length)
                }
                bitmap.merge(other)
                oracle.merge(otherOracle)
            default:
                bitmap.clearAll()
                oracle.clearAll()
            }
            check(step, full: step % 25 == 0)
        }
        check(3000, full: true)
        #expect(mismatches.isEmpty, "\(mismatches.joined(separator: "\n"))")
    }
}
