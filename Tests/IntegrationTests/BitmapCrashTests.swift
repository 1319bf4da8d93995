import Foundation
import NBDClient
import Testing
import TestSupport

/// SIGKILL while writes are in flight: after the restart, every granule whose bytes
/// changed must be dirty in the recovered bitmap, and the store's generation counts the
/// unclean stop.
@Suite("Bitmap crash recovery", .serialized)
struct BitmapCrashTests {
    static let region: UInt64 = 64 << 20
    /// 8 journal regions; writes go to 3 of them, so recovery must not dirty the others.
    static let size: UInt64 = 8 * region
    /// Written first, then FLUSHed (which saves the bits): not journaled when the kill comes.
    static let savedRegion: UInt64 = 1
    /// Written by the writers that are running when the kill comes.
    static let hotRegions: [UInt64] = [4, 7]
    static let writtenRegions: [UInt64] = [savedRegion] + hotRegions
    static let granule: UInt64 = 65536
    static let context = BitmapMaps.context("b0")

    /// Counts completed commands across writer threads.
    final class Progress: @unchecked Sendable {
        private let lock = NSLock()
        private var completed = 0
        private var stopped = false

        func complete() {
            lock.lock()
            completed += 1
            lock.unlock()
        }

        var count: Int {
            lock.lock()
            defer { lock.unlock() }
            return completed
        }

        func stop() {
            lock.lock()
            stopped = true
            lock.unlock()
        }

        var isStopped: Bool {
            lock.lock()
            defer { lock.unlock() }
            return stopped
        }
    }

    /// One writer: random writes, zeroes, trims, FUA writes and flushes inside the hot
    /// regions (never across a region edge), until the connection dies.
    static func writeUntilDead(_ connection: NBDConnection, seed: UInt64, progress: Progress) {
        var generator = SeededGenerator(seed: seed)
        while !progress.isStopped {
            let region = hotRegions[Int(generator.next() % UInt64(hotRegions.count))]
            let length = (generator.next() % 512 + 1) * 512  // 512 B ... 256 KiB
            let offset = region * Self.region + (generator.next() % ((Self.region - length) / 512 + 1)) * 512
            let choice = generator.next() % 100
            do {
                switch choice {
                case 0..<65:
                    let byte = UInt8(truncatingIfNeeded: generator.next()) | 1
                    try connection.pwrite([UInt8](repeating: byte, count: Int(length)), offset: offset)
                case 65..<75:
                    try connection.pwrite([UInt8](repeating: 0xEE, count: Int(length)), offset: offset, flags: [.fua])
                case 75..<85:
                    try connection.zero(count: length, offset: offset)
                case 85..<95:
                    try connection.trim(count: length, offset: offset)
                default:
                    // Saves the bitmap and starts a new journal epoch.
                    try connection.flush()
                }
            } catch {
                return  // the server is gone
            }
            progress.complete()
        }
    }

    @Test("SIGKILL during writes: every changed granule is dirty after the restart, generation 1")
    func sigkillDuringWrites() throws {
        let seed = ProcessInfo.processInfo.environment["TIDEMARK_CRASH_SEED"].flatMap { UInt64($0) }
            ?? UInt64.random(in: 1..<UInt64.max)
        let context = "seed \(seed) (rerun with TIDEMARK_CRASH_SEED=\(seed))"
        var generator = SeededGenerator(seed: seed)
        let directory = try TestDirectory()
        let image = directory.file("image.raw")
        try ImageFile.createSparse(image, size: Int(Self.size))
        // Some data before the writes, so trims and zeroes change content too.
        let handle = try #require(FileHandle(forWritingAtPath: image))
        for region in Self.writtenRegions {
            try handle.seek(toOffset: region * Self.region + (3 << 20))
            try handle.write(contentsOf: Data(ImageFile.pattern(count: 2 << 20, offset: 0, seed: UInt8(region))))
        }
        try handle.close()
        let copy = directory.file("before.raw")
        try ExternalTool.check("cp", ["--sparse=always", image, copy])

        let server = try TidemarkProcess.serve(image: image, in: directory, extraArguments: ["--bitmap", "b0"])

        // Phase 1: a few writes into the saved region, then FLUSH, which saves the bits.
        var savedGranules = Set<UInt64>()
        let first = try server.connect(export: "disk")
        for index in 0..<24 {
            let length = (generator.next() % 300 + 1) * 512
            let offset = Self.savedRegion * Self.region + (generator.next() % ((Self.region - length) / 512 + 1)) * 512
            switch index % 4 {
            case 0, 1: try first.pwrite([UInt8](repeating: UInt8(index * 2 + 1), count: Int(length)), offset: offset)
            case 2: try first.zero(count: length, offset: offset)
            default: try first.trim(count: length, offset: offset)
            }
            for granule in (offset / Self.granule)...((offset + length - 1) / Self.granule) { savedGranules.insert(granule) }
        }
        try first.flush()
        try first.shutdown()

        // Phase 2: writers in the hot regions until the server is killed.
        let progress = Progress()
        let group = DispatchGroup()
        var connections: [NBDConnection] = []
        for index in 0..<3 {
            let connection = try server.connect(export: "disk")
            connections.append(connection)
            let writerSeed = seed &+ UInt64(index) &* 0x9E37_79B9
            group.enter()
            Thread.detachNewThread {
                Self.writeUntilDead(connection, seed: writerSeed, progress: progress)
                group.leave()
            }
        }
        // Let the writers get going, then kill at a random moment.
        let started = Date()
        while progress.count < 40 && Date().timeIntervalSince(started) < 20 { usleep(2_000) }
        usleep(useconds_t(generator.next() % 400_000))
        let completedAtKill = progress.count
        let termination = try server.stop(signal: SIGKILL, timeout: 10)
        progress.stop()
        #expect(termination == TidemarkProcess.Termination(exited: false, status: SIGKILL), "\(context)")
        #expect(group.wait(timeout: .now() + 30) == .success, "writers did not stop after the kill; \(context)")
        #expect(completedAtKill >= 40, "only \(completedAtKill) commands completed before the kill; \(context)")
        let stateAfterKill = try BitmapStoreFiles.state(image: image)
        #expect(stateAfterKill["cleanShutdown"] as? Bool == false, "\(context)")
        #expect((stateAfterKill["generation"] as? NSNumber)?.intValue == 0, "\(context)")

        let restarted = try TidemarkProcess.serve(image: image, in: directory, extraArguments: ["--bitmap", "b0"])
        let state = try BitmapStoreFiles.state(image: image)
        #expect((state["generation"] as? NSNumber)?.intValue == 1, "state.json after recovery: \(state); \(context)")
        #expect(restarted.serverLog.contains("unclean"), "the recovery is logged:\n\(restarted.serverLog)")
        let reader = try restarted.connect(export: "disk") { $0.metaContexts = [Self.context] }
        let map = try BitmapMaps.map(reader, context: Self.context, size: Self.size)

        let changed = try BitmapImages.differingGranules(image, copy, granule: Int(Self.granule))
        #expect(!changed.isEmpty, "no granule changed: the writes did not land; \(context)")
        var missing: [Int] = []
        for index in changed {
            let offset = UInt64(index) * Self.granule
            if !BitmapMaps.isDirty(map, offset: offset, length: min(Self.granule, Self.size - offset)) {
                missing.append(index)
            }
        }
        #expect(missing.isEmpty,
            "\(missing.count) of \(changed.count) changed granules are clean in the recovered bitmap, first at byte \(missing.first.map { UInt64($0) * Self.granule } ?? 0); \(context)")
        // Recovery widens to whole regions, but only to regions that were written.
        var dirtyInSavedRegion = Set<UInt64>()
        for extent in BitmapMaps.dirtyRuns(map) {
            let first = extent.offset / Self.region
            let last = (extent.end - 1) / Self.region
            #expect(Self.writtenRegions.contains(first) && Self.writtenRegions.contains(last),
                "dirty extent \(extent) lies outside the written regions \(Self.writtenRegions); \(context)")
            for granule in (extent.offset / Self.granule)...((extent.end - 1) / Self.granule)
            where granule / (Self.region / Self.granule) == Self.savedRegion {
                dirtyInSavedRegion.insert(granule)
            }
        }
        // The saved region was not journaled in the epoch that crashed: its bits are the
        // saved ones, exactly the granules phase 1 touched.
        #expect(dirtyInSavedRegion == savedGranules,
            "saved region: \(dirtyInSavedRegion.subtracting(savedGranules).sorted().prefix(5)) dirty but never written, \(savedGranules.subtracting(dirtyInSavedRegion).sorted().prefix(5)) written but clean; \(context)")
        try reader.shutdown()

        // A clean stop after the recovery keeps the generation and the dirt.
        #expect(try restarted.stop() == .success)
        let final = try BitmapStoreFiles.state(image: image)
        #expect(final["cleanShutdown"] as? Bool == true)
        #expect((final["generation"] as? NSNumber)?.intValue == 1)
        let again = try TidemarkProcess.serve(image: image, in: directory)
        let check = try again.connect(export: "disk") { $0.metaContexts = [Self.context] }
        #expect(try BitmapMaps.map(check, context: Self.context, size: Self.size) == map, "\(context)")
        try check.shutdown()
        #expect(try again.stop() == .success)
        withExtendedLifetime(connections) {}
    }
}

