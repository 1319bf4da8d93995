import FoundationEssentials

/// The JSON record written beside each backup file: what was backed up, from where, and
/// a checksum of every extent, so ``ChainVerifier`` can prove later that the chain still
/// yields exactly what was pulled.
///
/// The manifest is renamed into place after its qcow2 file, so its presence marks the
/// backup complete: a qcow2 file without a manifest is debris from an interrupted run.
public struct BackupManifest: Codable, Sendable, Equatable {
    /// Full backups start a chain; incremental ones add what changed.
    public enum Kind: String, Codable, Sendable {
        case full
        case incremental
    }

    /// One backed-up range of the virtual disk.
    public struct Extent: Codable, Sendable, Equatable {
        /// Copied data, or a range recorded as zeroes (qcow2 zero clusters).
        public enum Content: String, Codable, Sendable {
            case data
            case zero
        }

        public var offset: UInt64
        public var length: UInt64
        public var content: Content
        /// XXH64 of the data as 16 hex digits; absent for zero extents (they must read as
        /// zeroes).
        public var xxh64: String?

        public init(offset: UInt64, length: UInt64, content: Content, xxh64: String? = nil) {
            self.offset = offset
            self.length = length
            self.content = content
            self.xxh64 = xxh64
        }
    }

    /// Manifest format version.
    public var format: Int = 1
    /// Position in the chain (0 = the full backup).
    public var index: Int
    /// The qcow2 file's name in the backup directory.
    public var file: String
    public var kind: Kind
    /// The bitmap the increment came from (incremental, or full with `--control`).
    public var bitmap: String?
    /// The checkpoint (increment) name, when one was created for this backup.
    public var checkpoint: String?
    /// The checkpoint's unique id on the server (`--control` backups): the next
    /// incremental must start from it.
    public var checkpointID: String?
    /// The server's last completed checkpoint the increment started from (incremental
    /// `--control` backups).
    public var baseCheckpointID: String?
    /// Later checkpoints whose changes the increment also held (aborted or superseded).
    public var coveredCheckpointIDs: [String]?
    /// When the pull finished, ISO 8601 UTC.
    public var created: String
    public var virtualSize: UInt64
    /// The NBD URI the data came from.
    public var source: String
    /// The previous backup's file name (the qcow2 backing file), nil for a full backup.
    public var backingFile: String?
    /// The checksum algorithm of ``Extent/xxh64``.
    public var checksum: String = "xxh64"
    public var bytesCopied: UInt64
    public var bytesZeroed: UInt64
    /// Sorted by offset, non-overlapping.
    public var extents: [Extent]

    public init(
        index: Int, file: String, kind: Kind, bitmap: String?, checkpoint: String?, created: String,
        virtualSize: UInt64, source: String, backingFile: String?, bytesCopied: UInt64, bytesZeroed: UInt64,
        extents: [Extent]
    ) {
        self.index = index
        self.file = file
        self.kind = kind
        self.bitmap = bitmap
        self.checkpoint = checkpoint
        self.created = created
        self.virtualSize = virtualSize
        self.source = source
        self.backingFile = backingFile
        self.bytesCopied = bytesCopied
        self.bytesZeroed = bytesZeroed
        self.extents = extents
    }

    /// True when this backup holds every change since the checkpoint `id` was taken, as
    /// the server vouched when its checkpoint was created.
    public func startsAt(checkpointID id: String) -> Bool {
        baseCheckpointID == id || (coveredCheckpointIDs ?? []).contains(id)
    }

    /// The name a user can pass to `--at`: the checkpoint, else the file name.
    public var displayName: String {
        checkpoint ?? file
    }

    /// Pretty-printed JSON with sorted keys.
    public func encoded() throws(BackupError) -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        do {
            return Array(try encoder.encode(self)) + [UInt8(ascii: "\n")]
        } catch {
            throw BackupError.invalidManifest(path: file, reason: "cannot encode: \(error)")
        }
    }

    /// Reads and decodes the manifest at `path`.
    public static func load(path: String) throws(BackupError) -> BackupManifest {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw BackupError.invalidManifest(path: path, reason: "cannot be read")
        }
        do {
            return try JSONDecoder().decode(BackupManifest.self, from: data)
        } catch {
            throw BackupError.invalidManifest(path: path, reason: "not a valid manifest: \(error)")
        }
    }

    /// The current time as ISO 8601 UTC.
    public static func timestamp(_ date: Date = Date()) -> String {
        date.formatted(.iso8601)
    }
}
