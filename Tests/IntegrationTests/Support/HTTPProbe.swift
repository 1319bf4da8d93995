import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// A plain TCP client for the metrics endpoint and Prometheus' API: sends bytes exactly
/// as given (hostile requests included) and reads the reply until the server closes.
struct HTTPProbe {
    struct Response {
        let status: Int
        let body: String
    }

    /// A free TCP port on 127.0.0.1 (bound to 0, then released).
    static func freePort() throws -> Int {
        let fd = try connectable()
        defer { close(fd) }
        var address = loopback(port: 0)
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard bound == 0 else { throw HarnessError("bind: errno \(errno)") }
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        return Int(UInt16(bigEndian: address.sin_port))
    }

    private static func connectable() throws -> Int32 {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw HarnessError("socket: errno \(errno)") }
        return fd
    }

    private static func loopback(port: Int) -> sockaddr_in {
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = UInt16(port).bigEndian
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        return address
    }

    /// Connects to 127.0.0.1:`port`; the caller closes the descriptor.
    static func connect(port: Int, receiveTimeout: TimeInterval = 10) throws -> Int32 {
        let fd = try connectable()
        var timeout = timeval(tv_sec: Int(receiveTimeout), tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var address = loopback(port: port)
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        guard result == 0 else {
            let code = errno
            close(fd)
            throw HarnessError("cannot connect to 127.0.0.1:\(port): errno \(code)")
        }
        return fd
    }

    /// Sends all of `bytes`; false when the peer closed or reset first.
    @discardableResult
    static func send(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { raw in
                Glibc.send(fd, raw.baseAddress.map { $0 + done }, raw.count - done, Int32(MSG_NOSIGNAL))
            }
            if n < 0 {
                if errno == EINTR { continue }
                return false
            }
            done += n
        }
        return true
    }

    /// Reads until end of file, a reset or the receive timeout; nil on timeout.
    static func readToEnd(_ fd: Int32) -> [UInt8]? {
        var result: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n > 0 {
                result += chunk[0..<n]
            } else if n == 0 {
                return result
            } else if errno == EINTR {
                continue
            } else if errno == EAGAIN || errno == EWOULDBLOCK {
                return nil
            } else {
                return result  // reset: what arrived before it
            }
        }
    }

    /// Sends `request` as is and parses the reply (status 0 when there was none).
    static func exchange(port: Int, _ request: [UInt8]) throws -> Response {
        let fd = try connect(port: port)
        defer { close(fd) }
        send(fd, request)
        guard let bytes = readToEnd(fd) else { throw HarnessError("no reply from 127.0.0.1:\(port) within the timeout") }
        return parse(bytes)
    }

    /// `GET path` with the headers a scraper sends.
    static func get(port: Int, _ path: String) throws -> Response {
        try exchange(
            port: port,
            Array("GET \(path) HTTP/1.1\r\nHost: 127.0.0.1:\(port)\r\nAccept: text/plain\r\nConnection: close\r\n\r\n".utf8))
    }

    static func parse(_ bytes: [UInt8]) -> Response {
        let text = String(decoding: bytes, as: UTF8.self)
        let statusLine = text.split(separator: "\r\n", maxSplits: 1).first ?? ""
        let parts = statusLine.split(separator: " ")
        let status = parts.count >= 2 ? Int(parts[1]) ?? 0 : 0
        let body = text.range(of: "\r\n\r\n").map { String(text[$0.upperBound...]) } ?? ""
        return Response(status: status, body: body)
    }

    /// The sample lines of a Prometheus text exposition, `name{labels}` → value.
    static func samples(_ exposition: String) -> [String: Double] {
        var result: [String: Double] = [:]
        for line in exposition.split(separator: "\n") where !line.hasPrefix("#") {
            guard let space = line.lastIndex(of: " "), let value = Double(line[line.index(after: space)...]) else { continue }
            result[String(line[..<space])] = value
        }
        return result
    }
}
