#if canImport(Glibc)
import Glibc
#endif

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
