/// The on-disk format of a region journal (`journal-EPOCH.log`, store format 2), and its
/// parser.
///
/// A journal must let recovery tell "complete" from "damaged": a deleted, truncated or
/// overwritten journal would otherwise replay as "nothing was written" — a silent wrong
/// answer. So the file starts with a header naming its epoch and generation, with a check
/// value, and every record carries a check value bound to the epoch:
///
///     header (32 bytes): magic "TDMKJNL2" | epoch u64 | generation u64 | check u64
///     record (16 bytes): region u64 | check u64
///
/// all little-endian; checks are FNV-1a 64 over the other words. A short last record is a
/// torn append (its write never reached the disk, so neither did the data it covered) and
/// is ignored; a complete record that fails its check means damage.
enum JournalFormat {
    static let headerSize = 32
    static let recordSize = 16
    /// "TDMKJNL2" as a little-endian word.
    static let magic: UInt64 = 0x324C_4E4A_4B4D_4454
    /// Mixed into record checks so a record cannot pass as a header word and vice versa.
    private static let recordSalt: UInt64 = 0x5245_434F_5244_0000

    static func header(epoch: UInt64, generation: UInt64) -> [UInt8] {
        var bytes: [UInt8] = []
        FileIO.encodeWords([magic, epoch, generation, Checksum.fnv1a([magic, epoch, generation])], into: &bytes)
        return bytes
    }

    static func records(_ regions: [UInt64], epoch: UInt64) -> [UInt8] {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(regions.count * recordSize)
        for region in regions {
            FileIO.encodeWords([region, recordCheck(region: region, epoch: epoch)], into: &bytes)
        }
        return bytes
    }

    private static func recordCheck(region: UInt64, epoch: UInt64) -> UInt64 {
        Checksum.fnv1a([recordSalt ^ epoch, region])
    }

    /// Bytes to reserve for a journal of an image with `regionCount` regions: each region
    /// is journaled at most once per epoch, so appends never need a new block.
    static func reservation(regionCount: UInt64) -> UInt64 {
        UInt64(headerSize) + regionCount * UInt64(recordSize)
    }

    /// What a journal file says.
    struct Parsed {
        var epoch: UInt64
        var generation: UInt64
        var regions: Set<UInt64>
    }

    /// Why a journal file cannot be trusted.
    struct Damage: Error {
        var reason: String
    }

    /// The header alone, for a journal whose records do not matter (a damaged store's
    /// highest generation).
    static func parseHeader(_ bytes: [UInt8]) -> (epoch: UInt64, generation: UInt64)? {
        guard bytes.count >= headerSize else { return nil }
        let words = FileIO.decodeWords(bytes[0..<headerSize])
        guard words.count == 4, words[0] == magic, Checksum.fnv1a(Array(words[0..<3])) == words[3] else { return nil }
        return (words[1], words[2])
    }

    /// Parses a whole journal that must belong to `epoch` and name only regions below
    /// `regionCount`.
    static func parse(_ bytes: [UInt8], epoch: UInt64, regionCount: UInt64) -> Result<Parsed, Damage> {
        guard bytes.count >= headerSize else {
            return .failure(Damage(reason: "the journal header is missing (\(bytes.count) bytes)"))
        }
        guard let header = parseHeader(bytes) else {
            return .failure(Damage(reason: "the journal header is not valid"))
        }
        guard header.epoch == epoch else {
            return .failure(Damage(reason: "the journal header names epoch \(header.epoch), not \(epoch)"))
        }
        var regions = Set<UInt64>()
        var position = headerSize
        while position + recordSize <= bytes.count {
            let words = FileIO.decodeWords(bytes[position..<(position + recordSize)])
            guard words.count == 2, words[1] == recordCheck(region: words[0], epoch: epoch) else {
                return .failure(Damage(reason: "journal record at byte \(position) fails its check"))
            }
            guard words[0] < regionCount else {
                return .failure(Damage(reason: "journal record at byte \(position) names region \(words[0]) beyond the image"))
            }
            regions.insert(words[0])
            position += recordSize
        }
        return .success(Parsed(epoch: epoch, generation: header.generation, regions: regions))
    }
}
