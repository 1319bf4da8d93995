import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// The service manager's end of sd_notify in tests: a bound Unix datagram socket.
public final class DatagramReceiver {
    private let descriptor: Int32

    /// Why binding or receiving failed (a receive timeout included).
    public struct Failure: Error, CustomStringConvertible {
        public let description: String
    }

    /// The address given to `init`, as `NOTIFY_SOCKET` spells it.
    public let address: String

    /// Binds `address` (`/path` or `@abstract`).
    public init(address: String) throws {
        self.address = address
        descriptor = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0)
        guard descriptor >= 0 else { throw Failure(description: "socket: errno \(errno)") }
        var socketAddress = sockaddr_un()
        socketAddress.sun_family = sa_family_t(AF_UNIX)
        var bytes = Array(address.utf8)
        let abstract = bytes.first == UInt8(ascii: "@")
        if abstract { bytes[0] = 0 }
        withUnsafeMutableBytes(of: &socketAddress.sun_path) { $0.copyBytes(from: bytes) }
        let length = socklen_t(2 + bytes.count + (abstract ? 0 : 1))
        let bound = withUnsafePointer(to: &socketAddress) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(descriptor, $0, length) }
        }
        guard bound == 0 else {
            close(descriptor)
            throw Failure(description: "bind \(address): errno \(errno)")
        }
    }

    deinit {
        close(descriptor)
    }

    /// Datagrams received until one satisfies `done` (included), within `timeout` seconds in all.
    public func receive(until done: (String) -> Bool, timeout: Double = 30) throws -> [String] {
        var received: [String] = []
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            let left = deadline.timeIntervalSinceNow
            guard left > 0 else {
                throw Failure(description: "no matching datagram on \(address) within \(timeout) s; got \(received)")
            }
            let message = try receive(timeout: max(0.05, left))
            received.append(message)
            if done(message) { return received }
        }
    }

    /// The next datagram as text; throws if none arrives within `timeout` seconds.
    public func receive(timeout: Double = 10) throws -> String {
        var limit = timeval(tv_sec: Int(timeout), tv_usec: Int((timeout - timeout.rounded(.down)) * 1_000_000))
        setsockopt(descriptor, SOL_SOCKET, SO_RCVTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size))
        var buffer = [UInt8](repeating: 0, count: 4096)
        let count = recv(descriptor, &buffer, buffer.count, 0)
        guard count >= 0 else { throw Failure(description: "no datagram on \(address) within \(timeout) s (errno \(errno))") }
        return String(decoding: buffer[0..<count], as: UTF8.self)
    }
}
