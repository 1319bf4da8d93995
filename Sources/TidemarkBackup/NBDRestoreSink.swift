import NBDClient

/// An NBD export at least as large as the disk; zero ranges are sent as WRITE_ZEROES
/// (the export may hold old data).
final class NBDRestoreSink: RestoreSink {
    let connection: NBDConnection
    let uri: String
    let canZero: Bool

    init(uri: String, virtualSize: UInt64, tls: NBDClientTLS?) throws(BackupError) {
        self.uri = uri
        do {
            connection = try NBDConnection(NBDConnectionConfiguration(tls: tls))
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
