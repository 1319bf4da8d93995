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
    /// are asked for. A damaged store is reported (naming the file) and the image is
    /// served without its bitmaps; a store held elsewhere is an error for a writable export.
    /// A requested bitmap too large for the image (`BitmapLimits.maximumGranules`) is an
    /// error, before the store is opened.
    public static func open(
        id: String? = nil, name: String, path: String, readOnly: Bool, description: String, bitmaps: [BitmapRequest],
        logger: Logger
    ) throws -> Export {
        let image = try RawImage(path: path, readOnly: readOnly)
        for bitmap in bitmaps {
            try BitmapLimits.checkSize(name: bitmap.name, imageSize: image.size, granularity: bitmap.granularity)
        }
        let tracker = try tracker(imagePath: path, image: image, readOnly: readOnly, bitmaps: bitmaps, logger: logger)
        return Export(id: id, name: name, description: description, image: image, readOnly: readOnly, tracker: tracker)
    }

    static func tracker(
        imagePath: String, image: RawImage, readOnly: Bool, bitmaps: [BitmapRequest], logger: Logger
    ) throws -> DirtyTracker? {
        let directory = BitmapStore.directory(forImage: imagePath)
        var info = stat()
        let storeExists = stat(directory, &info) == 0
        let wantsStore = (!readOnly && !image.isBlockDevice) || !bitmaps.isEmpty
        guard storeExists || wantsStore else { return nil }
        do throws(BitmapError) {
            let (store, contents) = try BitmapStore.open(imagePath: imagePath, imageSize: image.size)
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
                try tracker.add(name: bitmap.name, granularity: bitmap.granularity, persistent: true)
            }
            return tracker
        } catch .storeLocked(let path) {
            // A read-only export of an image another export or server writes can go
            // without bitmaps; a second writer cannot.
            guard readOnly else { throw BitmapError.storeLocked(path: path) }
            logger.warning("\(BitmapError.storeLocked(path: path)); serving '\(imagePath)' read-only without bitmaps")
            return nil
        } catch {
            logger.error("\(error); serving '\(imagePath)' without bitmaps")
            return nil
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
