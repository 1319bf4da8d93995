#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import FoundationEssentials
#endif
#if canImport(Glibc)
import Glibc
#endif

/// The sidecar folder (`IMAGE.tidemark/`) that makes bitmaps persistent and crash-safe,
/// for raw files and block devices alike.
///
/// Files: `state.json` (manifest), `bitmaps-EPOCH.dat` (the bits as of the last save),
/// `journal-EPOCH.log` (ids of coarse regions written since), and `lock` (held by the
/// process that owns the store). Every save starts a new journal epoch; after an unclean
/// stop, every region in the journals of unfinished epochs is marked dirty, so the loaded
/// bitmaps are always a superset of the true changes.
public final class BitmapStore: @unchecked Sendable {
    // @unchecked: `journalDescriptor` is only touched under `journalLock` in
    // `appendToJournal` and `startJournal`; everything else is immutable.

    /// Bytes covered by one journal record: the first write into such a region in an epoch
    /// costs one durable journal append; later writes there cost nothing.
    public static let regionSize: UInt64 = 64 << 20

    public let directory: String
    public let imageSize: UInt64
    private let lockDescriptor: Int32
    private var journalDescriptor: Int32 = -1

    /// What was found on disk when the store was opened.
    public struct Contents: Sendable {
        public struct Bitmap: Sendable {
            public var name: String
            public var bitmap: DirtyBitmap
            public var recording: Bool
            /// Set for a checkpoint increment still pending completion.
            public var checkpointOf: String?
            public var consumed: Bool
            public var lineage = CheckpointLineage()
            public var checkpointID: String? = nil
            public var abortOnDisconnect = true
        }
        public var bitmaps: [Bitmap]
        public var generation: UInt64
        public var epoch: UInt64
        /// True when the previous owner did not stop cleanly and journals were replayed.
        public var recovered: Bool
        /// The highest default checkpoint number handed out in the store's life.
        public var checkpointCounter: UInt64 = 0
    }

    /// The sidecar folder for an image.
    public static func directory(forImage path: String) -> String { path + ".tidemark" }

    /// Opens (creating if needed) and locks the store.
    /// - Throws: `.storeLocked` when another process holds it; `.storeCorrupt` when its
    ///   files are damaged or describe an image of another size.
    public static func open(imagePath: String, imageSize: UInt64) throws(BitmapError) -> (BitmapStore, Contents) {
        let directory = Self.directory(forImage: imagePath)
        if mkdir(directory, 0o755) != 0 && errno != EEXIST {
            throw .storeIOFailed(path: directory, reason: "cannot create: \(FileIO.describe(errno))")
        }
        let lockPath = directory + "/lock"
        let lockFD = Glibc.open(lockPath, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard lockFD >= 0 else { throw .storeIOFailed(path: lockPath, reason: "cannot open: \(FileIO.describe(errno))") }
        guard flock(lockFD, LOCK_EX | LOCK_NB) == 0 else {
            close(lockFD)
            throw .storeLocked(path: directory)
        }
        let store = BitmapStore(directory: directory, imageSize: imageSize, lockDescriptor: lockFD)
        let contents = try store.load()
        return (store, contents)
    }

    /// True when a running process holds the store of this image.
    public static func isLocked(imagePath: String) -> Bool {
        let lockPath = directory(forImage: imagePath) + "/lock"
        let fd = Glibc.open(lockPath, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        return flock(fd, LOCK_EX | LOCK_NB) != 0
    }

    private init(directory: String, imageSize: UInt64, lockDescriptor: Int32) {
        self.directory = directory
        self.imageSize = imageSize
        self.lockDescriptor = lockDescriptor
    }

    deinit {
        if journalDescriptor >= 0 { close(journalDescriptor) }
        close(lockDescriptor)
    }

    private var statePath: String { directory + "/state.json" }
    private func journalPath(_ epoch: UInt64) -> String { directory + "/journal-\(epoch).log" }
    private func dataPath(_ name: String) -> String { directory + "/" + name }

    // MARK: - Loading and recovery

    private func load() throws(BitmapError) -> Contents {
        guard let bytes = try FileIO.readFile(statePath) else {
            return Contents(bitmaps: [], generation: 0, epoch: 0, recovered: false)
        }
        let state: StoredState
        do {
            state = try JSONDecoder().decode(StoredState.self, from: Data(bytes))
        } catch {
            throw .storeCorrupt(path: statePath, reason: "unreadable manifest: \(error)")
        }
        guard state.version == StoredState.currentVersion else {
            throw .storeCorrupt(path: statePath, reason: "unknown format version \(state.version)")
        }
        guard state.imageSize == imageSize else {
            throw .storeCorrupt(
                path: statePath,
                reason: "it describes an image of \(state.imageSize) bytes but the image has \(imageSize)")
        }
        // Counters far beyond any real store's: the tracker increments them (epoch at every
        // save), and an overflow would trap.
        let counterLimit: UInt64 = 1 << 62
        guard state.epoch < counterLimit, state.generation < counterLimit, (state.checkpointCounter ?? 0) < counterLimit else {
            throw .storeCorrupt(path: statePath, reason: "epoch, generation or checkpoint counter out of range")
        }
        var bitmaps: [Contents.Bitmap] = []
        if !state.bitmaps.isEmpty {
            let path = dataPath(state.dataFile)
            guard !state.dataFile.contains("/"), let data = try FileIO.readFile(path) else {
                throw .storeCorrupt(path: path, reason: "bitmap data file is missing")
            }
            var position = 0
            for entry in state.bitmaps {
                // Checked before multiplying: a huge wordCount must not overflow.
                guard entry.wordCount >= 0, entry.wordCount <= (data.count - position) / 8 else {
                    throw .storeCorrupt(path: path, reason: "bitmap data file is truncated")
                }
                guard !bitmaps.contains(where: { $0.name == entry.name }) else {
                    throw .storeCorrupt(path: statePath, reason: "bitmap '\(entry.name)' is listed twice")
                }
                let byteCount = entry.wordCount * 8
                let words = FileIO.decodeWords(data[position..<(position + byteCount)])
                position += byteCount
                guard Checksum.fnv1a(words) == entry.checksum else {
                    throw .storeCorrupt(path: path, reason: "checksum mismatch for bitmap '\(entry.name)'")
                }
                guard BitmapLimits.isValidGranularity(entry.granularity),
                    let bitmap = DirtyBitmap(size: imageSize, granularity: entry.granularity, leafWords: words)
                else {
                    throw .storeCorrupt(path: path, reason: "bitmap '\(entry.name)' does not match the image size")
                }
                bitmaps.append(.init(
                    name: entry.name, bitmap: bitmap, recording: entry.recording,
                    checkpointOf: entry.checkpointOf, consumed: entry.consumed ?? false,
                    lineage: entry.lineage ?? CheckpointLineage(), checkpointID: entry.checkpointID,
                    abortOnDisconnect: entry.abortOnDisconnect ?? true))
            }
        }
        var generation = state.generation
        let recovered = !state.cleanShutdown
        if recovered {
            // The unfinished epoch's journal is created, durably, before any manifest names
            // that epoch, and removed only after a newer one is written: without it the
            // writes of the epoch are unknown, and loading would under-report them.
            guard access(journalPath(state.epoch), F_OK) == 0 else {
                throw .storeCorrupt(path: journalPath(state.epoch), reason: "the journal of the unfinished epoch is missing")
            }
            generation += 1
            let regions = try journaledRegions(since: state.epoch)
            for region in regions {
                let offset = region * Self.regionSize
                for index in bitmaps.indices where bitmaps[index].recording {
                    bitmaps[index].bitmap.markDirty(offset: offset, length: Self.regionSize)
                }
            }
        }
        return Contents(
            bitmaps: bitmaps, generation: generation, epoch: state.epoch, recovered: recovered,
            checkpointCounter: state.checkpointCounter ?? 0)
    }

    /// Region ids recorded in every journal of epoch `epoch` or later.
    private func journaledRegions(since epoch: UInt64) throws(BitmapError) -> Set<UInt64> {
        let regionCount = (imageSize + Self.regionSize - 1) / Self.regionSize
        var regions = Set<UInt64>()
        for name in FileIO.listDirectory(directory) {
            guard name.hasPrefix("journal-"), name.hasSuffix(".log"),
                let number = UInt64(name.dropFirst("journal-".count).dropLast(".log".count)), number >= epoch,
                let bytes = try FileIO.readFile(directory + "/" + name)
            else { continue }
            // A torn last record is ignored; a garbled id beyond the image is dropped.
            for region in FileIO.decodeWords(bytes[...]) where region < regionCount {
                regions.insert(region)
            }
        }
        return regions
    }

    // MARK: - Journal

    /// Starts journal `epoch` (an empty, durable file). Call with the journal lock held.
    func startJournal(epoch: UInt64) throws(BitmapError) {
        let path = journalPath(epoch)
        let fd = Glibc.open(path, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw .storeIOFailed(path: path, reason: "cannot create: \(FileIO.describe(errno))") }
        try FileIO.syncDirectory(directory)
        if journalDescriptor >= 0 { close(journalDescriptor) }
        journalDescriptor = fd
    }

    /// Appends region ids and makes them durable before returning. Call with the journal
    /// lock held.
    func appendToJournal(_ regions: [UInt64]) throws(BitmapError) {
        guard journalDescriptor >= 0 else { throw .storeUnavailable("the journal is not open") }
        var bytes: [UInt8] = []
        FileIO.encodeWords(regions, into: &bytes)
        try FileIO.writeAll(journalDescriptor, bytes, path: "journal")
        guard fdatasync(journalDescriptor) == 0 else {
            throw .storeIOFailed(path: directory, reason: "journal fsync: \(FileIO.describe(errno))")
        }
    }

    // MARK: - Saving

    /// A copy of the persistent bitmaps taken at an epoch switch.
    struct Snapshot {
        struct Bitmap {
            var name: String
            var granularity: UInt64
            var recording: Bool
            var checkpointOf: String?
            var consumed: Bool
            var words: [UInt64]
            var lineage: CheckpointLineage
            var checkpointID: String?
            var abortOnDisconnect: Bool
        }
        var bitmaps: [Bitmap]
        var epoch: UInt64
        var generation: UInt64
        var checkpointCounter: UInt64
    }

    /// Writes the bits and the manifest atomically, then drops journals and data files
    /// the new manifest no longer needs.
    func write(_ snapshot: Snapshot, cleanShutdown: Bool) throws(BitmapError) {
        let dataName = "bitmaps-\(snapshot.epoch).dat"
        var data: [UInt8] = []
        var entries: [StoredState.Bitmap] = []
        for bitmap in snapshot.bitmaps {
            FileIO.encodeWords(bitmap.words, into: &data)
            entries.append(.init(
                name: bitmap.name, granularity: bitmap.granularity, recording: bitmap.recording,
                wordCount: bitmap.words.count, checksum: Checksum.fnv1a(bitmap.words),
                checkpointOf: bitmap.checkpointOf, consumed: bitmap.consumed ? true : nil,
                lineage: bitmap.lineage == CheckpointLineage() ? nil : bitmap.lineage,
                checkpointID: bitmap.checkpointID,
                abortOnDisconnect: bitmap.checkpointOf != nil && !bitmap.abortOnDisconnect ? false : nil))
        }
        try FileIO.writeAtomically(data, to: dataPath(dataName), directory: directory)
        let state = StoredState(
            version: StoredState.currentVersion, imageSize: imageSize, epoch: snapshot.epoch,
            generation: snapshot.generation, cleanShutdown: cleanShutdown, dataFile: dataName, bitmaps: entries,
            checkpointCounter: snapshot.checkpointCounter == 0 ? nil : snapshot.checkpointCounter)
        let encoded: Data
        do {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            encoded = try encoder.encode(state)
        } catch {
            throw .storeIOFailed(path: statePath, reason: "cannot encode manifest: \(error)")
        }
        try FileIO.writeAtomically([UInt8](encoded), to: statePath, directory: directory)
        for name in FileIO.listDirectory(directory) {
            if let number = Self.epochNumber(name, prefix: "journal-", suffix: ".log"), number < snapshot.epoch {
                unlink(directory + "/" + name)
            } else if let number = Self.epochNumber(name, prefix: "bitmaps-", suffix: ".dat"), number != snapshot.epoch {
                unlink(directory + "/" + name)
            }
        }
    }

    private static func epochNumber(_ name: String, prefix: String, suffix: String) -> UInt64? {
        guard name.hasPrefix(prefix), name.hasSuffix(suffix) else { return nil }
        return UInt64(name.dropFirst(prefix.count).dropLast(suffix.count))
    }
}

/// Limits shared by the tracker and the store.
public enum BitmapLimits {
    public static let minimumGranularity: UInt64 = 512
    public static let maximumGranularity: UInt64 = 1 << 31
    public static let defaultGranularity: UInt64 = 64 * 1024
    public static let maximumNameLength = 1023

    public static func isValidGranularity(_ value: UInt64) -> Bool {
        value >= minimumGranularity && value <= maximumGranularity && value & (value - 1) == 0
    }
}
