#if canImport(Glibc)
import Glibc
#endif

/// The folder holding the bitmap stores of disks that cannot keep a store beside them:
/// block devices (a sidecar `/dev/sdb.tidemark/` would sit in devtmpfs, which is memory
/// and not Tidemark's to write), and regular files when `--state-dir` is given.
///
/// Layout:
/// - `stores/NAME/` — one bitmap store per disk (`BitmapStore`'s files plus
///   `identity.json`). NAME derives from the disk's identity (`storeName`), not its path,
///   so the same disk attached at another path finds its store.
/// - `paths/NAME` — one symbolic link per image path served, to the store of the disk last
///   served there (`../stores/NAME`). It is how another disk at a known path is noticed:
///   that disk's identity leads to a different store, and quietly starting fresh bitmaps
///   there would let "an incremental backup of /dev/sdb" find no change at all while the
///   whole disk was swapped. Such an open is refused (`.storeIdentityMismatch`) until the
///   operator removes the link.
///
/// The folder is created mode 0700 when missing: bitmaps say where a disk was written.
public struct StateDirectory: Sendable, Equatable {
    /// Where block devices' stores go unless `--state-dir` says otherwise.
    public static let defaultPath = "/var/lib/tidemark"

    public let path: String

    public init(path: String) {
        self.path = path
    }

    var storesPath: String { path + "/stores" }
    var pathsPath: String { path + "/paths" }

    /// The store folder of the disk with this identity.
    public func storeDirectory(identity: String) -> String {
        storesPath + "/" + Self.storeName(identity)
    }

    /// The link recording which disk was last served at `imagePath`.
    public func pathRecord(imagePath: String) -> String {
        pathsPath + "/" + Self.storeName(imagePath)
    }

    /// A file name for `key`: its readable part (letters, digits, `.`, `_`, `-`; anything
    /// else `_`; at most 64 characters, never starting with a dot), then `-` and the 16 hex
    /// digits of FNV-1a 64 over all of `key`, which keeps names of keys that sanitize alike
    /// apart. `identity.json` inside a store catches the rare collision.
    static func storeName(_ key: String) -> String {
        var readable = String(key.unicodeScalars.prefix(64).map { scalar -> Character in
            switch scalar {
            case "a"..."z", "A"..."Z", "0"..."9", ".", "_", "-": return Character(scalar)
            default: return "_"
            }
        })
        if readable.hasPrefix(".") { readable = "_" + readable.dropFirst() }
        let digits = String(Checksum.fnv1a(bytes: Array(key.utf8)), radix: 16)
        return readable + "-" + String(repeating: "0", count: 16 - digits.count) + digits
    }

    /// True when opening `imagePath` would find something to check or load: the disk's
    /// store, or a record of the disk last served at that path.
    public func hasStore(imagePath: String, identity: String) -> Bool {
        var info = stat()
        return stat(storeDirectory(identity: identity), &info) == 0 || lstat(pathRecord(imagePath: imagePath), &info) == 0
    }

    /// Opens and locks the store of `identity`'s disk (creating the state directory and the
    /// store as needed), after checking that `identity.path` was not last serving another
    /// disk; then records this disk as the one at that path.
    /// - Throws: `.storeIdentityMismatch` when the path last served another disk, or the
    ///   store belongs to another one; otherwise what `BitmapStore.open` throws.
    public func open(identity: StoreIdentity, imageSize: UInt64) throws(BitmapError) -> (BitmapStore, BitmapStore.Contents) {
        try prepare()
        try checkPathRecord(identity)
        let directory = storeDirectory(identity: identity.identity)
        let opened = try BitmapStore.open(directory: directory, imageSize: imageSize, identity: identity)
        try recordPath(identity.path, store: directory)
        return opened
    }

    /// Creates the state directory (0700), `stores/` and `paths/` when missing.
    private func prepare() throws(BitmapError) {
        for folder in [path, storesPath, pathsPath] where mkdir(folder, 0o700) != 0 && errno != EEXIST {
            throw FileIO.failure(
                folder, "cannot create the state directory (create it, or choose another with --state-dir)", errno)
        }
    }

    /// Refuses when the disk last served at the path is another one that still has a store.
    private func checkPathRecord(_ identity: StoreIdentity) throws(BitmapError) {
        let record = pathRecord(imagePath: identity.path)
        guard let target = Self.readLink(record) else { return }
        let name = target.split(separator: "/").last.map(String.init) ?? target
        guard name != Self.storeName(identity.identity) else { return }
        let other = storesPath + "/" + name
        // A record whose store was deleted claims nothing: it is replaced after the open.
        guard let recorded = try StoreIdentity.read(in: other), recorded.identity != identity.identity else { return }
        throw .storeIdentityMismatch(
            imagePath: identity.path, recorded: recorded.identity, found: identity.identity, store: other,
            remedy: "If '\(identity.path)' holds another disk on purpose, remove '\(record)' and start again: this disk "
                + "then gets its own store, and the other disk's bitmaps stay in '\(other)' for when it is attached "
                + "again. Otherwise attach the right disk at '\(identity.path)'.")
    }

    /// Points the path's record at `store`, atomically (a new link renamed over the old).
    private func recordPath(_ imagePath: String, store: String) throws(BitmapError) {
        let record = pathRecord(imagePath: imagePath)
        let target = "../stores/" + (store.split(separator: "/").last.map(String.init) ?? store)
        guard Self.readLink(record) != target else { return }
        let temporary = record + ".tmp"
        unlink(temporary)
        guard symlink(target, temporary) == 0 else { throw FileIO.failure(temporary, "cannot create", errno) }
        guard rename(temporary, record) == 0 else {
            let code = errno
            unlink(temporary)
            throw FileIO.failure(record, "rename", code)
        }
        try FileIO.syncDirectory(pathsPath)
    }

    private static func readLink(_ path: String) -> String? {
        var buffer = [CChar](repeating: 0, count: 4096)
        let count = buffer.withUnsafeMutableBufferPointer { pointer -> Int in
            guard let base = pointer.baseAddress else { return -1 }
            return readlink(path, base, pointer.count)
        }
        guard count > 0 else { return nil }
        return String(decoding: buffer[0..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
