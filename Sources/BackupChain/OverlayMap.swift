import BlockStorage

#if canImport(Glibc)
import Glibc
#endif

/// The persisted allocation map of a ``ChainOverlay``: which granules of the disk the
/// overlay file holds, one bit each, bound to the chain point it was made for.
///
/// Why a whole-file rewrite by rename: the map is small (2 MiB for 1 TiB at 64 KiB) and
/// only saved on FLUSH, after the overlay's data is durable; writing `NAME.new`, syncing
/// it and renaming it over `NAME` (then syncing the directory) means a crash leaves either
/// the previous flushed map or the new one, never a torn mix, with no journal to replay.
/// A checksum over the header and bits catches a file damaged later; a damaged or foreign
/// map refuses the overlay rather than serving the chain's data where writes were.
///
/// Layout (little-endian): magic `TMOVLMAP`, version (u32), identity length (u32), disk
/// size (u64), granule (u64), word count (u64), checksum (u64), the identity (UTF-8,
/// padded to 8 bytes), then the words.
public struct OverlayMap: Sendable {
    public let path: String
    /// Says which chain point the overlay belongs to; a map of another point is refused.
    public let identity: String
    public let diskSize: UInt64
    public let granule: UInt64

    static let magic: UInt64 = 0x5041_4D4C_5641_4F54  // "TOAVLMAP" read little-endian: T M O V L M A P
    static let version: UInt32 = 1
    static let headerSize = 48
    static let maximumIdentityLength = 4096

    public init(path: String, identity: String, diskSize: UInt64, granule: UInt64) {
        self.path = path
        self.identity = identity
        self.diskSize = diskSize
        self.granule = granule
    }

    /// Words needed for the disk's granules.
    public var wordCount: Int {
        let granules = (diskSize + granule - 1) / granule
        return Int((granules + 63) / 64)
    }

    /// The saved bits, nil when no map was saved yet.
    public func load() throws(StorageError) -> [UInt64]? {
        let file: BackupFile
        do throws(BackupError) {
            file = try BackupFile(path: path, flags: O_RDONLY)
        } catch {
            if case .fileSystem(_, _, let code) = error, code == ENOENT { return nil }
            throw ChainImage.storageError(error)
        }
        do throws(BackupError) {
            let length = try file.length()
            let identityBytes = Array(identity.utf8)
            let identityPadded = (identityBytes.count + 7) & ~7
            let expected = UInt64(Self.headerSize + identityPadded + wordCount * 8)
            guard length >= UInt64(Self.headerSize) else { throw damaged("it is \(length) bytes long") }
            let header = try file.read(count: Self.headerSize, at: 0)
            guard Self.get64(header, 0) == Self.magic, Self.get32(header, 8) == Self.version else {
                throw damaged("no overlay map magic or an unknown version")
            }
            let storedIdentityLength = Int(Self.get32(header, 12))
            guard storedIdentityLength <= Self.maximumIdentityLength else { throw damaged("identity of \(storedIdentityLength) bytes") }
            let storedIdentity = try file.read(count: storedIdentityLength, at: UInt64(Self.headerSize))
            guard storedIdentity == identityBytes else {
                throw BackupError.invalidImage(
                    path: path,
                    reason: "this overlay was made for \(String(decoding: storedIdentity, as: UTF8.self)), not \(identity); "
                        + "move the overlay and its map away to start a fresh one")
            }
            guard Self.get64(header, 16) == diskSize, Self.get64(header, 24) == granule,
                Self.get64(header, 32) == UInt64(wordCount), length == expected
            else {
                throw damaged("its size, granule or length does not match the \(diskSize)-byte disk")
            }
            let raw = try file.read(count: wordCount * 8, at: UInt64(Self.headerSize + identityPadded))
            var words = [UInt64](repeating: 0, count: wordCount)
            for index in 0..<wordCount { words[index] = Self.get64(raw, index * 8) }
            guard Self.checksum(words: words, identity: identityBytes, diskSize: diskSize, granule: granule) == Self.get64(header, 40)
            else {
                throw damaged("checksum mismatch")
            }
            return words
        } catch {
            throw ChainImage.storageError(error)
        }
    }

    private func damaged(_ reason: String) -> BackupError {
        .invalidImage(path: path, reason: "overlay map is damaged (\(reason)); the overlay cannot be trusted")
    }

    /// Deletes the saved map (durably), if there is one.
    public func remove() throws(StorageError) {
        guard unlink(path) == 0 else {
            if errno == ENOENT { return }
            throw StorageError.ioFailed(operation: "unlink \(path)", errno: errno)
        }
        let directory = path.lastIndex(of: "/").map { String(path[..<$0]) } ?? "."
        do throws(BackupError) {
            try BackupFile.syncDirectory(directory.isEmpty ? "/" : directory)
        } catch {
            throw ChainImage.storageError(error)
        }
    }

    /// Replaces the saved map with `words`, durably and atomically.
    public func save(_ words: [UInt64]) throws(StorageError) {
        let identityBytes = Array(identity.utf8)
        let identityPadded = (identityBytes.count + 7) & ~7
        var bytes = [UInt8](repeating: 0, count: Self.headerSize + identityPadded + words.count * 8)
        Self.put64(Self.magic, &bytes, 0)
        Self.put32(Self.version, &bytes, 8)
        Self.put32(UInt32(identityBytes.count), &bytes, 12)
        Self.put64(diskSize, &bytes, 16)
        Self.put64(granule, &bytes, 24)
        Self.put64(UInt64(words.count), &bytes, 32)
        Self.put64(Self.checksum(words: words, identity: identityBytes, diskSize: diskSize, granule: granule), &bytes, 40)
        bytes.replaceSubrange(Self.headerSize..<(Self.headerSize + identityBytes.count), with: identityBytes)
        var position = Self.headerSize + identityPadded
        for word in words {
            Self.put64(word, &bytes, position)
            position += 8
        }
        let temporary = path + ".new"
        do throws(BackupError) {
            let file = try BackupFile(path: temporary, flags: O_WRONLY | O_CREAT | O_TRUNC, mode: 0o644)
            try file.write(bytes, at: 0)
            try file.sync()
            file.close()
            guard rename(temporary, path) == 0 else { throw BackupFile.failure(path, "rename", errno) }
            let directory = path.lastIndex(of: "/").map { String(path[..<$0]) } ?? "."
            try BackupFile.syncDirectory(directory.isEmpty ? "/" : directory)
        } catch {
            throw ChainImage.storageError(error)
        }
    }

    static func checksum(words: [UInt64], identity: [UInt8], diskSize: UInt64, granule: UInt64) -> UInt64 {
        var hash: UInt64 = 0xCBF2_9CE4_8422_2325
        @inline(__always) func mix(_ value: UInt64) {
            hash = (hash ^ value) &* 0x0000_0100_0000_01B3
            hash ^= hash >> 29
        }
        mix(diskSize)
        mix(granule)
        for byte in identity { mix(UInt64(byte)) }
        for word in words { mix(word) }
        return hash
    }

    static func put64(_ value: UInt64, _ bytes: inout [UInt8], _ offset: Int) {
        for index in 0..<8 { bytes[offset + index] = UInt8(truncatingIfNeeded: value >> (8 * index)) }
    }

    static func put32(_ value: UInt32, _ bytes: inout [UInt8], _ offset: Int) {
        for index in 0..<4 { bytes[offset + index] = UInt8(truncatingIfNeeded: value >> (8 * index)) }
    }

    static func get64(_ bytes: [UInt8], _ offset: Int) -> UInt64 {
        var value: UInt64 = 0
        for index in 0..<8 { value |= UInt64(bytes[offset + index]) << (8 * index) }
        return value
    }

    static func get32(_ bytes: [UInt8], _ offset: Int) -> UInt32 {
        var value: UInt32 = 0
        for index in 0..<4 { value |= UInt32(bytes[offset + index]) << (8 * index) }
        return value
    }
}
