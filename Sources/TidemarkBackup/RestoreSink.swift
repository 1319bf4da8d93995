/// Where restored bytes go.
protocol RestoreSink {
    func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws(BackupError)
    func zero(length: UInt64, at offset: UInt64) throws(BackupError)
    func finish() throws(BackupError)
}
