import DirtyTracking
import Foundation
import Testing

/// A store that cannot prove itself complete loads as dirty, never as "nothing changed";
/// a full disk makes saves and operations fail without changing anything.
@Suite("Bitmap store damage and full disks", .serialized)
struct StoreDamageTests {
    typealias Fixture = PersistenceTests.Fixture
    static let region = BitmapStore.regionSize
    static let size: UInt64 = 8 * region

    /// A store with b0 (recording), off (not recording) and a pending increment c1, then
    /// writes at 1 MiB (saved into c1), and, unsaved, at region 3 and region 6: stopped
    /// uncleanly.
    static func crashedStore(_ fixture: Fixture) throws -> Int {
        let (tracker, _) = try fixture.tracker(size: size)
        try tracker.add(name: "b0", persistent: true)
        try tracker.add(name: "off", persistent: true, recording: false)
        try PersistenceTests.write(tracker, 1 << 20, 4096)
        try tracker.perform([.createCheckpoint(bitmap: "b0", increment: "c1", consume: false)])
        try PersistenceTests.write(tracker, 3 * region + 100, 1)
        try PersistenceTests.write(tracker, 6 * region, 1)
        return try #require(fixture.manifest()["epoch"] as? Int)
    }

    enum JournalDamage: String, CaseIterable, CustomTestStringConvertible {
        case deleted, garbageHeader, garbageRecord, truncatedToZero
        var testDescription: String { rawValue }
    }

    @Test("a damaged or missing journal after an unclean stop: every recording bitmap and increment entirely dirty, generation + 1",
          arguments: JournalDamage.allCases)
    func journalDamage(damage: JournalDamage) throws {
        let fixture = try Fixture()
        let epoch = try Self.crashedStore(fixture)
        let journal = fixture.store + "/journal-\(epoch).log"
        var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: journal)))
        #expect(bytes.count == 32 + 2 * 16, "header and two records (regions 3 and 6)")
        switch damage {
        case .deleted: try FileManager.default.removeItem(atPath: journal)
        case .garbageHeader:
            for index in 0..<8 { bytes[index] = 0x41 }
            try Data(bytes).write(to: URL(fileURLWithPath: journal))
        case .garbageRecord:
            bytes[32 + 3] ^= 0x01  // the first record's region id
            try Data(bytes).write(to: URL(fileURLWithPath: journal))
        case .truncatedToZero: try Data().write(to: URL(fileURLWithPath: journal))
        }
        let (store, contents) = try fixture.open(size: Self.size)
        #expect(contents.recovered)
        #expect(contents.generation == 1)
        #expect(contents.problems.contains { $0.contains(journal) }, "problems: \(contents.problems)")
        #expect(contents.bitmaps.map(\.name) == ["b0", "off", "c1"])
        #expect(contents.bitmaps[0].bitmap.runs() == [ByteRun(0, Self.size)], "recording: entirely dirty")
        #expect(contents.bitmaps[1].bitmap.isClean, "not recording: nothing could have been missed")
        #expect(contents.bitmaps[2].bitmap.runs() == [ByteRun(0, Self.size)], "pending increment: entirely dirty")
        let tracker = try DirtyTracker(store: store, contents: contents)
        #expect(tracker.query().map(\.generation) == [1, 1, 1])
    }

    @Test("an intact journal after the same crash recovers only the journaled regions")
    func journalIntact() throws {
        let fixture = try Fixture()
        _ = try Self.crashedStore(fixture)
        let (_, contents) = try fixture.open(size: Self.size)
        #expect(contents.problems.isEmpty)
        #expect(contents.generation == 1)
        #expect(contents.bitmaps[0].bitmap.runs() == [ByteRun(3 * Self.region, Self.region), ByteRun(6 * Self.region, Self.region)])
        #expect(contents.bitmaps[2].bitmap.runs() == [ByteRun(1 << 20, 65536)])
    }

    @Test("state.json deleted beside other store files: they are moved aside, a fresh store starts above the old generation, new bitmaps start entirely dirty")
    func manifestDeleted() throws {
        let fixture = try Fixture()
        _ = try Self.crashedStore(fixture)
        let before = try fixture.files().filter { $0 != "lock" }
        try FileManager.default.removeItem(atPath: fixture.store + "/state.json")
        do {
            let (store, contents) = try fixture.open(size: Self.size)
            #expect(contents.damaged)
            #expect(contents.bitmaps.isEmpty)
            #expect(contents.generation >= 1, "above the journal's generation 0")
            #expect(contents.problems.count == 1)
            #expect(contents.problems.first?.contains("state.json") == true)
            let aside = try fixture.files().filter { $0.hasPrefix("damaged-") }
            try #require(aside.count == 1)
            let moved = try FileManager.default.contentsOfDirectory(atPath: fixture.store + "/" + aside[0]).sorted()
            #expect(moved == before.filter { $0 != "state.json" }.sorted(), "evidence kept, not deleted")
            let tracker = try DirtyTracker(store: store, contents: contents)
            try tracker.addEntirelyDirty(name: "b0")
            #expect(try PersistenceTests.dirtyRuns(tracker, "b0") == [ByteRun(0, Self.size)])
            #expect(tracker.generation == contents.generation)
        }
        // The fresh store is a normal store now, with the dirt saved.
        let (_, contents) = try fixture.open(size: Self.size)
        #expect(!contents.damaged)
        #expect(contents.bitmaps.map(\.name) == ["b0"])
        #expect(contents.bitmaps[0].bitmap.runs() == [ByteRun(0, Self.size)])
    }

    enum Implausible: String, CaseIterable, CustomTestStringConvertible {
        case hugeGeneration, hugeEpoch, hugeCheckpointCount, nameTwice
        var testDescription: String { rawValue }
    }

    @Test("a manifest no real store writes (counters near 2^64, a bitmap listed twice): the store starts over instead of trapping later",
          arguments: Implausible.allCases)
    func implausibleManifest(kind: Implausible) throws {
        let fixture = try Fixture()
        try FileManager.default.createDirectory(atPath: fixture.store, withIntermediateDirectories: true)
        let words = Int(Self.size / 65536 / 64)
        try Data(count: 2 * words * 8).write(to: URL(fileURLWithPath: fixture.store + "/bitmaps-4.dat"))
        let zeroChecksum = (0..<(words * 8)).reduce(UInt64(0xcbf2_9ce4_8422_2325)) { hash, _ in hash &* 0x100_0000_01b3 }
        let entry = { (name: String) in
            #"{"name": "\#(name)", "granularity": 65536, "recording": true, "wordCount": \#(words), "checksum": \#(zeroChecksum)}"#
        }
        var epoch: UInt64 = 4
        var generation: UInt64 = 2
        var counter: UInt64 = 0
        var names = ["b0", "b1"]
        switch kind {
        case .hugeGeneration: generation = .max
        case .hugeEpoch: epoch = 1 << 63
        case .hugeCheckpointCount: counter = .max
        case .nameTwice: names = ["b0", "b0"]
        }
        let manifest = """
            {"version": 1, "imageSize": \(Self.size), "epoch": \(epoch), "generation": \(generation), "cleanShutdown": true,
             "dataFile": "bitmaps-4.dat", "checkpointCounter": \(counter),
             "bitmaps": [\(names.map(entry).joined(separator: ", "))]}
            """
        try Data(manifest.utf8).write(to: URL(fileURLWithPath: fixture.store + "/state.json"))

        let (store, contents) = try fixture.open(size: Self.size)
        #expect(contents.damaged, "problems: \(contents.problems)")
        #expect(contents.bitmaps.isEmpty)
        #expect(contents.generation >= 1 && contents.generation < 1 << 62)
        #expect(contents.checkpointCounter < 1 << 62)
        // The fresh store saves, recovers and names checkpoints without overflowing.
        let tracker = try DirtyTracker(store: store, contents: contents)
        try tracker.add(name: "b0", persistent: true)
        try tracker.save(cleanShutdown: true)
        #expect(tracker.nextCheckpointName().hasPrefix("c"))
    }

    @Test("a store written in format 1 (no checksums, bare journal) still loads and replays; the next save writes format 2")
    func formatOne() throws {
        let fixture = try Fixture()
        try FileManager.default.createDirectory(atPath: fixture.store, withIntermediateDirectories: true)
        var words = [UInt64](repeating: 0, count: Int(Self.size / 65536 / 64))
        words[0] = 1  // granule 0
        var data: [UInt8] = []
        for word in words { withUnsafeBytes(of: word.littleEndian) { data += $0 } }
        try Data(data).write(to: URL(fileURLWithPath: fixture.store + "/bitmaps-4.dat"))
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in data {
            hash ^= UInt64(byte)
            hash = hash &* 0x100_0000_01b3
        }
        let manifest = """
            {"version": 1, "imageSize": \(Self.size), "epoch": 4, "generation": 2, "cleanShutdown": false,
             "dataFile": "bitmaps-4.dat",
             "bitmaps": [{"name": "b0", "granularity": 65536, "recording": true, "wordCount": \(words.count), "checksum": \(hash)}]}
            """
        try Data(manifest.utf8).write(to: URL(fileURLWithPath: fixture.store + "/state.json"))
        var journal: [UInt8] = []
        withUnsafeBytes(of: UInt64(5).littleEndian) { journal += $0 }
        try Data(journal).write(to: URL(fileURLWithPath: fixture.store + "/journal-4.log"))

        let (store, contents) = try fixture.open(size: Self.size)
        #expect(contents.problems.isEmpty, "problems: \(contents.problems)")
        #expect(contents.generation == 3)
        #expect(contents.bitmaps[0].bitmap.runs() == [ByteRun(0, 65536), ByteRun(5 * Self.region, Self.region)])
        _ = try DirtyTracker(store: store, contents: contents)
        #expect(try fixture.manifest()["version"] as? Int == 2)
        #expect(try fixture.manifest()["manifestChecksum"] is String)
    }

    // MARK: - Full disk

    /// The error `body` throws, nil when it succeeds.
    static func failure(_ body: () throws -> Void) -> BitmapError? {
        do {
            try body()
            return nil
        } catch {
            return error as? BitmapError
        }
    }

    /// A small tmpfs mounted for one test: a file system that really fills up.
    final class SmallFileSystem {
        let path: String
        private let directory: TemporaryDirectory
        private var mounted = false

        init(megabytes: Int) throws {
            directory = try TemporaryDirectory()
            path = directory.file("fs")
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: false)
            try Self.run("/usr/bin/mount", ["-t", "tmpfs", "-o", "size=\(megabytes)m", "tmpfs", path])
            mounted = true
        }

        deinit {
            if mounted { try? Self.run("/usr/bin/umount", [path]) }
        }

        /// Fills the file system with a filler file, to the last block. The descriptor is
        /// close-on-exec: a process another test starts meanwhile must not inherit it, or
        /// it keeps the removed filler's blocks in use and `free()` frees nothing.
        func fill() throws {
            let descriptor = open(path + "/filler", O_WRONLY | O_CREAT | O_CLOEXEC, 0o644)
            guard descriptor >= 0 else { throw TestFailure("cannot create the filler: errno \(errno)") }
            defer { close(descriptor) }
            let chunk = [UInt8](repeating: 0x55, count: 4096)
            while chunk.withUnsafeBytes({ write(descriptor, $0.baseAddress, $0.count) }) > 0 {}
        }

        func free() throws { try FileManager.default.removeItem(atPath: path + "/filler") }

        static func run(_ tool: String, _ arguments: [String]) throws {
            let process = Process()
            process.executableURL = URL(fileURLWithPath: tool)
            process.arguments = arguments
            try process.run()
            process.waitUntilExit()
            guard process.terminationStatus == 0 else {
                throw TestFailure("\(tool) \(arguments.joined(separator: " ")) failed with \(process.terminationStatus)")
            }
        }
    }

    @Test("full disk: writes keep being journaled, a failed save or operation changes nothing and leaves no file, then saves resume")
    func fullDisk() throws {
        let fs = try SmallFileSystem(megabytes: 2)
        let image = fs.path + "/disk.img"
        let size: UInt64 = 64 * Self.region  // 4 GiB, sparse: the store does not care
        let (store, contents) = try BitmapStore.open(imagePath: image, imageSize: size)
        let tracker = try DirtyTracker(store: store, contents: contents)
        try tracker.add(name: "b0", persistent: true)
        try tracker.add(name: "b1", granularity: 4096, persistent: true)
        try PersistenceTests.write(tracker, 1 << 20, 4096)
        try tracker.perform([.createCheckpoint(bitmap: "b0", increment: "c1", consume: false)])
        let storeDirectory = BitmapStore.directory(forImage: image)
        let filesBefore = try FileManager.default.contentsOfDirectory(atPath: storeDirectory).sorted()
        let manifestBefore = try Data(contentsOf: URL(fileURLWithPath: storeDirectory + "/state.json"))
        let infoBefore = tracker.query()

        try fs.fill()
        // The journal's blocks are reserved: a write into a new region still journals.
        try PersistenceTests.write(tracker, 40 * Self.region, 512)
        let saveError = Self.failure { try tracker.save() }
        #expect(saveError?.isOutOfSpace == true, "\(String(describing: saveError))")
        // Operations that must save fail, and change nothing.
        #expect(throws: BitmapError.self) { try tracker.perform([.completeCheckpoint(increment: "c1")]) }
        #expect(throws: BitmapError.self) { try tracker.remove(name: "b1") }
        #expect(throws: BitmapError.self) { try tracker.clear(name: "b0") }
        #expect(throws: BitmapError.self) { try tracker.add(name: "new", persistent: true) }
        #expect(tracker.query().map(\.name) == ["b0", "b1", "c1"])
        #expect(tracker.query().map(\.count) == [65536, 2 * 4096, 65536], "\(tracker.query()) before \(infoBefore)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: storeDirectory).sorted() == filesBefore,
                "a failed save leaves no new file")
        #expect(try Data(contentsOf: URL(fileURLWithPath: storeDirectory + "/state.json")) == manifestBefore)
        // Writes after the failures are still recorded, and still journaled.
        try PersistenceTests.write(tracker, 50 * Self.region, 512)
        #expect(try PersistenceTests.dirtyRuns(tracker, "b1").contains(ByteRun(50 * Self.region, 4096)))

        try fs.free()
        try tracker.perform([.completeCheckpoint(increment: "c1")])
        #expect(tracker.query().map(\.name) == ["b0", "b1"])
        let journals = try FileManager.default.contentsOfDirectory(atPath: storeDirectory).filter { $0.hasPrefix("journal-") }
        #expect(journals.count == 1, "\(journals)")
        try tracker.save(cleanShutdown: true)
    }

    @Test("a full disk while saves fail, then a crash: the journal still recovers every write")
    func fullDiskThenCrash() throws {
        let fs = try SmallFileSystem(megabytes: 2)
        let image = fs.path + "/disk.img"
        let size: UInt64 = 64 * Self.region
        do {
            let (store, contents) = try BitmapStore.open(imagePath: image, imageSize: size)
            let tracker = try DirtyTracker(store: store, contents: contents)
            try tracker.add(name: "b0", persistent: true)
            try fs.fill()
            try PersistenceTests.write(tracker, 10 * Self.region, 512)
            #expect(throws: BitmapError.self) { try tracker.save() }
            try PersistenceTests.write(tracker, 20 * Self.region, 512)
            #expect(throws: BitmapError.self) { try tracker.remove(name: "b0") }
            try PersistenceTests.write(tracker, 30 * Self.region, 512)
            // Dropped without a save: a crash.
        }
        try fs.free()
        let (_, contents) = try BitmapStore.open(imagePath: image, imageSize: size)
        #expect(contents.problems.isEmpty, "problems: \(contents.problems)")
        #expect(contents.bitmaps.map(\.name) == ["b0"])
        #expect(contents.bitmaps[0].bitmap.runs() == [10, 20, 30].map { ByteRun($0 * Self.region, Self.region) })
    }
}
