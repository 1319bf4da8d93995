import Testing
@testable import TidemarkBackup

/// Swapping the export name of an NBD URI, as the `--control` cycle does for views.
@Suite("Backup: NBD URIs")
struct NBDURITests {
    @Test("export names of TCP and Unix URIs")
    func exportNames() {
        #expect(NBDURI.exportName(of: "nbd://127.0.0.1:10809/disk") == "disk")
        #expect(NBDURI.exportName(of: "nbd+unix:///disk?socket=/tmp/s.sock") == "disk")
        #expect(NBDURI.exportName(of: "nbd://host") == "")
        #expect(NBDURI.exportName(of: "nbd://host/a%40b") == "a@b")
        #expect(NBDURI.exportName(of: "/tmp/file") == nil)
    }

    @Test("replacing the export keeps host, port and socket")
    func replacing() {
        #expect(NBDURI.replacingExport(of: "nbd://127.0.0.1:10809/disk", with: "disk@c3") == "nbd://127.0.0.1:10809/disk@c3")
        #expect(
            NBDURI.replacingExport(of: "nbd+unix:///disk?socket=/tmp/s.sock", with: "disk@c3")
                == "nbd+unix:///disk@c3?socket=/tmp/s.sock")
        #expect(NBDURI.replacingExport(of: "nbd://host", with: "v 1") == "nbd://host/v%201")
    }
}
