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
    /// Writable regular files always get their sidecar store (`PATH.tidemark/`), so
    /// persistent bitmaps can be added at any time and two servers cannot write one image
    /// unknowingly; read-only images and block devices get one when it exists or bitmaps
    /// are asked for. A requested bitmap too large for the image
    /// (`BitmapLimits.maximumGranules`) is an error, before the store is opened.
    /// are asked for.
    ///
    /// A writable export is never served with writes its store cannot record:
    /// - a damaged store, or one made for another image size, is repaired by
    ///   over-reporting (`BitmapStore+Loading`), with an error log naming the file;
    /// - a store held by another process refuses the export (`.storeLocked` is thrown):
    ///   two writers of one image is a configuration mistake the operator must see;
    /// - a store that cannot be read, created or saved (full disk, I/O or permission
    ///   error, a newer format) serves the image read-only, with an error log giving the
    ///   reason: readers keep working, and nothing is written that nobody records.
    /// A read-only export whose store fails is served without bitmaps (nothing changes).
    public static func open(
        id: String? = nil, name: String, path: String, readOnly: Bool, description: String, bitmaps: [BitmapRequest],
        logger: Logger
    ) throws -> Export {
        var image = try RawImage(path: path, readOnly: readOnly)
        for bitmap in bitmaps {
            try BitmapLimits.checkSize(name: bitmap.name, imageSize: image.size, granularity: bitmap.granularity)
        }
        let tracker: DirtyTracker?
        var servedReadOnly = readOnly
        switch try Self.tracker(imagePath: path, image: image, readOnly: readOnly, bitmaps: bitmaps, logger: logger) {
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

    static func tracker(
        imagePath: String, image: RawImage, readOnly: Bool, bitmaps: [BitmapRequest], logger: Logger
    ) throws -> TrackerOutcome {
        let directory = BitmapStore.directory(forImage: imagePath)
        var info = stat()
        let storeExists = stat(directory, &info) == 0
        let wantsStore = (!readOnly && !image.isBlockDevice) || !bitmaps.isEmpty
        guard storeExists || wantsStore else { return .untracked }
        do throws(BitmapError) {
            let (store, contents) = try BitmapStore.open(imagePath: imagePath, imageSize: image.size)
            for problem in contents.problems {
                logger.error("\(problem) (generation \(contents.generation))")
            }
            if contents.recovered {
                logger.warning(
                    "bitmaps of '\(imagePath)' recovered after an unclean stop; every region written since the last save is marked dirty (generation \(contents.generation))")
            }
            removeStaleViewSidecars(in: directory, logger: logger)
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

    /// Views do not outlive the server that opened them; holding the store's lock means
    /// no other server uses these files.
    private static func removeStaleViewSidecars(in directory: String, logger: Logger) {
        guard let handle = opendir(directory) else { return }
        defer { closedir(handle) }
        while let entry = readdir(handle) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
            }
            guard name.hasPrefix(ExportRegistry.viewSidecarPrefix), name.hasSuffix(".cbw") else { continue }
            if unlink("\(directory)/\(name)") == 0 {
                logger.info("removed the sidecar of a view from an earlier run: \(directory)/\(name)")
            }
        }
    }
}
