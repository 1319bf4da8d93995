#if canImport(Glibc)
import Glibc
#endif

/// The sd_notify(3) protocol, spoken directly: newline-separated `KEY=VALUE` assignments
/// in one datagram to the Unix socket named by `NOTIFY_SOCKET`.
///
/// Written here rather than linked from libsystemd so the static, self-contained release
/// binary keeps running where libsystemd is absent (containers, other init systems);
/// the protocol is a documented, stable datagram format. Paths starting with `@` are in
/// Linux's abstract namespace (a leading NUL byte, no file).
public final class ServiceNotifier: Sendable {
    /// The address as given in `NOTIFY_SOCKET`.
    public let address: String
    private let descriptor: Int32
    private let socketAddress: sockaddr_un
    private let addressLength: socklen_t

    /// Opens a datagram socket for `address` (`/path` or `@abstract`).
    public init(address: String) throws(ServiceNotifierError) {
        var bytes = Array(address.utf8)
        guard let first = bytes.first, first == UInt8(ascii: "/") || first == UInt8(ascii: "@") else {
            throw .invalidAddress(address)
        }
        var socketAddress = sockaddr_un()
        socketAddress.sun_family = sa_family_t(AF_UNIX)
        let capacity = MemoryLayout.size(ofValue: socketAddress.sun_path)
        if first == UInt8(ascii: "@") {
            bytes[0] = 0  // abstract: no terminating NUL, the length says where the name ends
            guard bytes.count <= capacity, bytes.count > 1 else { throw .invalidAddress(address) }
        } else {
            guard bytes.count < capacity else { throw .invalidAddress(address) }
        }
        withUnsafeMutableBytes(of: &socketAddress.sun_path) { $0.copyBytes(from: bytes) }
        let pathOffset = MemoryLayout<sockaddr_un>.offset(of: \.sun_path) ?? 2
        self.addressLength = socklen_t(pathOffset + bytes.count + (first == UInt8(ascii: "@") ? 0 : 1))
        self.socketAddress = socketAddress
        self.address = address
        let descriptor = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard descriptor >= 0 else { throw .system(call: "socket", errno: errno) }
        self.descriptor = descriptor
    }

    deinit {
        close(descriptor)
    }

    /// The notifier `NOTIFY_SOCKET` asks for, or nil when the process was not started by a
    /// service manager that listens. The variable is removed so that programs started
    /// later do not notify in the server's name (sd_notify's `unset_environment`).
    public static func fromEnvironment() throws(ServiceNotifierError) -> ServiceNotifier? {
        guard let value = getenv("NOTIFY_SOCKET") else { return nil }
        let address = String(cString: value)
        unsetenv("NOTIFY_SOCKET")
        guard !address.isEmpty else { return nil }
        return try ServiceNotifier(address: address)
    }

    /// Sends `assignments` (e.g. `["READY=1", "STATUS=serving"]`) as one datagram.
    public func send(_ assignments: [String]) throws(ServiceNotifierError) {
        let message = assignments.map { $0.replacingNewlines() }.joined(separator: "\n")
        var address = socketAddress
        let length = addressLength
        let sent = message.utf8CString.withUnsafeBufferPointer { buffer in
            withUnsafePointer(to: &address) { pointer in
                pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { socketAddress in
                    sendto(
                        descriptor, buffer.baseAddress, buffer.count - 1, Int32(MSG_NOSIGNAL), socketAddress,
                        length)
                }
            }
        }
        guard sent >= 0 else { throw .system(call: "sendto", errno: errno) }
    }
}

extension String {
    /// A value must stay on its assignment's line: newlines become spaces.
    fileprivate func replacingNewlines() -> String {
        String(unicodeScalars.map { $0 == "\n" || $0 == "\r" ? " " : Character($0) })
    }
}
