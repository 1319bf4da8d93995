import Foundation
import TestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// sd_notify from the real server: a test plays the service manager with a Unix datagram
/// socket named in `NOTIFY_SOCKET`, as systemd does for `Type=notify` units.
@Suite("Service manager notifications", .serialized)
struct ServiceNotifyTests {
    @Test("READY=1 once the listener accepts clients, with a STATUS line; STOPPING=1 on SIGTERM, then exit 0")
    func readyAndStopping() throws {
        let directory = try TestDirectory()
        let image = directory.file("disk.img")
        try ImageFile.createSparse(image, size: 1 << 20)
        let manager = try DatagramReceiver(address: directory.file("notify.sock"))
        let server = try TidemarkProcess(
            arguments: ["serve", image, "--unix", directory.socketPath], directory: directory, expectedListeners: 0,
            environment: ["NOTIFY_SOCKET": manager.address])

        let ready = try manager.receive(timeout: 30)
        let lines = ready.split(separator: "\n").map(String.init)
        #expect(lines.first == "READY=1", "\(ready)")
        #expect(lines.contains("STATUS=serving 1 export on nbd+unix:///disk?socket=\(directory.socketPath); 0 connections"), "\(ready)")
        // Ready means ready: a client connects at once, and the `listening on` line was printed first.
        try ExternalTool.check("nbdinfo", ["nbd+unix:///disk?socket=\(directory.socketPath)"])
        #expect(server.listeners == ["nbd+unix:///disk?socket=\(directory.socketPath)"], "\(server.output)")

        kill(server.process.processIdentifier, SIGTERM)
        let stopping = try manager.receive(until: { $0.hasPrefix("STOPPING=1") })
        #expect(stopping.last?.contains("STATUS=stopping (SIGTERM)") == true, "\(stopping)")
        #expect(!stopping.contains { $0.contains("WATCHDOG=1") }, "no watchdog was asked for: \(stopping)")
        try server.waitForExit(timeout: 30)
        #expect(server.termination == .success, "\(server.serverLog)")
        // NOTIFY_SOCKET is the manager's business, not a reason for warnings.
        #expect(!server.serverLog.contains("notify"), "\(server.serverLog)")
    }

    @Test("WATCHDOG_USEC=400000 on an abstract @socket: WATCHDOG=1 about every 200 ms")
    func watchdogPings() throws {
        let directory = try TestDirectory()
        let image = directory.file("disk.img")
        try ImageFile.createSparse(image, size: 1 << 20)
        let manager = try DatagramReceiver(address: "@tidemark-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
        let server = try TidemarkProcess(
            arguments: ["serve", image, "--unix", directory.socketPath], directory: directory, expectedListeners: 0,
            environment: ["NOTIFY_SOCKET": manager.address, "WATCHDOG_USEC": "400000"])
        _ = try manager.receive(until: { $0.hasPrefix("READY=1") })
        let start = Date()
        var pings = 0
        while Date().timeIntervalSince(start) < 1.5 {
            if try manager.receive(timeout: 1).split(separator: "\n").contains("WATCHDOG=1") { pings += 1 }
        }
        // 1.5 s at one ping per 200 ms is 7; a loaded machine may delay a few.
        #expect(pings >= 4 && pings <= 9, "\(pings) pings in 1.5 s")
        #expect(try server.stop() == .success)
    }

    @Test("WATCHDOG_PID naming another process: no WATCHDOG=1 from this one")
    func watchdogForAnotherProcess() throws {
        let directory = try TestDirectory()
        let image = directory.file("disk.img")
        try ImageFile.createSparse(image, size: 1 << 20)
        let manager = try DatagramReceiver(address: directory.file("notify.sock"))
        let server = try TidemarkProcess(
            arguments: ["serve", image, "--unix", directory.socketPath], directory: directory, expectedListeners: 0,
            environment: ["NOTIFY_SOCKET": manager.address, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"])
        _ = try manager.receive(until: { $0.hasPrefix("READY=1") })
        #expect(throws: DatagramReceiver.Failure.self, "a ping arrived") { try manager.receive(timeout: 1) }
        #expect(try server.stop() == .success)
    }

    @Test("systemd-socket-activate -l SOCK tidemark serve: serves on the passed socket and notifies readiness")
    func systemdSocketActivate() throws {
        let directory = try TestDirectory()
        let image = directory.file("disk.img")
        try ImageFile.createFilled(image, size: 2 << 20, seed: 11)
        let manager = try DatagramReceiver(address: directory.file("notify.sock"))
        let activator = try SpawnedProgram(
            try ExternalTool.locate("systemd-socket-activate"),
            [
                "-l", directory.socketPath, "-E", "NOTIFY_SOCKET=\(manager.address)",
                TidemarkProcess.binaryPath, "serve", image, "--log-format", "json",
            ])
        let deadline = Date().addingTimeInterval(10)
        while !FileManager.default.fileExists(atPath: directory.socketPath) && Date() < deadline { usleep(10_000) }
        // systemd-socket-activate starts the server on the first connection, which it then serves.
        let copy = directory.file("copy.raw")
        try ExternalTool.check("nbdcopy", ["nbd+unix:///disk?socket=\(directory.socketPath)", copy], timeout: 60)
        #expect(try ImageFile.read(copy) == ImageFile.read(image))
        let ready = try manager.receive(until: { $0.hasPrefix("READY=1") })
        #expect(ready.last?.contains("STATUS=serving 1 export on inherited socket fd 3") == true, "\(ready)")
        // The activator execs the server in its own process: SIGTERM to that pid reaches tidemark.
        kill(activator.pid, SIGTERM)
        _ = try manager.receive(until: { $0.hasPrefix("STOPPING=1") })
        let result = try activator.wait(timeout: 30)
        #expect(result.status == 0, "\(result)")
        let log = try JSONLogLines(result.stderr.split(separator: "\n").filter { $0.hasPrefix("{") }.joined(separator: "\n"))
        #expect(log.events("server.listening").first?["message"] as? String == "listening on inherited socket fd 3", "\(result.stderr)")
        #expect(log.events("connection.close").contains { $0["export"] as? String == "disk" }, "\(result.stderr)")
    }
}
