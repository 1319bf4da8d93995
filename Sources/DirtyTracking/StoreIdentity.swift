#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// The disk a store in a state directory belongs to, recorded in its `identity.json` when
/// the store is created and checked every time it is opened, so that bitmaps are never
/// loaded for another disk. The identity string is what the store's name derives from
/// (`StateDirectory.storeName`); the rest says, for people and error messages, where the
/// identity was read and at which path and size the disk was first seen (the size the
/// bitmaps describe is checked by `state.json`, which handles a resize).
public struct StoreIdentity: Codable, Equatable, Sendable {
    static let fileName = "identity.json"
    static let currentVersion = 1

    public var version: Int
    /// The stable identity (`DeviceIdentity.value`), e.g. `wwid:naa.…` or `loop:/srv/a.img,fs=…,ino=…`.
    public var identity: String
    /// Where it was read, e.g. `/sys/dev/block/8:16/device/wwid`.
    public var source: String
    /// The path the store was created for.
    public var path: String
    /// The disk's size in bytes when the store was created.
    public var sizeAtCreation: UInt64

    public init(identity: String, source: String, path: String, size: UInt64) {
        self.version = Self.currentVersion
        self.identity = identity
        self.source = source
        self.path = path
        self.sizeAtCreation = size
    }

    func encoded() throws(BitmapError) -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        do {
            return [UInt8](try encoder.encode(self)) + [UInt8(ascii: "\n")]
        } catch {
            throw .storeIOFailed(path: Self.fileName, reason: "cannot encode the store identity: \(error)")
        }
    }

    /// Reads `identity.json` in `directory`: nil when there is none.
    /// - Throws: `.storeCorrupt` when it cannot be decoded: the store's owner is unknown,
    ///   so it must not be used for any disk.
    static func read(in directory: String) throws(BitmapError) -> StoreIdentity? {
        let path = directory + "/" + fileName
        guard let bytes = try FileIO.readFile(path) else { return nil }
        do {
            return try JSONDecoder().decode(StoreIdentity.self, from: Data(bytes))
        } catch {
            throw .storeCorrupt(path: path, reason: "the disk identity cannot be read (\(error))")
        }
    }
}
