import FoundationEssentials
import NBDClient

#if canImport(Glibc)
import Glibc
#endif

/// Writes the disk as a backup chain yields it at one point to a raw image file (sparse:
/// zero and unallocated clusters are not written) or to an NBD export.
///
/// Why not `qemu-img convert`: restore must work where QEMU is not installed, and it reads
/// the chain with the same reader ``ChainVerifier`` trusts.
public struct RestoreJob: Sendable {
    /// What a restore did.
    public struct Result: Sendable, Codable, Equatable {
        public var output: String
        /// The chain point restored (index) and its name.
        public var index: Int
        public var name: String
        public var virtualSize: UInt64
        public var bytesWritten: UInt64
        public var bytesZeroed: UInt64
        public var durationSeconds: Double
    }

    /// Largest run of data clusters read and written at once.
    static let runLimit: UInt64 = 4 << 20

    public let directory: String
    /// `--at`: index, checkpoint name or file name; nil for the newest backup.
    public let point: String?
    /// A file path, or an NBD URI (anything starting with `nbd`).
    public let output: String
    /// TLS for an NBD output (`--tls-certificates`, `--tls-psk`); nil leaves it to the URI.
    public let tls: NBDClientTLS?

    public init(directory: String, point: String?, output: String, tls: NBDClientTLS? = nil) {
        self.directory = directory
        self.point = point
        self.output = output
        self.tls = tls
    }

    public static func isNBDURI(_ text: String) -> Bool {
        text.hasPrefix("nbd://") || text.hasPrefix("nbds://") || text.hasPrefix("nbd+unix://")
            || text.hasPrefix("nbds+unix://") || text.hasPrefix("nbd+vsock://")
    }

    public func run() throws(BackupError) -> Result {
        let started = Date()
        let backups = BackupDirectory(path: directory)
        let chain = try backups.chain()
        let index = try backups.point(point, in: chain)
        let reader = try ChainReader(directory: backups, chain: chain, point: index)
        let sink: any RestoreSink =
            Self.isNBDURI(output)
            ? try NBDRestoreSink(uri: output, virtualSize: reader.virtualSize, tls: tls)
            : try FileRestoreSink(path: output, virtualSize: reader.virtualSize)
        var written: UInt64 = 0
        var zeroed: UInt64 = 0
        let clusterSize = reader.clusterSize
        var cluster: UInt64 = 0
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(Self.runLimit), alignment: 4096)
        defer { buffer.deallocate() }
        while cluster < reader.clusterCount {
            let isData = try reader.source(ofCluster: cluster) != .zero
            var end = cluster + 1
            while end < reader.clusterCount, (end - cluster) * clusterSize < Self.runLimit,
                try (reader.source(ofCluster: end) != .zero) == isData
            {
                end += 1
            }
            let offset = cluster * clusterSize
            let length = min(end * clusterSize, reader.virtualSize) - offset
            if isData {
                let target = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<Int(length)])
                try reader.read(into: target, at: offset)
                try sink.write(UnsafeRawBufferPointer(target), at: offset)
                written += length
            } else {
                try sink.zero(length: length, at: offset)
                zeroed += length
            }
            cluster = end
        }
        try sink.finish()
        return Result(
            output: output, index: index, name: chain[index].displayName, virtualSize: reader.virtualSize,
            bytesWritten: written, bytesZeroed: zeroed, durationSeconds: Date().timeIntervalSince(started))
    }
}
