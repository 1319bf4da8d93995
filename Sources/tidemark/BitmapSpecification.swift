import ArgumentParser
import DirtyTracking

/// One `--bitmap NAME[:GRANULARITY]` argument.
struct BitmapSpecification: Equatable {
    var name: String
    var granularity: UInt64

    init(parsing text: String) throws {
        if let colon = text.lastIndex(of: ":"), let size = ByteSize.parse(String(text[text.index(after: colon)...])) {
            name = String(text[..<colon])
            granularity = size
        } else {
            name = text
            granularity = BitmapLimits.defaultGranularity
        }
        guard !name.isEmpty, name.utf8.count <= BitmapLimits.maximumNameLength else {
            throw ValidationError("bitmap names are 1 to \(BitmapLimits.maximumNameLength) bytes, got '\(name)'")
        }
        guard BitmapLimits.isValidGranularity(granularity) else {
            throw ValidationError(BitmapError.invalidGranularity(granularity).description)
        }
    }
}

/// Sizes written as `65536`, `64K`, `64KiB`, `1M`, `2G`.
enum ByteSize {
    static func parse(_ text: String) -> UInt64? {
        var digits = Substring(text)
        var multiplier: UInt64 = 1
        for (suffix, value) in [("KiB", 1 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30), ("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)]
        where digits.hasSuffix(suffix) {
            digits = digits.dropLast(suffix.count)
            multiplier = UInt64(value)
            break
        }
        guard let number = UInt64(digits) else { return nil }
        let (result, overflow) = number.multipliedReportingOverflow(by: multiplier)
        return overflow ? nil : result
    }
}
