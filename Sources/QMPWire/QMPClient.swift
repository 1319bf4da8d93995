import CLinuxIO

#if canImport(Glibc)
import Glibc
#endif

/// A small blocking QMP client for the command line: connect, negotiate, run commands.
public final class QMPClient {
    private let fd: Int32
    private var splitter = QMPMessageSplitter()
    private var pending: [JSONValue] = []
    private var nextID: Int64 = 1

    /// Connects to a QMP Unix socket and negotiates capabilities.
    public init(socketPath: String) throws(QMPError) {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw QMPError(.genericError, "cannot create a socket: \(String(cString: strerror(errno)))") }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let pathBytes = Array(socketPath.utf8)
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        guard pathBytes.count < capacity else {
            close(fd)
            throw QMPError(.genericError, "socket path '\(socketPath)' is too long")
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (index, byte) in pathBytes.enumerated() { raw[index] = byte }
            raw[pathBytes.count] = 0
        }
        let connected = withUnsafePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        guard connected == 0 else {
            let reason = String(cString: strerror(errno))
            close(fd)
            throw QMPError(.genericError, "cannot connect to '\(socketPath)': \(reason) (is the server running with --control?)")
        }
        self.fd = fd
        let greeting = try nextMessage()
        guard greeting["QMP"] != nil else {
            throw QMPError(.genericError, "'\(socketPath)' did not greet like a QMP server")
        }
        _ = try execute("qmp_capabilities")
    }

    deinit {
        close(fd)
    }

    /// Runs a command and returns its `return` value.
    /// - Throws: the server's error, as a `QMPError`.
    public func execute(_ command: String, _ arguments: JSONValue? = nil) throws(QMPError) -> JSONValue {
        let id = nextID
        nextID += 1
        var message: [String: JSONValue] = ["execute": .string(command), "id": .int(id)]
        if let arguments { message["arguments"] = arguments }
        try send(Array((JSONValue.object(message).serialized() + "\n").utf8))
        while true {
            let reply = try nextMessage()
            guard reply["id"] == .int(id) else { continue }
            if let value = reply["return"] { return value }
            if case .object(let error)? = reply["error"] {
                var errorClass = QMPError.ErrorClass.genericError
                if case .string(let name)? = error["class"], let known = QMPError.ErrorClass(rawValue: name) {
                    errorClass = known
                }
                var desc = "unknown error"
                if case .string(let text)? = error["desc"] { desc = text }
                throw QMPError(errorClass, desc)
            }
            throw QMPError(.genericError, "malformed reply: \(reply.serialized())")
        }
    }

    /// Writes a whole message. A server that died shows up as EPIPE or ECONNRESET (the
    /// executables ignore SIGPIPE so that it does not kill them silently instead).
    private func send(_ bytes: [UInt8]) throws(QMPError) {
        guard bytes.withUnsafeBytes({ clinuxio_write_all(fd, $0.baseAddress, $0.count) }) == 0 else {
            throw Self.connectionError(errno: errno, writing: true)
        }
    }

    /// The error for a failed read (`errno` 0: end of file) or write on the connection.
    static func connectionError(errno code: Int32, writing: Bool) -> QMPError {
        if code == 0 || code == EPIPE || code == ECONNRESET {
            let detail = code == 0 ? "" : " (\(String(cString: strerror(code))))"
            return QMPError(
                .genericError, "the server closed the control connection\(detail); is it still running?")
        }
        let operation = writing ? "writing to" : "reading from"
        return QMPError(.genericError, "\(operation) the control connection failed: \(String(cString: strerror(code)))")
    }

    private func nextMessage() throws(QMPError) -> JSONValue {
        while pending.isEmpty {
            var chunk = [UInt8](repeating: 0, count: 65536)
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw Self.connectionError(errno: n == 0 ? 0 : errno, writing: false) }
            for output in splitter.feed(chunk[0..<n]) {
                guard case .message(let bytes) = output, let value = try? JSONValue.parse(bytes) else { continue }
                pending.append(value)
            }
        }
        return pending.removeFirst()
    }
}
