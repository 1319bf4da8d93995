import DirtyTracking
import Foundation

/// The obvious implementation of a dirty bitmap: one Bool per granule.
struct BitmapOracle {
    let size: UInt64
    let granularity: UInt64
    var bits: [Bool]

    init(size: UInt64, granularity: UInt64) {
        self.size = size
        self.granularity = granularity
        bits = [Bool](repeating: false, count: Int((size + granularity - 1) / granularity))
    }

    var granuleCount: Int { bits.count }
    var count: Int { bits.reduce(0) { $0 + ($1 ? 1 : 0) } }

    mutating func markDirty(offset: UInt64, length: UInt64) {
        guard length > 0, offset < size else { return }
        let end = length > size - offset ? size : offset + length
        for granule in Int(offset / granularity)...Int((end - 1) / granularity) { bits[granule] = true }
    }

    mutating func setBits(_ range: ClosedRange<Int>) {
        let lower = max(range.lowerBound, 0)
        let upper = min(range.upperBound, granuleCount - 1)
        guard lower <= upper else { return }
        for granule in lower...upper { bits[granule] = true }
    }

    mutating func clearAll() {
        bits = [Bool](repeating: false, count: bits.count)
    }

    /// Any-granularity merge, by byte ranges.
    mutating func merge(_ other: BitmapOracle) {
        for run in other.runs(offset: 0, length: other.size) { markDirty(offset: run.offset, length: run.length) }
    }

    func nextDirty(from index: Int) -> Int? {
        var granule = max(index, 0)
        while granule < granuleCount {
            if bits[granule] { return granule }
            granule += 1
        }
        return nil
    }

    func nextClean(from index: Int) -> Int {
        var granule = max(index, 0)
        while granule < granuleCount && bits[granule] { granule += 1 }
        return min(granule, granuleCount)
    }

    /// Maximal dirty byte runs clipped to `[offset, offset+length)`.
    func runs(offset: UInt64, length: UInt64) -> [ByteRun] {
        let end = min(size, offset + length)
        var result: [ByteRun] = []
        guard offset < end else { return result }
        var granule = Int(offset / granularity)
        let last = Int((end - 1) / granularity)
        while granule <= last {
            guard bits[granule] else {
                granule += 1
                continue
            }
            let startGranule = granule
            while granule < granuleCount && bits[granule] { granule += 1 }
            let start = max(UInt64(startGranule) * granularity, offset)
            let stop = min(UInt64(granule) * granularity, end)
            result.append(ByteRun(start, stop - start))
        }
        return result
    }
}

/// A byte range, comparable in `#expect`.
struct ByteRun: Equatable, CustomStringConvertible {
    var offset: UInt64
    var length: UInt64

    init(_ offset: UInt64, _ length: UInt64) {
        self.offset = offset
        self.length = length
    }

    var description: String { "[\(offset), +\(length))" }
}

extension DirtyBitmap {
    /// Every dirty run overlapping the window, as `forEachDirtyRun` reports them.
    func runs(offset: UInt64 = 0, length: UInt64? = nil) -> [ByteRun] {
        var result: [ByteRun] = []
        forEachDirtyRun(offset: offset, length: length ?? size) { start, length in
            result.append(ByteRun(start, length))
            return true
        }
        return result
    }

    /// The indices of every dirty granule, by `isDirty`.
    var dirtyIndices: [Int] {
        (0..<granuleCount).filter { isDirty(granule: $0) }
    }
}

/// A private temporary directory, removed when released.
final class TemporaryDirectory {
    let path: String

    init() throws {
        var template = Array("/tmp/tm-dt-XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        guard made != nil else { throw TestFailure("mkdtemp failed: errno \(errno)") }
        path = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    deinit {
        try? FileManager.default.removeItem(atPath: path)
    }

    func file(_ name: String) -> String { path + "/" + name }
}

struct TestFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
