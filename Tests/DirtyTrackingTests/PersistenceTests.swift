import DirtyTracking
import Foundation
import Testing

/// `DirtyTracker` with a real `BitmapStore` in a temporary directory: saving, reopening,
/// locking, damage detection and recovery from the region journal.
@Suite("Bitmap persistence")
struct PersistenceTests {
    static let region = BitmapStore.regionSize

    /// A fake image path in a fresh directory: the store only uses it to name its sidecar.
    struct Fixture {
        let directory: TemporaryDirectory
        let image: String
        var store: String { BitmapStore.directory(forImage: image) }

        init() throws {
            directory = try TemporaryDirectory()
            image = directory.file("disk.img")
        }

        func open(size: UInt64) throws -> (BitmapStore, BitmapStore.Contents) {
            try BitmapStore.open(imagePath: image, imageSize: size)
        }

        /// Opens the store and builds a tracker on it.
        func tracker(size: UInt64) throws -> (DirtyTracker, BitmapStore.Contents) {
            let (store, contents) = try open(size: size)
            return (try DirtyTracker(store: store, contents: contents), contents)
        }

        /// The manifest, parsed.
        func manifest() throws -> [String: Any] {
            let data = try Data(contentsOf: URL(fileURLWithPath: store + "/state.json"))
            guard let object = try JSONSerialization.jsonObject(with: data) as? [String: Any] else {
                throw TestFailure("state.json is not a JSON object")
            }
            return object
        }

        func files() throws -> [String] {
            try FileManager.default.contentsOfDirectory(atPath: store).sorted()
        }
    }

    /// Records a write the way the server does: mark, then make the journal durable.
    static func write(_ tracker: DirtyTracker, _ offset: UInt64, _ length: UInt64) throws {
        try tracker.recordModification(offset: offset, length: length)
    }

    static func dirtyRuns(_ tracker: DirtyTracker, _ name: String) throws -> [ByteRun] {
        try tracker.extents(name: name, offset: 0, length: tracker.size, maximumExtents: .max)
            .filter(\.dirty).map { ByteRun($0.offset, $0.length) }
    }

    static func bitmap(size: UInt64, granularity: UInt64, _ writes: [(UInt64, UInt64)]) -> DirtyBitmap {
        var bitmap = DirtyBitmap(size: size, granularity: granularity)
        for (offset, length) in writes { bitmap.markDirty(offset: offset, length: length) }
        return bitmap
    }

    // MARK: - Save and reopen

    @Test("a clean save and reopen gives identical bitmaps and flags; in-memory bitmaps are not saved")
    func saveAndReopen() throws {
        let fixture = try Fixture()
        let size: UInt64 = 3 * Self.region + 4096 + 512  // partial last granule at every granularity
        let early: [(UInt64, UInt64)] = [(0, 1), (5 << 20, 300_000), (Self.region - 512, 1024), (size - 1, 1)]
        let late: [(UInt64, UInt64)] = [(2 * Self.region + 12345, 70_000)]
        let expectedInfo: [BitmapInfo]
        do {
            let (tracker, contents) = try fixture.tracker(size: size)
            #expect(contents.bitmaps.isEmpty)
            #expect(contents.generation == 0)
            #expect(!contents.recovered)
            #expect(tracker.isPersistent)
            try tracker.add(name: "daily", persistent: true)
            try tracker.add(name: "fine", granularity: 4096, persistent: true)
            try tracker.add(name: "paused", granularity: 1 << 20, persistent: true)
            try tracker.add(name: "scratch", persistent: false)
            for (offset, length) in early { try Self.write(tracker, offset, length) }
            try tracker.setRecording(name: "paused", false)
            for (offset, length) in late { try Self.write(tracker, offset, length) }
            expectedInfo = tracker.query().filter(\.persistent)
            try tracker.save(cleanShutdown: true)
        }
        #expect(try fixture.manifest()["cleanShutdown"] as? Bool == true)

        let (store, contents) = try fixture.open(size: size)
        #expect(!contents.recovered)
        #expect(contents.generation == 0)
        #expect(contents.bitmaps.map(\.name) == ["daily", "fine", "paused"])
        #expect(contents.bitmaps.map(\.recording) == [true, true, false])
        #expect(contents.bitmaps[0].bitmap == Self.bitmap(size: size, granularity: 65536, early + late))
        #expect(contents.bitmaps[1].bitmap == Self.bitmap(size: size, granularity: 4096, early + late))
        #expect(contents.bitmaps[2].bitmap == Self.bitmap(size: size, granularity: 1 << 20, early))
        let tracker = try DirtyTracker(store: store, contents: contents)
        #expect(tracker.query() == expectedInfo)
        #expect(tracker.generation == 0)
        #expect(try Self.dirtyRuns(tracker, "fine") == contents.bitmaps[1].bitmap.runs())
        // Loaded bitmaps keep recording (or not) as saved.
        try Self.write(tracker, 100 << 20, 1)
        #expect(try Self.dirtyRuns(tracker, "daily").contains(ByteRun(100 << 20, 65536)))
        #expect(try Self.dirtyRuns(tracker, "paused") == contents.bitmaps[2].bitmap.runs())
    }

    @Test("remove, clear and disable are saved at once")
    func managementIsSaved() throws {
        let fixture = try Fixture()
        let size: UInt64 = 256 << 20
        do {
            let (tracker, _) = try fixture.tracker(size: size)
            for name in ["a", "b", "c"] { try tracker.add(name: name, persistent: true) }
            try Self.write(tracker, 1 << 20, 1)
            try tracker.save()
            try tracker.remove(name: "a")
            try tracker.clear(name: "b")
            try tracker.setRecording(name: "c", false)
            // No further save: the changes above must already be on disk.
        }
        let (_, contents) = try fixture.open(size: size)
        #expect(contents.bitmaps.map(\.name) == ["b", "c"])
        #expect(contents.bitmaps.map(\.recording) == [true, false])
        #expect(contents.bitmaps[0].bitmap.isClean)
        #expect(contents.bitmaps[1].bitmap.runs() == [ByteRun(1 << 20, 65536)])
    }

    // MARK: - Locking and damage

    @Test("a second open while the first holds the lock is refused; after release it succeeds")
    func locked() throws {
        let fixture = try Fixture()
        var first: (BitmapStore, BitmapStore.Contents)? = try fixture.open(size: 1 << 30)
        #expect(BitmapStore.isLocked(imagePath: fixture.image))
        #expect(throws: BitmapError.storeLocked(path: fixture.store)) {
            _ = try fixture.open(size: 1 << 30)
        }
        #expect(first != nil)
        first = nil
        #expect(!BitmapStore.isLocked(imagePath: fixture.image))
        _ = try fixture.open(size: 1 << 30)
    }

    @Test("a store written for another image size keeps its bitmaps at the new size, entirely dirty, generation + 1")
    func otherImageSize() throws {
        let fixture = try Fixture()
        let oldSize: UInt64 = 1 << 30
        let newSize: UInt64 = (1 << 30) + 512
        do {
            let (tracker, _) = try fixture.tracker(size: oldSize)
            try tracker.add(name: "b0", persistent: true)
            try tracker.add(name: "off", granularity: 4096, persistent: true, recording: false)
            try Self.write(tracker, 4096, 1)
            try tracker.perform([.createCheckpoint(bitmap: "b0", increment: "c1", consume: false)])
            try tracker.save(cleanShutdown: true)
        }
        let (store, contents) = try fixture.open(size: newSize)
        #expect(contents.bitmaps.map(\.name) == ["b0", "off", "c1"])
        #expect(contents.bitmaps.map(\.recording) == [true, false, false])
        #expect(contents.bitmaps[2].checkpointOf == "b0", "the pending increment is kept")
        for bitmap in contents.bitmaps {
            #expect(bitmap.bitmap.size == newSize)
            #expect(bitmap.bitmap.runs() == [ByteRun(0, newSize)], "\(bitmap.name) must be entirely dirty")
        }
        #expect(contents.generation == 1)
        #expect(contents.problems.count == 1)
        #expect(contents.problems.first?.contains(fixture.store + "/state.json") == true)
        #expect(contents.problems.first?.contains("\(oldSize)") == true)
        let tracker = try DirtyTracker(store: store, contents: contents)
        #expect(tracker.query().map(\.count) == [newSize + 65536 - 512, newSize + 4096 - 512, newSize + 65536 - 512])
        #expect(try fixture.manifest()["imageSize"] as? Int == Int(newSize), "the re-created bitmaps are saved at once")
        #expect(try fixture.manifest()["generation"] as? Int == 1)
    }

    enum Damage: String, CaseIterable, CustomTestStringConvertible {
        case flipDataByte, truncateData, deleteData, garbageManifest, manifestChecksum, unknownVersion
        var testDescription: String { rawValue }
    }

    @Test("a damaged store is loaded as dirty where it cannot be trusted, naming the damaged file", arguments: Damage.allCases)
    func damagedStore(damage: Damage) throws {
        let fixture = try Fixture()
        let size: UInt64 = 1 << 30
        let written = [ByteRun(100 << 20, 1 << 20)]
        do {
            let (tracker, _) = try fixture.tracker(size: size)
            try tracker.add(name: "b0", persistent: true)
            try tracker.add(name: "b1", granularity: 4096, persistent: true)
            try Self.write(tracker, 100 << 20, 1 << 20)
            try tracker.save(cleanShutdown: true)
        }
        let files = try fixture.files()
        let dataFiles = files.filter { $0.hasPrefix("bitmaps-") && $0.hasSuffix(".dat") }
        try #require(dataFiles.count == 1, "files: \(files)")
        let dataPath = fixture.store + "/" + dataFiles[0]
        let statePath = fixture.store + "/state.json"
        var data = [UInt8](try Data(contentsOf: URL(fileURLWithPath: dataPath)))
        let all = [ByteRun(0, size)]
        // What each bitmap must load as, and the file the problem must name.
        let expected: (b0: [ByteRun], b1: [ByteRun], path: String)
        switch damage {
        case .flipDataByte:
            // A byte inside the second bitmap's clean words: only b1 is untrustworthy.
            data[data.count - 3] ^= 0x10
            try Data(data).write(to: URL(fileURLWithPath: dataPath))
            expected = (written, all, dataPath)
        case .truncateData:
            try Data(data.prefix(data.count - 8)).write(to: URL(fileURLWithPath: dataPath))
            expected = (written, all, dataPath)
        case .deleteData:
            try FileManager.default.removeItem(atPath: dataPath)
            expected = (all, all, dataPath)
        case .garbageManifest:
            try Data("{ this is not json".utf8).write(to: URL(fileURLWithPath: statePath))
            expected = ([], [], statePath)
        case .manifestChecksum:
            // Valid JSON, but not what was written: a bit flipped in a flag.
            var text = try String(contentsOfFile: statePath, encoding: .utf8)
            text = text.replacingOccurrences(of: "\"recording\" : true", with: "\"recording\" : false")
            try text.write(toFile: statePath, atomically: false, encoding: .utf8)
            expected = ([], [], statePath)
        case .unknownVersion:
            var manifest = try fixture.manifest()
            manifest["version"] = 99
            try JSONSerialization.data(withJSONObject: manifest).write(to: URL(fileURLWithPath: statePath))
            // A newer format is refused, never rewritten.
            #expect(throws: BitmapError.self) { _ = try fixture.open(size: size) }
            let error = StoreDamageTests.failure { _ = try BitmapStore.open(imagePath: fixture.image, imageSize: size) }
            guard case .storeCorrupt(let path, let reason) = error else {
                Issue.record("expected storeCorrupt, got \(String(describing: error))")
                return
            }
            #expect(path == statePath)
            #expect(reason.contains("99"))
            #expect(!BitmapStore.isLocked(imagePath: fixture.image), "a refused open must release the lock")
            return
        }
        let (_, contents) = try fixture.open(size: size)
        #expect(contents.generation == 1, "damage bumps the generation")
        #expect(contents.problems.contains { $0.contains(expected.path) }, "problems: \(contents.problems)")
        if expected.path == statePath {
            #expect(contents.damaged)
            #expect(contents.bitmaps.isEmpty)
            let aside = try fixture.files().filter { $0.hasPrefix("damaged-") }
            try #require(aside.count == 1)
            let moved = try FileManager.default.contentsOfDirectory(atPath: fixture.store + "/" + aside[0]).sorted()
            #expect(moved.contains("state.json") && moved.contains(dataFiles[0]), "moved: \(moved)")
        } else {
            #expect(!contents.damaged)
            #expect(contents.bitmaps.map(\.name) == ["b0", "b1"])
            #expect(contents.bitmaps.map(\.recording) == [true, true], "names and flags are kept")
            #expect(contents.bitmaps[0].bitmap.runs() == expected.b0)
            #expect(contents.bitmaps[1].bitmap.runs() == expected.b1)
        }
    }

    // MARK: - Journal recovery

    @Test("after an unclean stop every journaled region is fully dirty, the rest stays as saved, generation + 1")
    func journalReplay() throws {
        let fixture = try Fixture()
        let size: UInt64 = 16 * Self.region  // 1 GiB
        let savedWrite: (UInt64, UInt64) = (5 * Self.region + (1 << 20), 4096)
        do {
            let (tracker, _) = try fixture.tracker(size: size)
            try tracker.add(name: "b0", persistent: true)
            try tracker.add(name: "fine", granularity: 4096, persistent: true)
            try tracker.add(name: "off", persistent: true, recording: false)
            try tracker.add(name: "memory", persistent: false)
            // Saved before the crash: region 5 holds one granule, nothing more.
            try Self.write(tracker, savedWrite.0, savedWrite.1)
            try tracker.save()
            // Journaled only (no save afterwards): regions 0, 2, 3 and 15.
            for (offset, length) in [(UInt64(12345), UInt64(100)), (3 * Self.region - 4096, 8192), (size - 1, 1)] {
                let modification = tracker.willModify(offset: offset, length: length)
                defer { tracker.didModify(modification) }
                #expect(modification.journalRegions != nil, "first write into a region of this epoch must journal it")
                if let regions = modification.journalRegions { try tracker.makeDurable(regions) }
            }
            // A second write into a journaled region needs no journal work.
            let second = tracker.willModify(offset: 2 * Self.region + 4096, length: 512)
            tracker.didModify(second)
            #expect(second.journalRegions == nil)
            // Dropped here without a clean save, as SIGKILL would.
        }
        #expect(try fixture.manifest()["cleanShutdown"] as? Bool == false)
        #expect(try fixture.manifest()["generation"] as? Int == 0)

        let expectedDirty = [ByteRun(0, Self.region), ByteRun(2 * Self.region, 2 * Self.region),
                             ByteRun(5 * Self.region + (1 << 20), 65536), ByteRun(15 * Self.region, Self.region)]
        let expectedFine = [ByteRun(0, Self.region), ByteRun(2 * Self.region, 2 * Self.region),
                            ByteRun(5 * Self.region + (1 << 20), 4096), ByteRun(15 * Self.region, Self.region)]
        do {
            let (store, contents) = try fixture.open(size: size)
            #expect(contents.recovered)
            #expect(contents.generation == 1)
            #expect(contents.bitmaps.map(\.name) == ["b0", "fine", "off"])
            #expect(contents.bitmaps[0].bitmap.runs() == expectedDirty)
            #expect(contents.bitmaps[1].bitmap.runs() == expectedFine)
            #expect(contents.bitmaps[2].bitmap.isClean, "a bitmap that was not recording gains nothing")
            let tracker = try DirtyTracker(store: store, contents: contents)
            #expect(tracker.generation == 1)
            #expect(tracker.query().map(\.generation) == [1, 1, 1])
            #expect(try fixture.manifest()["generation"] as? Int == 1, "the recovery is saved at once")
            // Journals of the replayed epochs are gone once the recovered bits are saved.
            let epoch = try #require(fixture.manifest()["epoch"] as? Int)
            let journals = try fixture.files().filter { $0.hasPrefix("journal-") }
            #expect(journals == ["journal-\(epoch).log"])
            try tracker.save(cleanShutdown: true)
        }
        // The recovered dirt was saved; a clean stop adds no generation.
        let (_, contents) = try fixture.open(size: size)
        #expect(!contents.recovered)
        #expect(contents.generation == 1)
        #expect(contents.bitmaps[0].bitmap.runs() == expectedDirty)
        #expect(contents.bitmaps[1].bitmap.runs() == expectedFine)
    }

    @Test("a clean save before the stop: generation unchanged, no region-wide dirt")
    func cleanStopAddsNothing() throws {
        let fixture = try Fixture()
        let size: UInt64 = 8 * Self.region
        let writes: [(UInt64, UInt64)] = [(4096, 512), (3 * Self.region + 100, 1), (size - 4096, 4096)]
        do {
            let (tracker, _) = try fixture.tracker(size: size)
            try tracker.add(name: "b0", persistent: true)
            for (offset, length) in writes { try Self.write(tracker, offset, length) }
            try tracker.save(cleanShutdown: true)
        }
        #expect(try fixture.manifest()["cleanShutdown"] as? Bool == true)
        for round in 1...2 {
            let (store, contents) = try fixture.open(size: size)
            #expect(!contents.recovered, "round \(round)")
            #expect(contents.generation == 0, "round \(round)")
            #expect(contents.bitmaps[0].bitmap == Self.bitmap(size: size, granularity: 65536, writes), "round \(round)")
            let tracker = try DirtyTracker(store: store, contents: contents)
            #expect(tracker.generation == 0)
            try tracker.save(cleanShutdown: true)
        }
    }

    @Test("a store without bitmaps is not written until a persistent bitmap arrives; then it journals and saves")
    func storeWithoutBitmapsStaysUntouched() throws {
        let fixture = try Fixture()
        let size: UInt64 = 4 * Self.region
        do {
            let (tracker, _) = try fixture.tracker(size: size)
            try tracker.add(name: "scratch", persistent: false)
            try Self.write(tracker, 0, 4096)
            try tracker.saveIfNeeded()
            try tracker.save(cleanShutdown: true)
        }
        #expect(try fixture.files() == ["lock"], "opening, writing and a clean stop wrote nothing")
        do {
            let (tracker, contents) = try fixture.tracker(size: size)
            #expect(contents.bitmaps.isEmpty && !contents.recovered)
            try tracker.add(name: "b0", persistent: true)
            #expect(try fixture.manifest()["cleanShutdown"] as? Bool == false, "adding it marked the store in use")
            try Self.write(tracker, Self.region, 512)
            // No clean save: the stop is unclean, and the journal must carry the write.
        }
        let (_, contents) = try fixture.open(size: size)
        #expect(contents.recovered)
        #expect(contents.bitmaps.map(\.name) == ["b0"])
        #expect(contents.bitmaps[0].bitmap == Self.bitmap(size: size, granularity: 65536, [(Self.region, Self.region)]))
    }

    @Test("unclean stops without writes: generation counts them, no dirt appears")
    func uncleanWithoutWrites() throws {
        let fixture = try Fixture()
        let size: UInt64 = 4 * Self.region
        do {
            let (tracker, _) = try fixture.tracker(size: size)
            try tracker.add(name: "b0", persistent: true)
        }
        for expected in 1...2 {
            let (store, contents) = try fixture.open(size: size)
            #expect(contents.recovered)
            #expect(contents.generation == UInt64(expected))
            #expect(contents.bitmaps[0].bitmap.isClean)
            _ = try DirtyTracker(store: store, contents: contents)
        }
    }

    @Test("journal replay ignores a torn last record and journals of older epochs")
    func journalTornTail() throws {
        let fixture = try Fixture()
        let size: UInt64 = 8 * Self.region
        do {
            let (tracker, _) = try fixture.tracker(size: size)
            try tracker.add(name: "b0", persistent: true)
            try Self.write(tracker, Self.region + 1, 1)  // journals region 1
        }
        let epoch = try #require(fixture.manifest()["epoch"] as? Int)
        #expect(epoch >= 1)
        let journal = fixture.store + "/journal-\(epoch).log"
        let handle = try #require(FileHandle(forWritingAtPath: journal))
        try handle.seekToEnd()
        // The first 11 bytes of a record that would name region 6: a torn append.
        var torn: [UInt8] = []
        withUnsafeBytes(of: UInt64(6).littleEndian) { torn += $0 }
        torn += [1, 2, 3]
        try handle.write(contentsOf: Data(torn))
        try handle.close()
        // A leftover journal of an older epoch naming region 7.
        var stale: [UInt8] = []
        withUnsafeBytes(of: UInt64(7).littleEndian) { stale += $0 }
        try Data(stale).write(to: URL(fileURLWithPath: fixture.store + "/journal-\(epoch - 1).log"))

        let (_, contents) = try fixture.open(size: size)
        #expect(contents.recovered)
        #expect(contents.problems.isEmpty, "problems: \(contents.problems)")
        #expect(contents.generation == 1)
        #expect(contents.bitmaps[0].bitmap.runs() == [ByteRun(Self.region, Self.region)])
    }
}

/// Damaged stores found by the FuzzStore harness (Fuzz/, README "Fuzzing").
@Suite("Fuzz regressions: bitmap store")
struct StoreFuzzRegressionTests {
    /// A 1 GiB image's store with b0 saved, then a write at 700 MiB journaled but never
    /// saved: the process "crashes" with the tracker gone.
    static func crashedStore() throws -> (PersistenceTests.Fixture, UInt64) {
        let fixture = try PersistenceTests.Fixture()
        let size: UInt64 = 1 << 30
        let (tracker, _) = try fixture.tracker(size: size)
        try tracker.add(name: "b0", persistent: true)
        try tracker.save()
        try PersistenceTests.write(tracker, 700 << 20, 65536)
        return (fixture, size)
    }

    /// FuzzStore: a crashed store whose journal was deleted loaded as a recovery with none of
    /// the journaled writes: fewer bits than the store held, and nothing said so. Now the
    /// writes since the last save are unknown, so the bitmap loads entirely dirty, and the
    /// problem names the journal.
    @Test("a crashed store without its journal loads entirely dirty and says so, not loaded short")
    func missingJournalAfterCrash() throws {
        let (fixture, size) = try Self.crashedStore()
        let journals = try fixture.files().filter { $0.hasPrefix("journal-") }
        #expect(!journals.isEmpty)
        for name in journals { try FileManager.default.removeItem(atPath: fixture.store + "/" + name) }
        let (_, contents) = try fixture.open(size: size)
        #expect(contents.recovered)
        #expect(contents.problems.contains { $0.contains("journal") }, "problems: \(contents.problems)")
        let bitmap = try #require(contents.bitmaps.first { $0.name == "b0" })
        #expect(bitmap.bitmap.dirtyBytes == size, "every granule dirty")
    }

    @Test("the same crashed store with its journal loads the journaled writes")
    func journalPresentAfterCrash() throws {
        let (fixture, size) = try Self.crashedStore()
        let (_, contents) = try fixture.open(size: size)
        #expect(contents.recovered)
        let bitmap = try #require(contents.bitmaps.first { $0.name == "b0" })
        #expect(bitmap.bitmap.isDirty(granule: Int((700 << 20) / bitmap.bitmap.granularity)))
    }
}

/// Edits of `state.json` found by FuzzStore (seeded with targeted edits of a valid store).
@Suite("Fuzz regressions: bitmap store manifest")
struct StoreManifestFuzzRegressionTests {
    /// Makes a saved store with bitmaps b0 and b1 (same granularity), applies `edit` to its
    /// state.json text, and reopens it.
    static func reopen(after edit: (String) -> String) throws -> Result<BitmapStore.Contents, any Error> {
        let fixture = try PersistenceTests.Fixture()
        let size: UInt64 = 1 << 30
        do {
            let (tracker, _) = try fixture.tracker(size: size)
            try tracker.add(name: "b0", persistent: true)
            try tracker.add(name: "b1", persistent: true)
            try PersistenceTests.write(tracker, 0, 4096)
            try tracker.save(cleanShutdown: true)
        }
        let path = fixture.store + "/state.json"
        let text = try String(contentsOfFile: path, encoding: .utf8)
        let edited = edit(text)
        #expect(edited != text)
        try edited.write(toFile: path, atomically: true, encoding: .utf8)
        return Result { try fixture.open(size: size).1 }
    }

    /// The edited manifest was not trusted: the store started over (old files moved aside,
    /// nothing loaded as clean) and said why.
    static func isCorrupt(_ result: Result<BitmapStore.Contents, any Error>) -> Bool {
        guard case .success(let contents) = result else { return false }
        return contents.damaged && contents.bitmaps.isEmpty && !contents.problems.isEmpty
    }

    @Test("two bitmaps of the same name: the store starts over, not loaded twice")
    func duplicateNames() throws {
        let result = try Self.reopen { $0.replacingOccurrences(of: "\"b0\"", with: "\"b1\"") }
        #expect(Self.isCorrupt(result))
    }

    @Test("a wordCount whose byte count overflows: the store starts over, not a trap")
    func hugeWordCount() throws {
        let result = try Self.reopen {
            $0.replacingOccurrences(of: "\"wordCount\" : 256", with: "\"wordCount\" : 2305843009213693952")
        }
        #expect(Self.isCorrupt(result))
    }

    @Test("an epoch or generation at the top of UInt64: the store starts over, not a trap at the next save")
    func countersOutOfRange() throws {
        let epoch = try Self.reopen {
            $0.replacingOccurrences(of: #""epoch" : \d+"#, with: "\"epoch\" : 18446744073709551615", options: .regularExpression)
        }
        #expect(Self.isCorrupt(epoch))
        let generation = try Self.reopen {
            $0.replacingOccurrences(of: #""generation" : \d+"#, with: "\"generation\" : 18446744073709551615", options: .regularExpression)
        }
        #expect(Self.isCorrupt(generation))
    }
}
