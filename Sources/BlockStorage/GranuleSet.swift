/// A fixed-size set of granule indices, one bit each.
///
/// The bookkeeping of a point-in-time view (which granules were claimed for copying,
/// which are preserved): 2 bits per granule, at most 16 MiB
/// (`PointInTimeView.maximumGranules`), mutated in place.
struct GranuleSet: Sendable {
    private var words: [UInt64]
    let count: Int

    init(count: Int) {
        self.count = count
        self.words = Array(repeating: 0, count: (count + 63) / 64)
    }

    func contains(_ index: Int) -> Bool {
        words[index >> 6] & (1 << UInt64(index & 63)) != 0
    }

    mutating func insert(_ index: Int) {
        words[index >> 6] |= 1 << UInt64(index & 63)
    }

    /// True when every index in `range` is in the set.
    func containsAll(_ range: ClosedRange<Int>) -> Bool {
        var index = range.lowerBound
        while index <= range.upperBound {
            let word = words[index >> 6]
            if index & 63 == 0 && index + 63 <= range.upperBound {
                guard word == .max else { return false }
                index += 64
                continue
            }
            guard word & (1 << UInt64(index & 63)) != 0 else { return false }
            index += 1
        }
        return true
    }
}
