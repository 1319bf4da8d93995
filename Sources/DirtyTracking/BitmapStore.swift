import CLinuxIO
#if canImport(Glibc)
import Glibc
#endif

/// The folder that makes bitmaps persistent and crash-safe: `IMAGE.tidemark/` beside a
/// raw file, or a store in a state directory (`StateDirectory`), keyed by the disk's
/// identity, for block devices and for files when asked.
///
/// Files: `state.json` (manifest, with its own checksum), `bitmaps-EPOCH.dat` (the bits as
/// of the last save), `journal-EPOCH.log` (ids of coarse regions written since, with a
/// header and per-record checks: `JournalFormat`), and `lock` (held by the process that
/// owns the store). Every save starts a new journal epoch; after an unclean stop, every
/// region in the journals of unfinished epochs is marked dirty, so the loaded bitmaps are
/// always a superset of the true changes. Whatever the store cannot prove complete
/// (a missing or damaged journal, a damaged manifest or data file, another image size)
/// is loaded as entirely dirty, never as "nothing changed" (see `BitmapStore+Loading`).
public final class BitmapStore: @unchecked Sendable {
    // @unchecked: `journal` is only touched under the tracker's journal lock (appends,
    // switches, rollbacks) or during `open`; everything else is immutable.

    /// Bytes covered by one journal record: the first write into such a region in an epoch
    /// costs one durable journal append; later writes there cost nothing.
    public static let regionSize: UInt64 = 64 << 20

    public let directory: String
    public let imageSize: UInt64
    private let lockDescriptor: Int32
    /// The journal of the current epoch, open for appends; nil until the first save.
    private var journal: JournalFile?

    /// An open journal file. Its blocks are reserved up front (`JournalFormat.reservation`),
    /// so appends never need a new block: overwrites and trims keep working on a full disk.
    struct JournalFile {
        let descriptor: Int32
        let epoch: UInt64
        let path: String
        /// Bytes written: the next record goes here.
        var length: UInt64
    }

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
        /// True when the store was damaged beyond use and started over (the old files are
        /// in a `damaged-*` folder): bitmaps created at open must start entirely dirty,
        /// because nobody knows what changed since the old store's last save.
        public var damaged: Bool = false
        /// What was wrong with the store and what was done about it, each naming the file:
        /// for the caller to log as errors.
        public var problems: [String] = []
        /// Sidecars of views from an earlier run, removed at open: for the caller to log.
        public var removedViewSidecars: [String] = []
    }

    /// The sidecar folder for an image.
    public static func directory(forImage path: String) -> String { path + ".tidemark" }

    /// Opens (creating if needed) and locks the store.
    /// - Throws: `.storeLocked` when another process holds it; `.storeCorrupt` when it was
    ///   written by a newer format; I/O errors (`.storeIOFailed`, `.storeFull`) when it
    ///   cannot be read or repaired. Damage it can recover from by over-reporting is not
    ///   thrown but reported in `Contents.problems`.
    public static func open(imagePath: String, imageSize: UInt64) throws(BitmapError) -> (BitmapStore, Contents) {
        try open(directory: directory(forImage: imagePath), imageSize: imageSize, identity: nil)
    }

    /// Opens (creating if needed) and locks the store in `directory`, as
    /// `open(imagePath:imageSize:)` does.
    ///
    /// With `identity` (a store in a state directory, keyed by the disk's identity), the
    /// store must belong to that disk: its `identity.json` is checked once the lock is
    /// held, and written (durably, before any bitmap) when the store has none yet.
    /// - Throws: also `.storeIdentityMismatch` when `identity.json` names another disk, and
    ///   `.storeCorrupt` when it cannot be read: in both cases the lock is released.
    public static func open(
        directory: String, imageSize: UInt64, identity: StoreIdentity?
    ) throws(BitmapError) -> (BitmapStore, Contents) {
        if mkdir(directory, 0o755) != 0 && errno != EEXIST {
            throw FileIO.failure(directory, "cannot create", errno)
        }
        let lockPath = directory + "/lock"
        let lockFD = Glibc.open(lockPath, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard lockFD >= 0 else { throw FileIO.failure(lockPath, "cannot open", errno) }
        guard flock(lockFD, LOCK_EX | LOCK_NB) == 0 else {
            close(lockFD)
            throw .storeLocked(path: directory)
        }
        // From here the store owns the lock descriptor: its deinit closes it on any throw.
        let store = BitmapStore(directory: directory, imageSize: imageSize, lockDescriptor: lockFD)
        if let identity { try store.claim(for: identity) }
        var contents = try store.load()
        contents.removedViewSidecars = store.removeStaleViewSidecars()
        return (store, contents)
    }

    /// Checks that this store belongs to `identity`'s disk, recording it in a new store.
    private func claim(for identity: StoreIdentity) throws(BitmapError) {
        let path = directory + "/" + StoreIdentity.fileName
        guard let recorded = try StoreIdentity.read(in: directory) else {
            try FileIO.writeAtomically(try identity.encoded(), to: path, directory: directory)
            return
        }
        guard recorded.identity == identity.identity else {
            throw .storeIdentityMismatch(
                imagePath: identity.path, recorded: recorded.identity, found: identity.identity, store: directory,
                remedy: "The store was made for '\(recorded.path)'. Move the store aside if it is not needed.")
        }
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
        if let journal { close(journal.descriptor) }
        close(lockDescriptor)
    }

    var statePath: String { directory + "/state.json" }
    func journalPath(_ epoch: UInt64) -> String { directory + "/journal-\(epoch).log" }
    func dataPath(_ name: String) -> String { directory + "/" + name }

    /// Journal regions of this image (at least one).
    var regionCount: UInt64 { max(1, (imageSize + Self.regionSize - 1) / Self.regionSize) }

    // MARK: - Journal

    /// Creates the journal of `epoch`, complete and durable, without touching the current
    /// one: written under a temporary name with its header and its whole reservation, then
    /// renamed. If anything fails (a full disk) nothing is left behind and the current
    /// epoch goes on; a `journal-N.log` on disk therefore always has a full header.
    func prepareJournal(epoch: UInt64, generation: UInt64) throws(BitmapError) -> JournalFile {
        let path = journalPath(epoch)
        let temporary = path + ".tmp"
        let fd = Glibc.open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw FileIO.failure(temporary, "cannot create the journal", errno) }
        var renamed = false
        do throws(BitmapError) {
            let reservation = JournalFormat.reservation(regionCount: regionCount)
            if clinuxio_reserve(fd, 0, off_t(reservation)) != 0 && errno != EOPNOTSUPP && errno != ENOSYS {
                throw FileIO.failure(temporary, "cannot reserve \(reservation) bytes for the journal", errno)
            }
            let header = JournalFormat.header(epoch: epoch, generation: generation)
            try FileIO.writeAll(fd, header, at: 0, path: temporary)
            guard fdatasync(fd) == 0 else { throw FileIO.failure(temporary, "fsync", errno) }
            guard rename(temporary, path) == 0 else { throw FileIO.failure(path, "rename", errno) }
            renamed = true
            try FileIO.syncDirectory(directory)
            return JournalFile(descriptor: fd, epoch: epoch, path: path, length: UInt64(header.count))
        } catch {
            close(fd)
            unlink(renamed ? path : temporary)
            throw error
        }
    }

    /// Makes `next` the journal appends go to. Returns the previous one, still open: the
    /// caller retires it once the save that started `next` is committed, or rolls back to
    /// it. Call with the journal lock held.
    func switchJournal(to next: JournalFile) -> JournalFile? {
        let previous = journal
        journal = next
        return previous
    }

    /// Undoes `switchJournal` after a save failed before its manifest was replaced: the
    /// regions journaled in the new epoch are appended to the previous journal, then the
    /// new journal is deleted, so a failed save leaves no file behind. Returns false (and
    /// keeps the new journal, which the next recovery replays too) when that append fails.
    /// Call with the journal lock held.
    func rollBackJournal(to previous: JournalFile?, reappending regions: [UInt64]) -> Bool {
        guard let current = journal else { return false }
        guard var previous else {
            // The store had no journal (fresh, or stopped cleanly): nothing to go back to
            // unless the new journal holds nothing.
            guard regions.isEmpty else { return false }
            close(current.descriptor)
            unlink(current.path)
            journal = nil
            return true
        }
        if !regions.isEmpty {
            do throws(BitmapError) {
                try append(regions, to: &previous)
            } catch {
                return false
            }
        }
        close(current.descriptor)
        unlink(current.path)
        journal = previous
        return true
    }

    /// Closes a journal that a committed save made obsolete (its file is deleted by
    /// `write`'s cleanup).
    func retire(_ journal: JournalFile?) {
        if let journal { close(journal.descriptor) }
    }

    /// The current epoch's journal epoch, if one is open.
    var journalEpoch: UInt64? { journal?.epoch }

    /// Appends region ids and makes them durable before returning. Call with the journal
    /// lock held.
    func appendToJournal(_ regions: [UInt64]) throws(BitmapError) {
        guard var current = journal else { throw .storeUnavailable("the journal is not open") }
        try append(regions, to: &current)
        journal = current
    }

    private func append(_ regions: [UInt64], to file: inout JournalFile) throws(BitmapError) {
        let bytes = JournalFormat.records(regions, epoch: file.epoch)
        // Positioned: a failed append leaves `length` where it was, so the retry
        // overwrites whatever part of it reached the file.
        try FileIO.writeAll(file.descriptor, bytes, at: file.length, path: file.path)
        guard fdatasync(file.descriptor) == 0 else { throw FileIO.failure(file.path, "journal fsync", errno) }
        file.length += UInt64(bytes.count)
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
    /// the new manifest no longer needs. `committed` is set once the new manifest has
    /// replaced the old one: after that, a failure must not roll the epoch back. A failure
    /// before it leaves no new file behind.
    func write(_ snapshot: Snapshot, cleanShutdown: Bool, committed: inout Bool) throws(BitmapError) {
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
        let encoded: [UInt8]
        do {
            encoded = try state.encodedWithChecksum()
        } catch {
            unlink(dataPath(dataName))
            throw .storeIOFailed(path: statePath, reason: "cannot encode manifest: \(error)")
        }
        do throws(BitmapError) {
            try FileIO.writeAtomically(encoded, to: statePath, directory: directory, renamed: &committed)
        } catch {
            if !committed { unlink(dataPath(dataName)) }
            throw error
        }
        for name in FileIO.listDirectory(directory) {
            if let number = Self.epochNumber(name, prefix: "journal-", suffix: ".log"), number < snapshot.epoch {
                unlink(directory + "/" + name)
            } else if let number = Self.epochNumber(name, prefix: "bitmaps-", suffix: ".dat"), number != snapshot.epoch {
                unlink(directory + "/" + name)
            }
        }
    }

    static func epochNumber(_ name: String, prefix: String, suffix: String) -> UInt64? {
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
