/// Why a bitmap operation was refused. Messages name the bitmap and say what to do,
/// following QEMU's wording where the meaning is the same.
public enum BitmapError: Error, Equatable, CustomStringConvertible {
    case invalidName(String)
    case duplicateName(String)
    case notFound(String)
    case invalidGranularity(UInt64)
    case busy(String)
    case notACheckpoint(String)
    case sizeMismatch(target: String, source: String)
    case storeUnavailable(String)
    case storeCorrupt(path: String, reason: String)
    case storeIOFailed(path: String, reason: String)
    case storeLocked(path: String)
    /// More than `BitmapLimits.maximumGranules` granules; nil when no granularity fits.
    case bitmapTooLarge(name: String, imageSize: UInt64, granularity: UInt64, smallestGranularity: UInt64?)
    case checkpointPending(bitmap: String, checkpoint: String)
    case checkpointNameUsed(String)
    /// The store's file system is full (ENOSPC or EDQUOT): distinct from other I/O errors
    /// so writes can report NBD_ENOSPC, which lets QEMU pause the guest (werror=enospc).
    case storeFull(path: String, reason: String)
    /// The disk at `imagePath` is not the one the store (`store`, or the state directory's
    /// record of that path) was made for: its bitmaps must not be used for it.
    case storeIdentityMismatch(imagePath: String, recorded: String, found: String, store: String, remedy: String)

    /// True when the failure was a full file system, which a client can act on (free
    /// space, resume) unlike other I/O errors.
    public var isOutOfSpace: Bool {
        if case .storeFull = self { return true }
        return false
    }

    public var description: String {
        switch self {
        case .invalidName(let name):
            return "invalid bitmap name '\(name)': names are 1 to 1023 bytes"
        case .duplicateName(let name):
            return "bitmap '\(name)' already exists"
        case .notFound(let name):
            return "bitmap '\(name)' not found"
        case .invalidGranularity(let value):
            return "granularity \(value) is invalid: it must be a power of two from 512 B to 2 GiB"
        case .busy(let name):
            return "bitmap '\(name)' is currently in use by another operation and cannot be used"
        case .notACheckpoint(let name):
            return "bitmap '\(name)' is not a pending checkpoint increment"
        case .sizeMismatch(let target, let source):
            return "bitmaps '\(target)' and '\(source)' cover different sizes"
        case .storeUnavailable(let reason):
            return "persistent bitmaps are unavailable: \(reason)"
        case .storeCorrupt(let path, let reason):
            return "bitmap store '\(path)' is unusable (\(reason)); move it aside to start without its bitmaps"
        case .storeIOFailed(let path, let reason):
            return "bitmap store '\(path)': \(reason)"
        case .storeLocked(let path):
            return "bitmap store '\(path)' is held by a running server; stop that server first"
        case .bitmapTooLarge(let name, let imageSize, let granularity, let smallest):
            let granules = BitmapLimits.granules(imageSize: imageSize, granularity: granularity) ?? 0
            let mebibytes = (granules + (8 << 20) - 1) / (8 << 20)
            let image = BitmapLimits.describe(bytes: imageSize)
            let limit = "a bitmap may have at most \(BitmapLimits.maximumGranules) granules, 32 MiB of bits"
            guard let smallest else {
                return "bitmap '\(name)' would need \(mebibytes) MiB; no granularity fits this \(image) image: \(limit)"
            }
            return "bitmap '\(name)' would need \(mebibytes) MiB at granularity \(BitmapLimits.describe(bytes: granularity)); "
                + "use granularity ≥ \(BitmapLimits.describe(bytes: smallest)) (\(smallest)) for this \(image) image: \(limit)"
        case .checkpointPending(let bitmap, let checkpoint):
            return "checkpoint '\(checkpoint)' of bitmap '\(bitmap)' is still pending and its client is connected: "
                + "complete or abort it first (a pending checkpoint whose client is gone is superseded by the next one)"
        case .checkpointNameUsed(let name):
            return "checkpoint name '\(name)' was already used on this export; checkpoint names are unique for the "
                + "life of the bitmap store (omit the name to get the next free cN)"
        case .storeFull(let path, let reason):
            return "bitmap store '\(path)': \(reason); free space on its file system"
        case .storeIdentityMismatch(let imagePath, let recorded, let found, let store, let remedy):
            return "'\(imagePath)' is not the disk its bitmaps belong to: identity mismatch, the bitmap store '\(store)' "
                + "records identity '\(recorded)' but '\(imagePath)' now has identity '\(found)'; refusing to use "
                + "another disk's bitmaps for it. \(remedy)"
        }
    }
}
