import DirtyTracking
import Foundation
import Synchronization
import Testing

/// `DirtyTracker` without persistence: QEMU's management operations and their errors.
@Suite("DirtyTracker")
struct DirtyTrackerTests {
    static let size: UInt64 = 16 << 20

    func dirtyRuns(_ tracker: DirtyTracker, _ name: String) throws -> [ByteRun] {
        try tracker.extents(name: name, offset: 0, length: tracker.size, maximumExtents: .max)
            .filter(\.dirty).map { ByteRun($0.offset, $0.length) }
    }

    // MARK: - add

    @Test("add creates recording bitmaps in creation order, with QEMU's query fields")
    func addAndQuery() throws {
        let tracker = DirtyTracker(size: Self.size)
        #expect(!tracker.isPersistent)
        #expect(tracker.names.isEmpty)
        #expect(tracker.query().isEmpty)
        try tracker.add(name: "b0", persistent: false)
        try tracker.add(name: "fine", granularity: 4096, persistent: false)
        try tracker.add(name: "off", granularity: 1 << 20, persistent: false, recording: false)
        #expect(tracker.names == ["b0", "fine", "off"])
        #expect(tracker.query() == [
            BitmapInfo(name: "b0", count: 0, granularity: 65536, recording: true, busy: false, persistent: false, generation: 0),
            BitmapInfo(name: "fine", count: 0, granularity: 4096, recording: true, busy: false, persistent: false, generation: 0),
            BitmapInfo(name: "off", count: 0, granularity: 1 << 20, recording: false, busy: false, persistent: false, generation: 0),
        ])
        try tracker.recordModification(offset: 1 << 20, length: 512)
        #expect(tracker.query().map(\.count) == [65536, 4096, 0], "count is in whole granules")
    }

    @Test("add refuses a duplicate name and leaves the existing bitmap alone")
    func duplicateName() throws {
        let tracker = DirtyTracker(size: Self.size)
        try tracker.add(name: "b0", persistent: false)
        try tracker.recordModification(offset: 0, length: 1)
        #expect(throws: BitmapError.duplicateName("b0")) {
            try tracker.add(name: "b0", granularity: 4096, persistent: false)
        }
        #expect(tracker.query().map(\.granularity) == [65536])
        #expect(try dirtyRuns(tracker, "b0") == [ByteRun(0, 65536)])
    }

    @Test("add refuses an invalid granularity", arguments: [UInt64(0), 1, 256, 511, 513, 4095, 3 << 20, 1 << 32, UInt64.max])
    func invalidGranularity(granularity: UInt64) {
        let tracker = DirtyTracker(size: Self.size)
        #expect(throws: BitmapError.invalidGranularity(granularity)) {
            try tracker.add(name: "b", granularity: granularity, persistent: false)
        }
        #expect(tracker.names.isEmpty)
    }

    @Test("add accepts the granularity limits 512 B and 2 GiB")
    func granularityLimits() throws {
        let tracker = DirtyTracker(size: Self.size)
        try tracker.add(name: "min", granularity: 512, persistent: false)
        try tracker.add(name: "max", granularity: 1 << 31, persistent: false)
        try tracker.recordModification(offset: 5000, length: 1)
        #expect(try dirtyRuns(tracker, "min") == [ByteRun(4608, 512)])
        #expect(try dirtyRuns(tracker, "max") == [ByteRun(0, Self.size)])
    }

    @Test("add refuses an empty name and one of 1024 bytes; 1023 bytes is fine")
    func nameLength() throws {
        let tracker = DirtyTracker(size: Self.size)
        #expect(throws: BitmapError.invalidName("")) { try tracker.add(name: "", persistent: false) }
        let long = String(repeating: "n", count: 1024)
        #expect(throws: BitmapError.invalidName(long)) { try tracker.add(name: long, persistent: false) }
        // Bytes, not characters: 512 × "é" is 1024 bytes.
        let accented = String(repeating: "é", count: 512)
        #expect(throws: BitmapError.invalidName(accented)) { try tracker.add(name: accented, persistent: false) }
        let longest = String(repeating: "n", count: 1023)
        try tracker.add(name: longest, persistent: false)
        try tracker.add(name: String(repeating: "é", count: 511) + "a", persistent: false)
        #expect(tracker.names.count == 2)
    }

    @Test("a persistent bitmap needs a store")
    func persistentWithoutStore() {
        let tracker = DirtyTracker(size: Self.size)
        #expect(throws: BitmapError.self) { try tracker.add(name: "p", persistent: true) }
        #expect(tracker.names.isEmpty)
    }

    // MARK: - Not found

    @Test("every operation on a missing bitmap reports it by name")
    func notFound() throws {
        let tracker = DirtyTracker(size: Self.size)
        try tracker.add(name: "b0", persistent: false)
        #expect(throws: BitmapError.notFound("nope")) { try tracker.remove(name: "nope") }
        #expect(throws: BitmapError.notFound("nope")) { try tracker.clear(name: "nope") }
        #expect(throws: BitmapError.notFound("nope")) { try tracker.setRecording(name: "nope", false) }
        #expect(throws: BitmapError.notFound("nope")) { try tracker.merge(target: "nope", sources: ["b0"]) }
        #expect(throws: BitmapError.notFound("nope")) { try tracker.merge(target: "b0", sources: ["nope"]) }
        #expect(throws: BitmapError.notFound("nope")) {
            _ = try tracker.extents(name: "nope", offset: 0, length: 512, maximumExtents: 1)
        }
        #expect(tracker.names == ["b0"])
    }

    @Test("the error messages follow QEMU's wording")
    func messages() {
        #expect(BitmapError.duplicateName("b0").description == "bitmap 'b0' already exists")
        #expect(BitmapError.notFound("b0").description == "bitmap 'b0' not found")
        #expect(BitmapError.busy("b0").description
            == "bitmap 'b0' is currently in use by another operation and cannot be used")
        #expect(BitmapError.invalidGranularity(513).description.contains("power of two"))
    }

    // MARK: - remove, clear, enable/disable

    @Test("remove drops the bitmap; the name can be added again, clean")
    func remove() throws {
        let tracker = DirtyTracker(size: Self.size)
        try tracker.add(name: "a", persistent: false)
        try tracker.add(name: "b", persistent: false)
        try tracker.recordModification(offset: 0, length: 4096)
        try tracker.remove(name: "a")
        #expect(tracker.names == ["b"])
        #expect(throws: BitmapError.notFound("a")) { try tracker.remove(name: "a") }
        try tracker.add(name: "a", persistent: false)
        #expect(tracker.names == ["b", "a"])
        #expect(try dirtyRuns(tracker, "a").isEmpty)
        #expect(try dirtyRuns(tracker, "b") == [ByteRun(0, 65536)])
    }

    @Test("clear empties one bitmap and leaves the others")
    func clear() throws {
        let tracker = DirtyTracker(size: Self.size)
        try tracker.add(name: "a", persistent: false)
        try tracker.add(name: "b", persistent: false)
        try tracker.recordModification(offset: 1 << 20, length: 200_000)
        try tracker.clear(name: "a")
        #expect(try dirtyRuns(tracker, "a").isEmpty)
        #expect(tracker.query().map(\.count) == [0, 4 * 65536])
        #expect(try dirtyRuns(tracker, "b") == [ByteRun(1 << 20, 4 * 65536)])
        // Still recording after the clear.
        try tracker.recordModification(offset: 0, length: 1)
        #expect(try dirtyRuns(tracker, "a") == [ByteRun(0, 65536)])
    }

    @Test("a disabled bitmap does not record; enabling it resumes recording")
    func enableDisable() throws {
        let tracker = DirtyTracker(size: Self.size)
        try tracker.add(name: "on", persistent: false)
        try tracker.add(name: "off", persistent: false)
        try tracker.setRecording(name: "off", false)
        #expect(tracker.query().map(\.recording) == [true, false])
        try tracker.recordModification(offset: 0, length: 4096)
        #expect(try dirtyRuns(tracker, "on") == [ByteRun(0, 65536)])
        #expect(try dirtyRuns(tracker, "off").isEmpty)
        try tracker.setRecording(name: "off", true)
        #expect(tracker.query().map(\.recording) == [true, true])
        try tracker.recordModification(offset: 2 << 20, length: 4096)
        #expect(try dirtyRuns(tracker, "off") == [ByteRun(2 << 20, 65536)])
        // A bitmap created disabled does not record either.
        try tracker.add(name: "created-off", persistent: false, recording: false)
        try tracker.recordModification(offset: 3 << 20, length: 4096)
        #expect(try dirtyRuns(tracker, "created-off").isEmpty)
    }

    @Test("a checkpoint waits for writes marked before it to finish, not for writes after it")
    func operationsDrainEarlierWrites() throws {
        let tracker = DirtyTracker(size: Self.size)
        try tracker.add(name: "b0", persistent: false)
        let before = tracker.willModify(offset: 0, length: 4096)
        let checkpointDone = Atomic<Bool>(false)
        let thread = Thread {
            try? tracker.perform([.createCheckpoint(bitmap: "b0", increment: "c1", consume: false)])
            checkpointDone.store(true, ordering: .sequentiallyConsistent)
        }
        thread.start()
        // The checkpoint is applied at once (later writes go to the live bitmap) but it
        // does not return while the earlier write is in flight.
        var waited = 0
        while tracker.query().count < 2 && waited < 5000 {
            usleep(1000)
            waited += 1
        }
        let after = tracker.willModify(offset: 1 << 20, length: 4096)
        #expect(after.epoch == before.epoch + 1)
        usleep(50_000)
        let returnedEarly = checkpointDone.load(ordering: .sequentiallyConsistent)
        #expect(!returnedEarly, "returned while a write of its epoch was in flight")
        tracker.didModify(before)
        while !checkpointDone.load(ordering: .sequentiallyConsistent) && waited < 10000 {
            usleep(1000)
            waited += 1
        }
        let returned = checkpointDone.load(ordering: .sequentiallyConsistent)
        #expect(returned, "the write of the later epoch must not hold it")
        tracker.didModify(after)
        #expect(try dirtyRuns(tracker, "c1") == [ByteRun(0, 65536)])
        #expect(try dirtyRuns(tracker, "b0") == [ByteRun(1 << 20, 65536)])
    }

    /// Marks a write and finishes it at once, returning the journal work it asked for.
    static func journalWork(_ tracker: DirtyTracker, _ offset: UInt64, _ length: UInt64) -> ClosedRange<Int>? {
        let modification = tracker.willModify(offset: offset, length: length)
        tracker.didModify(modification)
        return modification.journalRegions
    }

    @Test("willModify marks every recording bitmap at its own granularity, and returns no journal work in memory")
    func willModifyMarksRecordingOnly() throws {
        let tracker = DirtyTracker(size: Self.size)
        #expect(Self.journalWork(tracker, 0, 4096) == nil, "no bitmaps: nothing to do")
        try tracker.add(name: "coarse", granularity: 1 << 20, persistent: false)
        try tracker.add(name: "fine", granularity: 512, persistent: false)
        try tracker.add(name: "paused", persistent: false, recording: false)
        #expect(Self.journalWork(tracker, 3 * 65536 + 100, 1000) == nil)
        #expect(Self.journalWork(tracker, 5 << 20, 0) == nil)
        #expect(try dirtyRuns(tracker, "coarse") == [ByteRun(0, 1 << 20)])
        #expect(try dirtyRuns(tracker, "fine") == [ByteRun(3 * 65536, 1536)])
        #expect(try dirtyRuns(tracker, "paused").isEmpty)
    }

    // MARK: - merge

    @Test("merge ORs sources into the target, across granularities")
    func merge() throws {
        let tracker = DirtyTracker(size: Self.size)
        try tracker.add(name: "target", persistent: false)
        try tracker.add(name: "fine", granularity: 4096, persistent: false, recording: false)
        try tracker.add(name: "coarse", granularity: 1 << 20, persistent: false, recording: false)
        try tracker.setRecording(name: "target", false)
        try tracker.setRecording(name: "fine", true)
        try tracker.recordModification(offset: 100 * 1024, length: 4096)  // fine: [100K, 104K)
        try tracker.setRecording(name: "fine", false)
        try tracker.setRecording(name: "coarse", true)
        try tracker.recordModification(offset: (5 << 20) + 7, length: 1)  // coarse: [5M, 6M)
        try tracker.merge(target: "target", sources: ["fine", "coarse"])
        #expect(try dirtyRuns(tracker, "target") == [ByteRun(65536, 65536), ByteRun(5 << 20, 1 << 20)])
        // Cumulative: merging again, or the target into itself, changes nothing.
        try tracker.merge(target: "target", sources: ["fine", "target"])
        try tracker.merge(target: "target", sources: [])
        #expect(try dirtyRuns(tracker, "target") == [ByteRun(65536, 65536), ByteRun(5 << 20, 1 << 20)])
        // Coarse target into fine: every fine bit of the granule.
        try tracker.merge(target: "fine", sources: ["target"])
        #expect(try dirtyRuns(tracker, "fine") == [ByteRun(65536, 65536), ByteRun(5 << 20, 1 << 20)])
        #expect(tracker.query().map(\.count) == [65536 + (1 << 20), 65536 + (1 << 20), 1 << 20])
    }

    @Test("merge with a missing source fails and leaves the target untouched")
    func mergeAllOrNothing() throws {
        let tracker = DirtyTracker(size: Self.size)
        try tracker.add(name: "target", persistent: false)
        try tracker.add(name: "source", persistent: false, recording: false)
        try tracker.recordModification(offset: 0, length: 1)
        try tracker.setRecording(name: "target", false)
        try tracker.setRecording(name: "source", true)
        try tracker.recordModification(offset: 8 << 20, length: 1)
        #expect(throws: BitmapError.notFound("missing")) {
            try tracker.merge(target: "target", sources: ["source", "missing"])
        }
        #expect(try dirtyRuns(tracker, "target") == [ByteRun(0, 65536)], "a valid source listed first must not leak in")
        #expect(tracker.query().map(\.count) == [65536, 65536])
    }

    // MARK: - extents

    @Test("extents alternate clean and dirty, clipped to the window")
    func extentsWindow() throws {
        let tracker = DirtyTracker(size: 1 << 20)
        try tracker.add(name: "b", persistent: false)
        for granule: UInt64 in [1, 3, 5, 15] { try tracker.recordModification(offset: granule * 65536, length: 1) }
        let all = try tracker.extents(name: "b", offset: 0, length: 1 << 20, maximumExtents: 100)
        #expect(all == [
            DirtyExtent(offset: 0, length: 65536, dirty: false),
            DirtyExtent(offset: 65536, length: 65536, dirty: true),
            DirtyExtent(offset: 2 * 65536, length: 65536, dirty: false),
            DirtyExtent(offset: 3 * 65536, length: 65536, dirty: true),
            DirtyExtent(offset: 4 * 65536, length: 65536, dirty: false),
            DirtyExtent(offset: 5 * 65536, length: 65536, dirty: true),
            DirtyExtent(offset: 6 * 65536, length: 9 * 65536, dirty: false),
            DirtyExtent(offset: 15 * 65536, length: 65536, dirty: true),
        ])
        let window = try tracker.extents(name: "b", offset: 100_000, length: 200_000, maximumExtents: 100)
        #expect(window == [
            DirtyExtent(offset: 100_000, length: 131_072 - 100_000, dirty: true),
            DirtyExtent(offset: 131_072, length: 65536, dirty: false),
            DirtyExtent(offset: 196_608, length: 65536, dirty: true),
            DirtyExtent(offset: 262_144, length: 300_000 - 262_144, dirty: false),
        ])
        // A window past the end is clipped to the image.
        let tail = try tracker.extents(name: "b", offset: 14 * 65536 + 512, length: 10 << 20, maximumExtents: 100)
        #expect(tail == [
            DirtyExtent(offset: 14 * 65536 + 512, length: 65536 - 512, dirty: false),
            DirtyExtent(offset: 15 * 65536, length: 65536, dirty: true),
        ])
    }

    @Test("extents honours maximumExtents (REQ_ONE is 1)")
    func extentsLimit() throws {
        let tracker = DirtyTracker(size: 1 << 20)
        try tracker.add(name: "b", persistent: false)
        for granule: UInt64 in [1, 3, 5] { try tracker.recordModification(offset: granule * 65536, length: 1) }
        let three = try tracker.extents(name: "b", offset: 0, length: 1 << 20, maximumExtents: 3)
        #expect(three.map(\.offset) == [0, 65536, 2 * 65536])
        #expect(three.map(\.dirty) == [false, true, false])
        #expect(try tracker.extents(name: "b", offset: 0, length: 1 << 20, maximumExtents: 1)
            == [DirtyExtent(offset: 0, length: 65536, dirty: false)])
        #expect(try tracker.extents(name: "b", offset: 65536 + 4096, length: 1 << 20, maximumExtents: 1)
            == [DirtyExtent(offset: 65536 + 4096, length: 65536 - 4096, dirty: true)])
        // Clean everywhere: one clean extent for the whole window.
        try tracker.clear(name: "b")
        #expect(try tracker.extents(name: "b", offset: 512, length: 4096, maximumExtents: 1)
            == [DirtyExtent(offset: 512, length: 4096, dirty: false)])
    }
}
