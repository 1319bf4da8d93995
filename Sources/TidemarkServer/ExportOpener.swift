import BlockStorage
import DirtyTracking
import Logging

#if canImport(Glibc)
import Glibc
#endif

/// Opens an image and its bitmap store as an export, for the command line and for
/// `block-export-add` alike.
public enum ExportOpener {
    /// A bitmap to create on the export unless it already exists.
    public struct BitmapRequest: Sendable, Equatable {
        public var name: String
        public var granularity: UInt64

        public init(name: String, granularity: UInt64) {
            self.name = name
            self.granularity = granularity
        }
    }

    /// Opens `path` as export `name`, with management id `id` (`name` when nil).
    ///
    /// Writable regular files always get their store (`PATH.tidemark/`, or in
    /// `stateDirectory`), so persistent bitmaps can be added at any time and two servers
    /// cannot write one image unknowingly; read-only images and block devices get one when
    /// it exists or bitmaps are asked for. Block devices' stores are in `stateDirectory`
    /// (default `/var/lib/tidemark`), never under `/dev` (`StoreLocator`). A requested
    /// bitmap too large for the image (`BitmapLimits.maximumGranules`) is an error, before
    /// the store is opened.
    ///
    /// A writable export is never served with writes its store cannot record:
    /// - a damaged store, or one made for another image size, is repaired by
    ///   over-reporting (`BitmapStore+Loading`), with an error log naming the file;
    /// - a store held by another process refuses the export (`.storeLocked` is thrown):
    ///   two writers of one image is a configuration mistake the operator must see;
    /// - a disk that is not the one its path's store was made for (another device attached
    ///   at `/dev/loop0`) refuses the export, read-only too (`.storeIdentityMismatch` is
    ///   thrown): serving it read-only would still let a backup chain of the old disk take
    ///   the new disk's data as its next point, and fresh bitmaps would claim no change;
    /// - a store that cannot be read, created or saved (full disk, I/O or permission
    ///   error, a newer format) serves the image read-only, with an error log giving the
    ///   reason: readers keep working, and nothing is written that nobody records.
    /// A read-only export whose store fails is served without bitmaps (nothing changes).
    public static func open(
        id: String? = nil, name: String, path: String, readOnly: Bool, description: String, bitmaps: [BitmapRequest],
        stateDirectory: String? = nil, logger: Logger
    ) throws -> Export {
        var image = try RawImage(path: path, readOnly: readOnly)
        for bitmap in bitmaps {
            try BitmapLimits.checkSize(name: bitmap.name, imageSize: image.size, granularity: bitmap.granularity)
        }
        let tracker: DirtyTracker?
        var servedReadOnly = readOnly
        let location = StoreLocator(image: image, stateDirectory: stateDirectory)
        switch try Self.tracker(location: location, image: image, readOnly: readOnly, bitmaps: bitmaps, logger: logger) {
        case .tracked(let opened):
            tracker = opened
        case .untracked:
            tracker = nil
        case .readOnly:
            tracker = nil
            servedReadOnly = true
            image = try RawImage(path: path, readOnly: true)
        }
        return Export(
            id: id, name: name, description: description, image: image, readOnly: servedReadOnly, tracker: tracker)
    }

    /// What the store allows.
    enum TrackerOutcome {
        case tracked(DirtyTracker)
        /// No store: a read-only export, or a block device nobody asked bitmaps for.
        case untracked
        /// The store failed: the image must not be written.
        case readOnly
    }

    /// - Parameter requireStore: open (create) the store even for a block device nobody
    ///   asked bitmaps for: a live restore keeps its progress map in it.
    static func tracker(
        location: StoreLocator, image: RawImage, readOnly: Bool, bitmaps: [BitmapRequest], requireStore: Bool = false,
        logger: Logger
    ) throws -> TrackerOutcome {
        let imagePath = image.path
        let directory = location.directory
        let wantsStore = requireStore || (!readOnly && !image.isBlockDevice) || !bitmaps.isEmpty
        guard location.exists || wantsStore else { return .untracked }
        if let warning = location.warning { logger.warning("\(warning)") }
        do throws(BitmapError) {
            let (store, contents) = try location.open(imageSize: image.size)
            if let identity = location.identity {
                logger.info("bitmaps of '\(imagePath)' are in '\(directory)' (disk identity '\(identity)')")
            }
            for problem in contents.problems {
                logger.error("\(problem) (generation \(contents.generation))")
            }
            if contents.recovered {
                logger.warning(
                    "bitmaps of '\(imagePath)' recovered after an unclean stop; every region written since the last save is marked dirty (generation \(contents.generation))")
            }
            for path in contents.removedViewSidecars {
                logger.info("removed the sidecar of a view from an earlier run: \(path)")
            }
            let tracker = try DirtyTracker(store: store, contents: contents)
            let existing = Dictionary(tracker.query().map { ($0.name, $0) }, uniquingKeysWith: { first, _ in first })
            for bitmap in bitmaps {
                if let loaded = existing[bitmap.name] {
                    if loaded.granularity != bitmap.granularity {
                        logger.warning(
                            "bitmap '\(bitmap.name)' already exists with granularity \(loaded.granularity); keeping it (granularity cannot change)")
                    }
                    continue
                }
                if contents.damaged {
                    // What changed since the damaged store's last save is unknown.
                    try tracker.addEntirelyDirty(name: bitmap.name, granularity: bitmap.granularity)
                } else {
                    try tracker.add(name: bitmap.name, granularity: bitmap.granularity, persistent: true)
                }
            }
            return .tracked(tracker)
        } catch .storeIdentityMismatch(let imagePath, let recorded, let found, let store, let remedy) {
            throw BitmapError.storeIdentityMismatch(
                imagePath: imagePath, recorded: recorded, found: found, store: store, remedy: remedy)
        } catch .storeLocked(let path) {
            // A read-only export of an image another export or server writes can go
            // without bitmaps; a second writer cannot.
            guard readOnly else { throw BitmapError.storeLocked(path: path) }
            logger.warning("\(BitmapError.storeLocked(path: path)); serving '\(imagePath)' read-only without bitmaps")
            return .untracked
        } catch {
            if readOnly {
                logger.error("\(error); serving '\(imagePath)' (read-only) without bitmaps")
                return .untracked
            }
            logger.error(
                "\(error); serving '\(imagePath)' read-only: its writes could not be recorded in its bitmaps. Fix the cause and restart the export to write again")
            return .readOnly
        }
    }
}
