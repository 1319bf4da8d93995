import Foundation
import TestSupport
import Testing
import TidemarkService

#if canImport(Glibc)
import Glibc
#endif

/// sd_notify datagrams, received on a real Unix datagram socket (path and abstract).
@Suite("Service notifier")
struct ServiceNotifierTests {
    @Test("a datagram reaches a socket bound to a path")
    func pathSocket() throws {
        let path = "/tmp/tm-notify-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let receiver = try DatagramReceiver(address: path)
        defer { unlink(path) }
        let notifier = try ServiceNotifier(address: path)
        try notifier.send(["READY=1", "STATUS=serving\nline"])
        #expect(try receiver.receive() == "READY=1\nSTATUS=serving line")
    }

    @Test("an @name address is in the abstract namespace")
    func abstractSocket() throws {
        let address = "@tidemark-notify-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let receiver = try DatagramReceiver(address: address)
        let notifier = try ServiceNotifier(address: address)
        try notifier.send(["WATCHDOG=1"])
        #expect(try receiver.receive() == "WATCHDOG=1")
        #expect(!FileManager.default.fileExists(atPath: String(address.dropFirst())))
    }

    @Test("relative or empty addresses are refused; a socket nobody listens on fails to send")
    func badAddresses() throws {
        #expect(throws: ServiceNotifierError.invalidAddress("relative/path")) {
            try ServiceNotifier(address: "relative/path")
        }
        #expect(throws: ServiceNotifierError.invalidAddress("@")) { try ServiceNotifier(address: "@") }
        let notifier = try ServiceNotifier(address: "/tmp/tm-no-such-notify-socket-\(getpid())")
        #expect(throws: ServiceNotifierError.system(call: "sendto", errno: ENOENT)) { try notifier.send(["READY=1"]) }
    }

    @Test("WATCHDOG_USEC and WATCHDOG_PID: half the timeout, only for this pid")
    func watchdogSettings() {
        let settings = WatchdogSettings.parse(usec: "400000", pid: nil, ownPID: 10)
        #expect(settings?.pingIntervalNanoseconds == 200_000_000)
        #expect(WatchdogSettings.parse(usec: "400000", pid: "10", ownPID: 10) != nil)
        #expect(WatchdogSettings.parse(usec: "400000", pid: "11", ownPID: 10) == nil)
        #expect(WatchdogSettings.parse(usec: "0", pid: nil, ownPID: 10) == nil)
        #expect(WatchdogSettings.parse(usec: "soon", pid: nil, ownPID: 10) == nil)
        #expect(WatchdogSettings.parse(usec: nil, pid: "10", ownPID: 10) == nil)
    }
}
