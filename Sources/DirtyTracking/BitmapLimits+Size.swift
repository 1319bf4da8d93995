extension BitmapLimits {
    /// The most granules (bits) one bitmap may have: 2^28, i.e. 32 MiB of bits.
    ///
    /// Why a bound: a bitmap lives in memory as one bit per granule, every FLUSH or timer
    /// save rewrites all of it, and a checkpoint scans it. 512-byte granules on a 4 TiB
    /// image would be 1 GiB of memory and a 1 GiB write per save. At 2^28 granules a save
    /// is at most 32 MiB, and the default 64 KiB granularity fits images up to 16 TiB.
    public static let maximumGranules: UInt64 = 1 << 28

    /// Granules of a bitmap of `granularity` over `imageSize` bytes (the last one may be
    /// partial). Nil for a zero granularity.
    public static func granules(imageSize: UInt64, granularity: UInt64) -> UInt64? {
        guard granularity > 0 else { return nil }
        return imageSize / granularity + (imageSize % granularity == 0 ? 0 : 1)
    }

    /// The smallest valid granularity whose bitmap over `imageSize` bytes stays within
    /// `maximumGranules`, or nil when even the largest granularity does not.
    public static func smallestGranularity(forImageSize imageSize: UInt64) -> UInt64? {
        var granularity = minimumGranularity
        while granularity <= maximumGranularity {
            if let count = granules(imageSize: imageSize, granularity: granularity), count <= maximumGranules {
                return granularity
            }
            granularity <<= 1
        }
        return nil
    }

    /// Refuses a bitmap `name` of `granularity` over `imageSize` bytes that would exceed
    /// `maximumGranules`, before any memory is allocated for it.
    /// - Throws: `.bitmapTooLarge`, naming the smallest granularity that fits.
    public static func checkSize(name: String, imageSize: UInt64, granularity: UInt64) throws(BitmapError) {
        guard let count = granules(imageSize: imageSize, granularity: granularity), count > maximumGranules else { return }
        throw .bitmapTooLarge(
            name: name, imageSize: imageSize, granularity: granularity,
            smallestGranularity: smallestGranularity(forImageSize: imageSize))
    }

    /// A byte count for messages: "4 TiB", "1.5 GiB", "512 B".
    public static func describe(bytes: UInt64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
        var unit = 0
        var scale: UInt64 = 1
        while unit + 1 < units.count && bytes / scale >= 1024 {
            scale <<= 10
            unit += 1
        }
        if bytes % scale == 0 { return "\(bytes / scale) \(units[unit])" }
        let tenths = (bytes % scale) * 10 / scale
        return "\(bytes / scale).\(tenths) \(units[unit])"
    }
}
