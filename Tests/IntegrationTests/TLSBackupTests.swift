import Foundation
import NBDClient
import Testing
import TestSupport

/// The backup client over TLS: against Tidemark over TCP with the `--control` checkpoint
/// cycle (the point-in-time view is reached with the same TLS settings), restored to a
/// raw file and to an NBD export over TLS; and against nbdkit `--tls=require`.
@Suite("TLS backups: full and incremental over TCP with TLS, restored byte-exact; nbdkit as a TLS peer")
struct TLSBackupTests {
    static let mib = 1 << 20

    @Test("full + incremental over nbds:// with --tls-certificates and --control; restores match; restore into an export over TLS")
    func backupOverTCP() throws {
        let directory = try TestDirectory()
        let files = try TLSFiles(in: directory)
        let size = 16 * Self.mib
        let image = directory.file("disk.img")
        try ImageFile.createSparse(image, size: size)
        let control = directory.file("qmp.sock")
        let (server, port) = try TidemarkProcess.serveTCP(
            image: image, in: directory,
            extraArguments: [
                "--tls", "require", "--tls-certificates", files.certificates, "--control", control, "--bitmap", "b0",
            ])
        let uri = "nbds://127.0.0.1:\(port)/disk"
        let tls = NBDClientTLS(certificatesDirectory: files.certificates)
        let writer = try NBDConnection(NBDConnectionConfiguration(exportName: "disk", tls: tls))
        try writer.connect(host: "127.0.0.1", port: port)
        #expect(try writer.tlsNegotiated)
        var generator = SeededGenerator(seed: 15)
        try BackupChecks.mutate(writer, size: UInt64(size), operations: 40, generator: &generator)

        let chain = directory.file("chain")
        let full = try BackupChecks.backup(
            ["full", uri, chain, "--tls-certificates", files.certificates, "--control", control, "--bitmap", "b0"])
        #expect(full["kind"] as? String == "full")
        var expected = [directory.file("expected-0.raw")]
        try BackupChecks.snapshot(writer, to: expected[0])

        try BackupChecks.mutate(writer, size: UInt64(size), operations: 30, generator: &generator)
        let incremental = try BackupChecks.backup(
            ["incremental", uri, chain, "--tls-certificates", files.certificates, "--control", control, "--bitmap", "b0"])
        #expect(incremental["index"] as? Int == 1)
        #expect((incremental["bytesCopied"] as? Int ?? size) < size / 2, "\(incremental)")
        expected.append(directory.file("expected-1.raw"))
        try BackupChecks.snapshot(writer, to: expected[1])
        try writer.shutdown()
        try BackupChecks.checkChain(chain, expected: expected, scratch: directory)

        // Restore the newest point into another Tidemark export over TLS (TCP).
        let targetDirectory = try TestDirectory()
        let target = targetDirectory.file("target.img")
        try ImageFile.createFilled(target, size: size, seed: 99)
        let (targetServer, targetPort) = try TidemarkProcess.serveTCP(
            image: target, in: targetDirectory, extraArguments: ["--tls", "require", "--tls-certificates", files.certificates])
        let plainRestore = try ControlPrograms.tidemark(["restore", chain, "nbd://127.0.0.1:\(targetPort)/disk"])
        #expect(!plainRestore.succeeded, "a plaintext restore into a TLS-only server must fail")
        try ControlPrograms.tidemark(
            ["restore", chain, "nbds://127.0.0.1:\(targetPort)/disk", "--tls-certificates", files.certificates]
        ).requireSuccess()
        try targetServer.stop()
        #expect(try ImageFile.sha256(target) == ImageFile.sha256(expected[1]))
        try server.stop()
    }

    @Test("across hosts: the server in its own network namespace behind a veth pair; full + incremental over TLS, restored byte-exact")
    func acrossNamespaces() throws {
        let namespace = try NetworkNamespace()
        defer { namespace.remove() }
        let directory = try TestDirectory()
        let files = try TLSFiles(in: directory, serverHosts: [namespace.address])
        let size = 16 * Self.mib
        let image = directory.file("disk.img")
        try ImageFile.createSparse(image, size: size)
        let control = directory.file("qmp.sock")
        let port = 10809
        let server = try TidemarkProcess(
            arguments: [
                "serve", image, "--name", "disk", "--bind", namespace.address, "--port", String(port), "--tls", "require",
                "--tls-certificates", files.certificates, "--control", control, "--bitmap", "b0",
            ],
            directory: directory, launcher: namespace.launcher)
        let uri = "nbds://\(namespace.address):\(port)/disk"
        let writer = try NBDConnection(
            NBDConnectionConfiguration(exportName: "disk", tls: NBDClientTLS(certificatesDirectory: files.certificates)))
        try writer.connect(host: namespace.address, port: port)
        #expect(try writer.tlsNegotiated)
        var generator = SeededGenerator(seed: 31)
        try BackupChecks.mutate(writer, size: UInt64(size), operations: 30, generator: &generator)
        let chain = directory.file("chain")
        _ = try BackupChecks.backup(
            ["full", uri, chain, "--tls-certificates", files.certificates, "--control", control, "--bitmap", "b0"])
        var expected = [directory.file("expected-0.raw")]
        try BackupChecks.snapshot(writer, to: expected[0])
        try BackupChecks.mutate(writer, size: UInt64(size), operations: 20, generator: &generator)
        _ = try BackupChecks.backup(
            ["incremental", uri, chain, "--tls-certificates", files.certificates, "--control", control, "--bitmap", "b0"])
        expected.append(directory.file("expected-1.raw"))
        try BackupChecks.snapshot(writer, to: expected[1])
        try writer.shutdown()
        // Plaintext across the link is refused.
        #expect(!(try ExternalTool.run("nbdinfo", ["--size", "nbd://\(namespace.address):\(port)/disk"]).succeeded))
        try BackupChecks.checkChain(chain, expected: expected, scratch: directory)
        try server.stop()
    }

    /// Another server as the TLS peer: `arguments(certificates, socket, image)` start it
    /// on a Unix socket serving export `export`; a full backup over TLS must restore
    /// byte-exact, and a plaintext backup must be refused.
    func backupFromPeer(
        _ program: String, export: String, seed: UInt8, arguments: (String, String, String) -> [String]
    ) throws {
        let directory = try TestDirectory()
        let files = try TLSFiles(in: directory)
        let image = directory.file("source.img")
        try ImageFile.createFilled(image, size: 8 * Self.mib, seed: seed)
        let socket = directory.file("peer.sock")
        let peer = try BackgroundProgram(
            try ExternalTool.locate(program), arguments(files.certificates, socket, image))
        defer { peer.kill() }
        let deadline = Date().addingTimeInterval(20)
        while !FileManager.default.fileExists(atPath: socket) && Date() < deadline { usleep(20_000) }
        #expect(FileManager.default.fileExists(atPath: socket), "\(program) did not start: \(peer.result)")
        let chain = directory.file("chain")
        _ = try BackupChecks.backup(
            ["full", "nbds+unix:///\(export)?socket=\(socket)", chain, "--tls-certificates", files.certificates])
        let restored = directory.file("restored.raw")
        try ControlPrograms.tidemark(["restore", chain, restored]).requireSuccess()
        #expect(try ImageFile.sha256(restored) == ImageFile.sha256(image))
        let plain = try ControlPrograms.tidemark(
            ["backup", "full", "nbd+unix:///\(export)?socket=\(socket)", directory.file("plain")])
        #expect(!plain.succeeded, "\(program) with TLS required accepted a plaintext backup")
    }

    @Test("a full backup from nbdkit --tls=require over TLS restores byte-exact")
    func backupFromNbdkit() throws {
        try backupFromPeer("nbdkit", export: "", seed: 21) { certificates, socket, image in
            ["--foreground", "--exit-with-parent", "--tls=require", "--tls-certificates=\(certificates)",
             "--unix", socket, "file", image]
        }
    }

    @Test("a full backup from qemu-nbd with tls-creds-x509 over TLS restores byte-exact")
    func backupFromQemuNbd() throws {
        try backupFromPeer("qemu-nbd", export: "disk", seed: 23) { certificates, socket, image in
            ["--object", "tls-creds-x509,id=tls0,dir=\(certificates),endpoint=server,verify-peer=off",
             "--tls-creds", "tls0", "-r", "-t", "-f", "raw", "-x", "disk", "-k", socket, image]
        }
    }
}
