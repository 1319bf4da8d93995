#if canImport(Glibc)
import Glibc
#endif
import TidemarkServer

/// systemd-style socket activation (`LISTEN_PID`, `LISTEN_FDS`, sockets from fd 3), as
/// nbdkit and qemu-nbd support it: `nbdcopy -- [ tidemark serve IMAGE ] …` starts a
/// captive server this way.
struct SocketActivation {
    static let firstDescriptor: Int32 = 3

    let descriptors: [Int32]

    var listeners: [ServerConfiguration.Listener] { descriptors.map { .inherited(descriptor: $0) } }

    /// The inherited sockets, if this process was socket-activated.
    static func fromEnvironment() -> SocketActivation? {
        guard let pidText = getenv("LISTEN_PID"), let fdsText = getenv("LISTEN_FDS"),
            let pid = Int32(String(cString: pidText)), pid == getpid(),
            let count = Int32(String(cString: fdsText)), count > 0, count < 64
        else { return nil }
        unsetenv("LISTEN_PID")
        unsetenv("LISTEN_FDS")
        unsetenv("LISTEN_FDNAMES")
        return SocketActivation(descriptors: (0..<count).map { firstDescriptor + $0 })
    }
}
