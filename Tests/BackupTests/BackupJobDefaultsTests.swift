import Testing
import TidemarkBackup

#if canImport(Glibc)
import Glibc
#endif

/// The defaults a backup picks when the command line leaves them open.
@Suite("Backup: defaults")
struct BackupJobDefaultsTests {
    @Test("connections: one per core up to 4 with multi-conn, never more than the requests; one without")
    func connections() {
        let cores = max(1, sysconf(Int32(_SC_NPROCESSORS_ONLN)))
        #expect(BackupJob.defaultConnections(canMultiConn: false, requests: 1000) == 1)
        #expect(BackupJob.defaultConnections(canMultiConn: true, requests: 1000) == min(4, cores))
        #expect(BackupJob.defaultConnections(canMultiConn: true, requests: 1) == 1)
        #expect(BackupJob.defaultConnections(canMultiConn: true, requests: 0) == 1)
    }

    @Test("reads in flight: about 16 MiB, 2 to 64 reads")
    func window() {
        #expect(BackupJob.defaultWindow(requestSize: 4 << 20) == 4)
        #expect(BackupJob.defaultWindow(requestSize: 64 << 10) == 64)
        #expect(BackupJob.defaultWindow(requestSize: 32 << 20) == 2)
    }
}
