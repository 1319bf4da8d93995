#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// The manifest of a bitmap store (`state.json`): which bitmaps exist, with their flags,
/// where their bits are, and whether the last server stopped cleanly.
///
/// Version 2 adds `manifestChecksum` (so a damaged manifest is told from a valid one) and
/// the journal header (`JournalFormat`); version 1 stores still load and are written as
/// version 2 by the next save.
struct StoredState: Codable, Equatable {
    static let currentVersion = 2
    /// Versions this code reads.
    static let readableVersions: ClosedRange<Int> = 1...2

    struct Bitmap: Codable, Equatable {
        var name: String
        var granularity: UInt64
        var recording: Bool
        /// Leaf words stored for this bitmap, in order, in the data file.
        var wordCount: Int
        /// FNV-1a over the words, to catch a damaged data file.
        var checksum: UInt64
        /// For a pending checkpoint increment: the bitmap it was taken from.
        var checkpointOf: String?
        /// For an increment whose checkpoint ended tracking of its bitmap.
        var consumed: Bool?
        /// Checkpoint lineage (absent in stores written before it existed: no base).
        var lineage: CheckpointLineage?
        /// For an increment: its checkpoint's unique id.
        var checkpointID: String?
        /// For an increment: false when its creator asked not to abort it on disconnect.
        var abortOnDisconnect: Bool?
    }

    var version: Int
    /// Size of the image the bitmaps describe; a different size makes the store unusable.
    var imageSize: UInt64
    /// Journal epoch: journals numbered from this one on must be replayed after a crash.
    var epoch: UInt64
    /// Unclean recoveries so far.
    var generation: UInt64
    /// True only when the server that wrote this stopped cleanly.
    var cleanShutdown: Bool
    /// The data file holding every bitmap's words (little-endian u64), in `bitmaps` order.
    var dataFile: String
    var bitmaps: [Bitmap]
    /// The highest default checkpoint number handed out (`cN`), so names never repeat.
    var checkpointCounter: UInt64?
    /// FNV-1a 64 (16 hex digits) over the file's bytes with these digits written as zeros;
    /// required from version 2 on.
    var manifestChecksum: String? = nil
}

extension StoredState {
    private static let checksumKey = Array(#""manifestChecksum" : ""#.utf8)
    private static let zeroDigits = [UInt8](repeating: UInt8(ascii: "0"), count: 16)

    /// Why a manifest cannot be trusted.
    struct Damage: Error {
        var reason: String
        /// What could be read of it anyway, for the generation of a fresh store.
        var readable: StoredState?
    }

    /// The manifest as written to `state.json`, with its checksum.
    func encodedWithChecksum() throws -> [UInt8] {
        var state = self
        state.manifestChecksum = String(decoding: Self.zeroDigits, as: UTF8.self)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        var bytes = [UInt8](try encoder.encode(state))
        guard let start = Self.checksumPosition(in: bytes) else {
            throw Damage(reason: "the encoder did not write the checksum key as expected")
        }
        let digits = Array(Self.hex(Checksum.fnv1a(bytes: bytes)).utf8)
        bytes.replaceSubrange(start..<(start + 16), with: digits)
        return bytes
    }

    /// Decodes `state.json`, checking its checksum (version 2 and later).
    static func decodeChecked(_ bytes: [UInt8]) -> Result<StoredState, Damage> {
        let state: StoredState
        do {
            state = try JSONDecoder().decode(StoredState.self, from: Data(bytes))
        } catch {
            return .failure(Damage(reason: "unreadable manifest: \(error)", readable: nil))
        }
        // Version 1 has no checksum; a newer version is refused by the caller, untouched.
        guard state.version >= 2, state.version <= currentVersion else { return .success(state) }
        guard let start = checksumPosition(in: bytes), let stored = state.manifestChecksum else {
            return .failure(Damage(reason: "the manifest has no checksum", readable: state))
        }
        var zeroed = bytes
        zeroed.replaceSubrange(start..<(start + 16), with: zeroDigits)
        guard hex(Checksum.fnv1a(bytes: zeroed)) == stored, Array(stored.utf8) == Array(bytes[start..<(start + 16)]) else {
            return .failure(Damage(reason: "the manifest fails its checksum", readable: state))
        }
        return .success(state)
    }

    /// Index of the first checksum digit, when the key appears exactly as written.
    private static func checksumPosition(in bytes: [UInt8]) -> Int? {
        let key = checksumKey
        guard bytes.count >= key.count + 17 else { return nil }
        var index = 0
        while index + key.count + 17 <= bytes.count {
            if bytes[index] == key[0] && Array(bytes[index..<(index + key.count)]) == key {
                let start = index + key.count
                return bytes[start + 16] == UInt8(ascii: "\"") ? start : nil
            }
            index += 1
        }
        return nil
    }

    private static func hex(_ value: UInt64) -> String {
        let digits = String(value, radix: 16)
        return String(repeating: "0", count: 16 - digits.count) + digits
    }
}

enum Checksum {
    /// FNV-1a 64 over bytes.
    static func fnv1a(bytes: [UInt8]) -> UInt64 {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in bytes {
            hash ^= UInt64(byte)
            hash = hash &* 0x100_0000_01b3
        }
        return hash
    }

    /// FNV-1a 64 over the little-endian bytes of `words`.
    static func fnv1a(_ words: [UInt64]) -> UInt64 {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for word in words {
            var value = word.littleEndian
            for _ in 0..<8 {
                hash ^= value & 0xff
                hash = hash &* 0x100_0000_01b3
                value >>= 8
            }
        }
        return hash
    }
}
