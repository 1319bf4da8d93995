import BlockStorage
import DirtyTracking
import Logging

#if canImport(Glibc)
import Glibc
#endif

/// Opens an image's bitmap store for serving.
enum BitmapLoader {
    /// The tracker for an image: backed by its sidecar store when one exists or bitmaps
    /// were asked for, in memory otherwise.
    ///
    /// A damaged store is reported (naming the file) and the image is served without its
    /// bitmaps; a store held by another server is an error, since two servers writing one
    /// image would corrupt it anyway.
    static func tracker(
        imagePath: String, image: RawImage, bitmaps: [BitmapSpecification], logger: Logger
    ) throws -> DirtyTracker? {
        let directory = BitmapStore.directory(forImage: imagePath)
        var info = stat()
        let storeExists = stat(directory, &info) == 0
        guard storeExists || !bitmaps.isEmpty else { return nil }
        do throws(BitmapError) {
            let (store, contents) = try BitmapStore.open(imagePath: imagePath, imageSize: image.size)
            if contents.recovered {
                logger.warning(
                    "bitmaps of '\(imagePath)' recovered after an unclean stop; every region written since the last save is marked dirty (generation \(contents.generation))")
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
                try tracker.add(name: bitmap.name, granularity: bitmap.granularity, persistent: true)
            }
            return tracker
        } catch .storeLocked(let path) {
            throw BitmapError.storeLocked(path: path)
        } catch {
            logger.error("\(error); serving '\(imagePath)' without bitmaps")
            return nil
        }
    }
}
