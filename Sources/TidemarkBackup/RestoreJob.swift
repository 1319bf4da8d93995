import Foundation
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

    public init(directory: String, point: String?, output: String) {
        self.directory = directory
        self.point = point
        self.output = output
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
            ? try NBDRestoreSink(uri: output, virtualSize: reader.virtualSize)
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

/// Where restored bytes go.
protocol RestoreSink {
    func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws(BackupError)
    func zero(length: UInt64, at offset: UInt64) throws(BackupError)
    func finish() throws(BackupError)
}

/// A raw image file, created sparse at the disk's size: zeroes are simply not written.
final class FileRestoreSink: RestoreSink {
    let file: BackupFile

    init(path: String, virtualSize: UInt64) throws(BackupError) {
        file = try BackupFile(path: path, flags: O_WRONLY | O_CREAT | O_TRUNC)
        try file.truncate(to: virtualSize)
    }

    func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws(BackupError) {
        try file.write(bytes, at: offset)
    }

    func zero(length: UInt64, at offset: UInt64) throws(BackupError) {}

    func finish() throws(BackupError) {
        try file.sync()
        file.close()
    }
}

/// An NBD export at least as large as the disk; zero ranges are sent as WRITE_ZEROES
/// (the export may hold old data).
final class NBDRestoreSink: RestoreSink {
    let connection: NBDConnection
    let uri: String
    let canZero: Bool

    init(uri: String, virtualSize: UInt64) throws(BackupError) {
        self.uri = uri
        do {
            connection = try NBDConnection()
            try connection.connect(uri: uri)
            let size = try connection.size
            guard size >= virtualSize else {
                throw BackupError.invalidArgument("\(uri) is \(size) bytes, smaller than the backup's \(virtualSize) bytes")
            }
            guard try !connection.isReadOnly else {
                throw BackupError.invalidArgument("\(uri) is read-only")
            }
            canZero = (try? connection.canZero) ?? false
        } catch let error as BackupError {
            throw error
        } catch {
            throw BackupError.connectionFailed(uri: uri, detail: "\(error)")
        }
    }

    func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws(BackupError) {
        do {
            try connection.pwrite([UInt8](bytes), offset: offset)
        } catch {
            throw BackupError.connectionLost(detail: error.description)
        }
    }

    func zero(length: UInt64, at offset: UInt64) throws(BackupError) {
        do {
            if canZero {
                try connection.zero(count: length, offset: offset)
            } else {
                try connection.pwrite([UInt8](repeating: 0, count: Int(length)), offset: offset)
            }
        } catch {
            throw BackupError.connectionLost(detail: error.description)
        }
    }

    func finish() throws(BackupError) {
        do {
            if try connection.canFlush { try connection.flush() }
            try connection.shutdown()
        } catch {
            throw BackupError.connectionLost(detail: error.description)
        }
    }
}
