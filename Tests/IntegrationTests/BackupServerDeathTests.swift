import Foundation
import NBDClient
import Testing
import QMPWire

#if canImport(Glibc)
import Glibc
#endif

/// The backup CLI when its server dies under it: before SIGPIPE was ignored, the write of
/// `checkpoint-abort` to the dead control socket killed the client silently (status 141).
@Suite("Backup: the server dies under the CLI")
struct BackupServerDeathTests {
    @Test("server SIGKILLed mid-pull of `backup incremental --control`: exit 1 with a message (not 141), no new manifest")
    func serverKilledMidIncremental() throws {
        let size = 192 << 20
        let fixture = try ControlFixture(size: size, extraArguments: ["--bitmap", "b0"])
        let chain = fixture.directory.file("chain")
        let uri = try fixture.uri()
        try ControlPrograms.tidemark(
            ["backup", "full", uri, chain, "--control", fixture.controlPath, "--bitmap", "b0"], timeout: 300
        ).requireSuccess()
        // Dirty the whole image, so the incremental has a lot to pull.
        let connection = try fixture.connect()
        for offset in stride(from: 0, to: size, by: 4 << 20) {
            try connection.pwrite(ImageFile.pattern(count: 4 << 20, offset: offset, seed: 5), offset: UInt64(offset))
        }
        try connection.flush()
        try connection.shutdown()
        let before = BackupFailureTests.files(chain)
        #expect(before == ["backup-0000.json", "backup-0000.qcow2"])

        let errPath = fixture.directory.file("backup.stderr")
        _ = FileManager.default.createFile(atPath: errPath, contents: nil)
        let errHandle = try #require(FileHandle(forWritingAtPath: errPath))
        let client = Process()
        client.executableURL = URL(fileURLWithPath: TidemarkProcess.binaryPath)
        client.arguments = [
            "backup", "incremental", uri, chain, "--control", fixture.controlPath, "--bitmap", "b0",
            "--connections", "1", "--in-flight", "1", "--request-size", "65536",
        ]
        client.standardOutput = FileHandle.nullDevice
        client.standardError = errHandle
        client.standardInput = FileHandle.nullDevice
        try client.run()
        defer { if client.isRunning { kill(client.processIdentifier, SIGKILL) } }

        // Kill the server once the pull has started writing the new backup's partial file.
        let deadline = Date().addingTimeInterval(120)
        var pulling = false
        while !pulling && client.isRunning && Date() < deadline {
            pulling = BackupFailureTests.files(chain).contains { $0.hasSuffix(".partial") }
            if !pulling { usleep(1_000) }
        }
        try #require(pulling, "the incremental never started pulling: \(BackupFailureTests.files(chain))")
        #expect(kill(fixture.server.process.processIdentifier, SIGKILL) == 0)

        let exitDeadline = Date().addingTimeInterval(120)
        while client.isRunning && Date() < exitDeadline { usleep(10_000) }
        try #require(!client.isRunning, "the backup client did not exit after its server died")
        try? errHandle.close()
        let stderr = (try? String(contentsOfFile: errPath, encoding: .utf8)) ?? ""
        #expect(client.terminationReason == .exit, "killed by signal \(client.terminationStatus); stderr: \(stderr)")
        #expect(client.terminationStatus == 1, "stderr: \(stderr)")
        #expect(stderr.contains("the server closed the control connection"), "stderr: \(stderr)")
        #expect(BackupFailureTests.files(chain) == before, "left behind: \(BackupFailureTests.files(chain))")
    }
}
