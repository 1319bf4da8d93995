import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A byte-level NBD client over a Unix socket, for what libnbd refuses to send.
///
/// libnbd cannot send unknown options or unknown commands and hides the greeting, so the
/// tests that check the server's answers to those (greeting flags, `NBD_REP_ERR_UNSUP`,
/// `EINVAL` for an unknown command) speak the wire format directly. Every read has a
/// timeout so a server that stays silent fails the test instead of hanging it.
final class RawNBDSocket {
    static let nbdMagic: UInt64 = 0x4e42_444d_4147_4943  // "NBDMAGIC"
    static let optionMagic: UInt64 = 0x4948_4156_454f_5054  // "IHAVEOPT"
    static let optionReplyMagic: UInt64 = 0x0003_e889_0455_65a9
    static let requestMagic: UInt32 = 0x2560_9513
    static let simpleReplyMagic: UInt32 = 0x6744_6698
    static let structuredReplyMagic: UInt32 = 0x668e_33ef

    enum Option: UInt32 {
        case exportName = 1, abort = 2, list = 3, peekExport = 4, startTLS = 5, info = 6, go = 7
        case structuredReply = 8, listMetaContext = 9, setMetaContext = 10
    }

    enum Reply: UInt32 {
        case ack = 1, server = 2, info = 3, metaContext = 4
        case errUnsup = 0x8000_0001, errPolicy = 0x8000_0002, errInvalid = 0x8000_0003
        case errPlatform = 0x8000_0004, errTLSReqd = 0x8000_0005, errUnknown = 0x8000_0006
        case errShutdown = 0x8000_0007, errBlockSizeReqd = 0x8000_0008, errTooBig = 0x8000_0009
    }

    struct OptionReply {
        let option: UInt32
        let type: UInt32
        let data: [UInt8]
    }

    struct SimpleReply {
        let error: UInt32
        let cookie: UInt64
    }

    private let fd: Int32

    /// Connects to `path` with a receive timeout of `timeout` seconds.
    init(unixSocket path: String, timeout: Int = 10) throws {
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw HarnessError("socket: errno \(errno)") }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let pathBytes = Array(path.utf8)
        guard pathBytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
            close(fd)
            throw HarnessError("socket path too long: \(path)")
        }
        withUnsafeMutableBytes(of: &address.sun_path) { buffer in
            buffer.copyBytes(from: pathBytes)
        }
        let connected = withUnsafePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        guard connected == 0 else {
            let code = errno
            close(fd)
            throw HarnessError("connect \(path): errno \(code)")
        }
        var tv = timeval(tv_sec: timeout, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    deinit {
        close(fd)
    }

    // MARK: - Bytes

    func send(_ bytes: [UInt8]) throws {
        var sent = 0
        while sent < bytes.count {
            let n = bytes.withUnsafeBytes { buffer in
                Glibc.send(fd, buffer.baseAddress! + sent, bytes.count - sent, Int32(MSG_NOSIGNAL))
            }
            guard n > 0 else { throw HarnessError("send: errno \(errno)") }
            sent += n
        }
    }

    /// Sends what the socket takes now without waiting: the bytes sent (0 when it is
    /// full), or nil once the server has closed the connection.
    func sendWithoutWaiting(_ bytes: UnsafeRawBufferPointer) -> Int? {
        guard let base = bytes.baseAddress, bytes.count > 0 else { return 0 }
        let n = Glibc.send(fd, base, bytes.count, Int32(MSG_NOSIGNAL | MSG_DONTWAIT))
        if n >= 0 { return n }
        return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ? 0 : nil
    }

    /// Shuts the sending side, as libnbd does after NBD_CMD_DISC: the server sees EOF and
    /// the connection can still receive.
    func shutdownWrites() throws {
        guard shutdown(fd, Int32(SHUT_WR)) == 0 else { throw HarnessError("shutdown: errno \(errno)") }
    }

    /// True once the server has closed the connection (EOF or reset), without waiting;
    /// bytes the server sent meanwhile are discarded.
    func peerHasClosed() -> Bool {
        var scratch = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = scratch.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
            if n == 0 { return true }
            if n < 0 { return errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR }
        }
    }

    /// Exactly `count` bytes; throws on EOF or timeout.
    func receive(_ count: Int) throws -> [UInt8] {
        var result = [UInt8](repeating: 0, count: count)
        var received = 0
        while received < count {
            let n = result.withUnsafeMutableBytes { buffer in
                recv(fd, buffer.baseAddress! + received, count - received, 0)
            }
            if n == 0 { throw HarnessError("connection closed by server after \(received)/\(count) bytes") }
            guard n > 0 else { throw HarnessError("recv: errno \(errno) after \(received)/\(count) bytes") }
            received += n
        }
        return result
    }

    /// True if the server closed the connection (EOF) within the receive timeout.
    func isClosedByPeer() -> Bool {
        var byte: UInt8 = 0
        let n = recv(fd, &byte, 1, 0)
        return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
    }

    // MARK: - Handshake

    /// Reads the 18-byte greeting and returns the handshake flags; checks both magics.
    func readGreeting() throws -> UInt16 {
        let bytes = try receive(18)
        guard Self.u64(bytes, 0) == Self.nbdMagic, Self.u64(bytes, 8) == Self.optionMagic else {
            throw HarnessError("bad greeting \(bytes)")
        }
        return Self.u16(bytes, 16)
    }

    /// Reads the greeting and answers with `clientFlags`.
    @discardableResult
    func handshake(clientFlags: UInt32 = 3) throws -> UInt16 {
        let flags = try readGreeting()
        try send(Self.be(clientFlags))
        return flags
    }

    func sendOption(_ option: UInt32, data: [UInt8] = []) throws {
        try send(Self.be(Self.optionMagic) + Self.be(option) + Self.be(UInt32(data.count)) + data)
    }

    func sendOption(_ option: Option, data: [UInt8] = []) throws {
        try sendOption(option.rawValue, data: data)
    }

    func readOptionReply() throws -> OptionReply {
        let header = try receive(20)
        guard Self.u64(header, 0) == Self.optionReplyMagic else {
            throw HarnessError("bad option reply magic \(header)")
        }
        let length = Int(Self.u32(header, 16))
        guard length <= 1 << 20 else { throw HarnessError("option reply too long: \(length)") }
        return OptionReply(option: Self.u32(header, 8), type: Self.u32(header, 12), data: try receive(length))
    }

    /// Replies up to and including the first ACK or error.
    func readOptionReplies() throws -> [OptionReply] {
        var replies: [OptionReply] = []
        while true {
            let reply = try readOptionReply()
            replies.append(reply)
            if reply.type == Reply.ack.rawValue || reply.type & 0x8000_0000 != 0 {
                return replies
            }
        }
    }

    /// Payload of INFO/GO: name, then the info requests.
    static func goPayload(export: String, infoRequests: [UInt16] = []) -> [UInt8] {
        let name = Array(export.utf8)
        return be(UInt32(name.count)) + name + be(UInt16(infoRequests.count)) + infoRequests.flatMap { be($0) }
    }

    /// Payload of LIST/SET_META_CONTEXT.
    static func metaContextPayload(export: String, queries: [String]) -> [UInt8] {
        let name = Array(export.utf8)
        var payload = be(UInt32(name.count)) + name + be(UInt32(queries.count))
        for query in queries {
            let bytes = Array(query.utf8)
            payload += be(UInt32(bytes.count)) + bytes
        }
        return payload
    }

    /// Sends GO for `export` and returns its replies; throws unless the last is ACK.
    @discardableResult
    func go(export: String, infoRequests: [UInt16] = []) throws -> [OptionReply] {
        try sendOption(.go, data: Self.goPayload(export: export, infoRequests: infoRequests))
        let replies = try readOptionReplies()
        guard replies.last?.type == Reply.ack.rawValue else {
            throw HarnessError("GO \(export) failed: reply type \(String(replies.last?.type ?? 0, radix: 16))")
        }
        return replies
    }

    // MARK: - Transmission

    func sendRequest(
        type: UInt16, flags: UInt16 = 0, cookie: UInt64, offset: UInt64 = 0, length: UInt32 = 0,
        payload: [UInt8] = []
    ) throws {
        try send(Self.request(type: type, flags: flags, cookie: cookie, offset: offset, length: length) + payload)
    }

    /// A compact request header, for tests that pipeline many before sending.
    static func request(type: UInt16, flags: UInt16 = 0, cookie: UInt64, offset: UInt64 = 0, length: UInt32 = 0) -> [UInt8] {
        be(requestMagic) + be(flags) + be(type) + be(cookie) + be(offset) + be(length)
    }

    /// Reads a simple reply header (no data).
    func readSimpleReply() throws -> SimpleReply {
        let header = try receive(16)
        guard Self.u32(header, 0) == Self.simpleReplyMagic else {
            throw HarnessError("expected a simple reply, got magic \(String(Self.u32(header, 0), radix: 16))")
        }
        return SimpleReply(error: Self.u32(header, 4), cookie: Self.u64(header, 8))
    }

    /// One transmission reply, simple or structured, reduced to what tests check.
    struct TransmissionReply {
        /// The error of a simple reply or of the first error chunk; 0 on success.
        let error: UInt32
        let cookie: UInt64
        let structured: Bool
        /// Chunk types received (structured replies only).
        let chunkTypes: [UInt16]
    }

    /// Reads a whole reply: one simple reply, or structured chunks up to the DONE flag.
    /// `readLength` is the data length a successful simple READ reply carries.
    func readReply(readLength: Int = 0) throws -> TransmissionReply {
        let magic = Self.u32(try receive(4), 0)
        switch magic {
        case Self.simpleReplyMagic:
            let rest = try receive(12)
            let error = Self.u32(rest, 0)
            if error == 0 && readLength > 0 { _ = try receive(readLength) }
            return TransmissionReply(error: error, cookie: Self.u64(rest, 4), structured: false, chunkTypes: [])
        case Self.structuredReplyMagic:
            var header = try receive(16)
            var error: UInt32 = 0
            var types: [UInt16] = []
            while true {
                let flags = Self.u16(header, 0)
                let type = Self.u16(header, 2)
                let length = Int(Self.u32(header, 12))
                guard length <= 64 << 20 else { throw HarnessError("chunk too long: \(length)") }
                let payload = try receive(length)
                types.append(type)
                if type & 0x8000 != 0, error == 0, payload.count >= 4 {
                    error = Self.u32(payload, 0)
                }
                if flags & 1 != 0 {
                    return TransmissionReply(error: error, cookie: Self.u64(header, 4), structured: true, chunkTypes: types)
                }
                let next = try receive(20)
                guard Self.u32(next, 0) == Self.structuredReplyMagic else {
                    throw HarnessError("expected another structured chunk, got magic \(String(Self.u32(next, 0), radix: 16))")
                }
                header = Array(next[4...])
            }
        default:
            throw HarnessError("bad reply magic \(String(magic, radix: 16))")
        }
    }

    // MARK: - Big-endian helpers

    static func be<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
        withUnsafeBytes(of: value.bigEndian) { Array($0) }
    }

    static func u16(_ bytes: [UInt8], _ offset: Int) -> UInt16 {
        bytes[offset..<offset + 2].reduce(0) { $0 << 8 | UInt16($1) }
    }

    static func u32(_ bytes: [UInt8], _ offset: Int) -> UInt32 {
        bytes[offset..<offset + 4].reduce(0) { $0 << 8 | UInt32($1) }
    }

    static func u64(_ bytes: [UInt8], _ offset: Int) -> UInt64 {
        bytes[offset..<offset + 8].reduce(0) { $0 << 8 | UInt64($1) }
    }
}

extension RawNBDSocket {
    /// Connects again and again (up to `attempts`, 0.1 s apart) until the server greets:
    /// a connection slot that was just freed is taken within that time.
    static func awaitGreeting(unixSocket path: String, attempts: Int = 50) throws -> Bool {
        for _ in 0..<attempts {
            let socket = try RawNBDSocket(unixSocket: path, timeout: 5)
            if (try? socket.readGreeting()) != nil { return true }
            Thread.sleep(forTimeInterval: 0.1)
        }
        return false
    }
}
