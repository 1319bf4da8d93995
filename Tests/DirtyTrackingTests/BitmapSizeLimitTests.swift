import DirtyTracking
import Testing

/// The bound on a bitmap's size (`BitmapLimits.maximumGranules`): too-fine bitmaps on big
/// images are refused before memory is allocated, naming the granularity that fits.
@Suite("Bitmap size limit")
struct BitmapSizeLimitTests {
    static let fourTiB: UInt64 = 4 << 40

    @Test("the bound is 2^28 granules; exactly 2^28 fits, one byte more does not")
    func boundary() throws {
        #expect(BitmapLimits.maximumGranules == 1 << 28)
        let largestAt512: UInt64 = 512 << 28  // 128 GiB
        try BitmapLimits.checkSize(name: "b", imageSize: largestAt512, granularity: 512)
        #expect(BitmapLimits.smallestGranularity(forImageSize: largestAt512) == 512)
        #expect(BitmapLimits.smallestGranularity(forImageSize: largestAt512 + 1) == 1024)
        #expect(throws: BitmapError.bitmapTooLarge(
            name: "b", imageSize: largestAt512 + 1, granularity: 512, smallestGranularity: 1024)
        ) {
            try BitmapLimits.checkSize(name: "b", imageSize: largestAt512 + 1, granularity: 512)
        }
        // The default granularity fits up to 16 TiB; the largest one up to 512 PiB.
        #expect(BitmapLimits.smallestGranularity(forImageSize: 16 << 40) == BitmapLimits.defaultGranularity)
        #expect(BitmapLimits.smallestGranularity(forImageSize: (16 << 40) + 1) == 128 << 10)
        #expect(BitmapLimits.smallestGranularity(forImageSize: 1 << 59) == BitmapLimits.maximumGranularity)
        #expect(BitmapLimits.smallestGranularity(forImageSize: (1 << 59) + 1) == nil)
        #expect(BitmapLimits.smallestGranularity(forImageSize: .max) == nil)
        #expect(BitmapLimits.granules(imageSize: .max, granularity: 512) == (UInt64.max >> 9) + 1)
    }

    @Test("a 512 B bitmap on 4 TiB is refused with a message naming 1 GiB and 16 KiB; 64 KiB is added")
    func fourTiB() throws {
        let tracker = DirtyTracker(size: Self.fourTiB)
        let error = #expect(throws: BitmapError.self) {
            try tracker.add(name: "fine", granularity: 512, persistent: false)
        }
        #expect(
            error?.description
                == "bitmap 'fine' would need 1024 MiB at granularity 512 B; use granularity ≥ 16 KiB (16384) for this 4 TiB image: a bitmap may have at most 268435456 granules, 32 MiB of bits")
        #expect(tracker.names.isEmpty)
        // Refused in a transaction too, and nothing else in it happens.
        #expect(throws: BitmapError.self) {
            try tracker.perform([
                .add(name: "ok", granularity: 65536, persistent: false, recording: true),
                .add(name: "fine", granularity: 8192, persistent: false, recording: true),
            ])
        }
        #expect(tracker.names.isEmpty)
        try tracker.add(name: "b0", granularity: 65536, persistent: false)
        try tracker.add(name: "edge", granularity: 16384, persistent: false)
        #expect(tracker.names == ["b0", "edge"])
    }

    @Test("sizes in messages use binary units")
    func describe() {
        #expect(BitmapLimits.describe(bytes: 512) == "512 B")
        #expect(BitmapLimits.describe(bytes: 16384) == "16 KiB")
        #expect(BitmapLimits.describe(bytes: 4 << 40) == "4 TiB")
        #expect(BitmapLimits.describe(bytes: 3 << 29) == "1.5 GiB")
    }
}
