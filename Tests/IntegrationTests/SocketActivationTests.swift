import Foundation
import Testing

/// systemd-style socket activation, as nbdcopy's captive-server syntax uses it:
/// `nbdcopy -- [ tidemark serve IMAGE ] DEST` starts the server with LISTEN_PID/LISTEN_FDS
/// and the listening socket on fd 3.
@Suite("Socket activation", .serialized)
struct SocketActivationTests {
    @Test("nbdcopy's captive [ tidemark serve IMAGE ] copies the image through the inherited socket")
    func nbdcopyCaptiveServer() throws {
        let directory = try TestDirectory()
        let source = directory.file("source.raw")
        let copy = directory.file("copy.raw")
        try ImageFile.createFilled(source, size: 8 << 20, seed: 7)
        let result = try ExternalTool.check(
            "nbdcopy", ["--", "[", TidemarkProcess.binaryPath, "serve", source, "]", copy], timeout: 60)
        #expect(try ImageFile.read(copy) == ImageFile.read(source), "copy differs; \(result.stderr)")
        // The server said where it listened: the socket it inherited, not a port of its own.
        #expect(result.stderr.contains("inherited socket fd 3"), "\(result.stderr)")
    }

    @Test("a captive server accepts writes: nbdcopy into [ tidemark serve IMAGE ]")
    func nbdcopyIntoCaptiveServer() throws {
        let directory = try TestDirectory()
        let source = directory.file("source.raw")
        let target = directory.file("target.raw")
        try ImageFile.createFilled(source, size: 4 << 20, seed: 9)
        try ImageFile.createSparse(target, size: 4 << 20)
        try ExternalTool.check(
            "nbdcopy", [source, "--", "[", TidemarkProcess.binaryPath, "serve", target, "]"], timeout: 60)
        #expect(try ImageFile.read(target) == ImageFile.read(source))
        // With no bitmaps there is nothing to persist: the sidecar store holds only its lock.
        let store = try FileManager.default.contentsOfDirectory(atPath: target + ".tidemark")
        #expect(store == ["lock"], "\(store)")
    }
}
