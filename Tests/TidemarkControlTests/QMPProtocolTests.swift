import Foundation
import Testing
import QMPWire
import TidemarkControl

#if canImport(Glibc)
import Glibc
#endif

/// Unit tests of the control plane's wire pieces: framing of non-object input, JSON
/// strictness and types, argument checking, error shapes, and the CLI's QMP client
/// against a scripted peer.
@Suite("QMP framing of non-object input")
struct QMPFramingTests {
    private func messages(_ outputs: [QMPMessageSplitter.Output]) -> [String] {
        outputs.compactMap { output in
            if case .message(let bytes) = output { return String(decoding: bytes, as: UTF8.self) }
            return nil
        }
    }

    @Test("a top-level string holding braces is garbage, and the object after it is intact")
    func stringWithBraces() {
        var splitter = QMPMessageSplitter()
        let outputs = splitter.feed(Array("\"{oops\"\n{\"execute\":\"a\"}".utf8))
        #expect(outputs == [.garbage, .message(Array(#"{"execute":"a"}"#.utf8))])
    }

    @Test("an array of objects is not a message")
    func arrayOfObjects() {
        var splitter = QMPMessageSplitter()
        let outputs = splitter.feed(Array(#"[{"execute":"quit"}]{"execute":"b"}"#.utf8))
        #expect(!messages(outputs).contains(#"{"execute":"quit"}"#), "\(outputs)")
        #expect(messages(outputs) == [#"{"execute":"b"}"#])
    }

    @Test("numbers, literals and whitespace between objects")
    func scalarsBetweenObjects() {
        var splitter = QMPMessageSplitter()
        let outputs = splitter.feed(Array(" \t\r\n42 {\"a\":1}\nnull\n{\"b\":2}".utf8))
        #expect(messages(outputs) == [#"{"a":1}"#, #"{"b":2}"#])
        #expect(outputs.filter { $0 == .garbage }.count == 2)
    }

    @Test("the size limit: exactly the limit passes, one byte more is oversized, across feeds")
    func limit() {
        var splitter = QMPMessageSplitter(maximumMessageSize: 16)
        let fits = #"{"a":"12345678"}"#
        #expect(fits.utf8.count == 16)
        #expect(splitter.feed(Array(fits.utf8)) == [.message(Array(fits.utf8))])
        let tooBig = #"{"a":"123456789"}"#
        var collected: [QMPMessageSplitter.Output] = []
        for chunk in [Array(tooBig.utf8.prefix(5)), Array(tooBig.utf8.dropFirst(5))] { collected += splitter.feed(chunk) }
        #expect(collected == [.oversized])
        // A brace inside the discarded part's strings does not end it early.
        let tricky = #"{"a":"}}}}}}}}}}}}}}}}}}}}"}{"ok":1}"#
        #expect(splitter.feed(Array(tricky.utf8)) == [.oversized, .message(Array(#"{"ok":1}"#.utf8))])
    }
}

@Suite("JSONValue")
struct JSONValueTests {
    @Test("types: booleans, integers, doubles, strings, null are told apart")
    func types() throws {
        #expect(try JSONValue.parse(Array("true".utf8)) == .bool(true))
        #expect(try JSONValue.parse(Array("1".utf8)) == .int(1))
        #expect(try JSONValue.parse(Array("-9223372036854775808".utf8)) == .int(.min))
        #expect(try JSONValue.parse(Array("1.5".utf8)) == .double(1.5))
        #expect(try JSONValue.parse(Array("null".utf8)) == .null)
        #expect(try JSONValue.parse(Array(#""\u00e9\n""#.utf8)) == .string("é\n"))
        let object = try JSONValue.parse(Array(#"{"b":[1,false],"a":{"c":null}}"#.utf8))
        #expect(object["a"] == ["c": .null])
        #expect(object["missing"] == nil)
        #expect(JSONValue.int(3)["a"] == nil)
    }

    @Test("serialization is compact, with sorted keys and unescaped slashes")
    func serialization() {
        let value: JSONValue = ["z": 1, "a": ["path": "/tmp/x"], "m": [true, .null, .double(2.5)]]
        #expect(value.serialized() == #"{"a":{"path":"/tmp/x"},"m":[true,null,2.5],"z":1}"#)
        #expect(JSONValue.string("line\nbreak").serialized() == #""line\nbreak""#, "no raw newline can split a QMP message")
    }

    @Test("type names for error messages")
    func typeNames() {
        #expect(JSONValue.null.typeName == "null")
        #expect(JSONValue.bool(true).typeName == "a boolean")
        #expect(JSONValue.int(1).typeName == "a number")
        #expect(JSONValue.double(1).typeName == "a number")
        #expect(JSONValue.string("").typeName == "a string")
        #expect(JSONValue.array([]).typeName == "an array")
        #expect(JSONValue.object([:]).typeName == "an object")
    }

    @Test("malformed JSON is refused")
    func malformed() {
        for text in [#"{"a":}"#, #"{"a" 1}"#, #"{'a':1}"#, #"{"a":tru}"#, "{", #"{"a":1}}"#] {
            #expect(throws: (any Error).self, "\(text)") { try JSONValue.parse(Array(text.utf8)) }
        }
    }

    @Test("a duplicate member name is refused in any object, naming the key (as QEMU does)")
    func duplicateKeys() throws {
        let cases = [
            (#"{"execute":"query-version","execute":"quit"}"#, "execute"),
            (#"{"execute":"x","arguments":{"node":"a","name":"b","node":"c"}}"#, "node"),
            (#"[{"a":1},{"b":1,"b":1}]"#, "b"),
            (#"{"\u0061":1,"a":2}"#, "a"),
        ]
        for (text, key) in cases {
            do {
                let value = try JSONValue.parse(Array(text.utf8))
                Issue.record("\(text) was accepted as \(value)")
            } catch {
                #expect("\(error)".contains("Duplicate key '\(key)'"), "\(text): \(error)")
            }
        }
        // The same name in sibling or nested objects is not a duplicate.
        let fine = try JSONValue.parse(Array(#"{"a":{"a":1},"b":[{"a":2},{"a":3}]}"#.utf8))
        #expect(fine["a"] == ["a": 1])
    }

    @Test("trailing commas are malformed JSON (QEMU's parser refuses them)")
    func trailingCommas() {
        for text in [#"{"a":1,}"#, #"[1,]"#] {
            #expect(throws: (any Error).self, "\(text) was accepted") { try JSONValue.parse(Array(text.utf8)) }
        }
    }
}

@Suite("QMP arguments and errors")
struct QMPArgumentEdgeTests {
    @Test("arguments: absent or null is empty; anything but an object is refused")
    func argumentsValue() throws {
        #expect(try QMPArguments(nil, allowed: []).optionalString("x") == nil)
        #expect(try QMPArguments(.null, allowed: []).bool("x", default: true))
        #expect(throws: QMPError(.genericError, "Invalid parameter type for 'arguments', expected: object, got an array")) {
            try QMPArguments([1], allowed: [])
        }
        #expect(throws: QMPError(.genericError, "Invalid parameter type for 'arguments', expected: object, got a number")) {
            try QMPArguments(5, allowed: [])
        }
    }

    @Test("the first unexpected parameter in sorted order is named")
    func unexpectedOrder() {
        #expect(throws: QMPError(.genericError, "Parameter 'b' is unexpected")) {
            try QMPArguments(["c": 1, "b": 2, "node": "disk"], allowed: ["node"])
        }
    }

    @Test("typed accessors")
    func accessors() throws {
        let arguments = try QMPArguments(
            ["s": "x", "n": 7, "neg": -1, "f": .double(1.5), "b": false, "a": [1], "o": [:], "z": .null],
            allowed: ["s", "n", "neg", "f", "b", "a", "o", "z"])
        #expect(try arguments.optionalUInt("n") == 7)
        #expect(throws: QMPError(.genericError, "Invalid parameter type for 'neg', expected: non-negative integer, got a number")) {
            try arguments.optionalUInt("neg")
        }
        #expect(throws: QMPError(.genericError, "Invalid parameter type for 'f', expected: non-negative integer, got a number")) {
            try arguments.optionalUInt("f")
        }
        #expect(try arguments.bool("b", default: true) == false)
        #expect(throws: QMPError(.genericError, "Invalid parameter type for 's', expected: boolean, got a string")) {
            try arguments.bool("s", default: false)
        }
        #expect(try arguments.array("a") == [1])
        #expect(throws: QMPError(.genericError, "Invalid parameter type for 'o', expected: array, got an object")) {
            try arguments.array("o")
        }
        #expect(throws: QMPError(.genericError, "Parameter 'missing' is missing")) { try arguments.array("missing") }
        #expect(throws: QMPError(.genericError, "Invalid parameter type for 'z', expected: string, got null")) {
            try arguments.string("z")
        }
        #expect(throws: QMPError(.genericError, "Invalid parameter type for 'n', expected: string, got a number")) {
            try arguments.optionalString("n")
        }
    }

    @Test("an error's wire form is {class, desc}")
    func errorShape() {
        #expect(QMPError(.commandNotFound, "x").json == ["class": "CommandNotFound", "desc": "x"])
        #expect(QMPError(.genericError, "y").json == ["class": "GenericError", "desc": "y"])
        #expect(QMPError(.deviceNotFound, "z").description == "DeviceNotFound: z")
    }
}

/// A scripted QMP peer on a Unix socket: sends `greeting`, then answers each line it reads
/// with the next entry of `replies` (several messages per entry allowed).
final class ScriptedQMPPeer: @unchecked Sendable {
    let path: String
    private let listener: Int32
    private let done = DispatchSemaphore(value: 0)
    private let lock = NSLock()
    private var receivedLines: [String] = []

    init(greeting: String, replies: [[String]]) throws {
        var template = Array("/tmp/tm-qmp-XXXXXX".utf8CString)
        guard template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) != nil else {
            throw PeerError("mkdtemp failed")
        }
        path = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self) + "/qmp.sock"
        listener = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: bytes) }
        let bound = withUnsafePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(listener, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        guard bound == 0, listen(listener, 1) == 0 else { throw PeerError("bind/listen failed: errno \(errno)") }
        let listeningSocket = listener
        Thread { [self] in
            defer { done.signal() }
            let fd = accept(listeningSocket, nil, nil)
            guard fd >= 0 else { return }
            defer { close(fd) }
            func write(_ text: String) {
                let bytes = Array(text.utf8)
                _ = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            }
            write(greeting + "\r\n")
            var buffer: [UInt8] = []
            for reply in replies {
                while !buffer.contains(UInt8(ascii: "\n")) {
                    var chunk = [UInt8](repeating: 0, count: 4096)
                    let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                    if n <= 0 { return }
                    buffer += chunk[0..<n]
                }
                let newline = buffer.firstIndex(of: UInt8(ascii: "\n"))!
                let line = String(decoding: buffer[..<newline], as: UTF8.self)
                buffer.removeSubrange(...newline)
                lock.lock()
                receivedLines.append(line)
                lock.unlock()
                for message in reply { write(message + "\r\n") }
            }
        }.start()
    }

    var lines: [String] {
        lock.lock()
        defer { lock.unlock() }
        return receivedLines
    }

    func wait() { _ = done.wait(timeout: .now() + 10) }

    deinit {
        close(listener)
        unlink(path)
        rmdir((path as NSString).deletingLastPathComponent)
    }

    struct PeerError: Error, CustomStringConvertible {
        let description: String
        init(_ description: String) { self.description = description }
    }
}

@Suite("QMPClient (the CLI's client)")
struct QMPClientTests {
    static let greeting = #"{"QMP": {"version": {"qemu": {"major": 0, "minor": 1, "micro": 0}, "package": "x"}, "capabilities": []}}"#

    @Test("negotiates, skips events and stale replies, matches ids, maps errors")
    func conversation() throws {
        let peer = try ScriptedQMPPeer(greeting: Self.greeting, replies: [
            [#"{"return": {}, "id": 1}"#],
            [#"{"event": "X", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}"#, #"{"return": {"stale": true}, "id": 99}"#,
             #"{"return": {"ok": 1}, "id": 2}"#],
            [#"{"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}, "id": 3}"#],
            [#"{"error": {"class": "SomethingNew", "desc": "odd"}, "id": 4}"#],
        ])
        let client = try QMPClient(socketPath: peer.path)
        #expect(try client.execute("query-version") == ["ok": 1])
        #expect(throws: QMPError(.commandNotFound, "The command nope has not been found")) { try client.execute("nope") }
        #expect(throws: QMPError(.genericError, "odd")) { try client.execute("x", ["a": 1]) }
        peer.wait()
        let sent = try peer.lines.map { try JSONValue.parse(Array($0.utf8)) }
        #expect(sent.count == 4)
        #expect(sent.first?["execute"] == "qmp_capabilities")
        #expect(sent.last == ["execute": "x", "arguments": ["a": 1], "id": 4])
    }

    @Test("a peer that does not greet like QMP, or no server at all, is a clear error")
    func badPeers() throws {
        let peer = try ScriptedQMPPeer(greeting: #"{"hello": 1}"#, replies: [])
        #expect(throws: QMPError(.genericError, "'\(peer.path)' did not greet like a QMP server")) {
            _ = try QMPClient(socketPath: peer.path)
        }
        do {
            _ = try QMPClient(socketPath: "/nonexistent/qmp.sock")
            Issue.record("connecting to a missing socket succeeded")
        } catch {
            #expect(error.desc.contains("cannot connect to '/nonexistent/qmp.sock'"), "\(error)")
            #expect(error.desc.contains("--control"), "\(error)")
        }
    }

    @Test("a server that closes the connection mid-command is an error, not a hang")
    func closedMidCommand() throws {
        let peer = try ScriptedQMPPeer(greeting: Self.greeting, replies: [[#"{"return": {}, "id": 1}"#], []])
        let client = try QMPClient(socketPath: peer.path)
        #expect(throws: QMPError(.genericError, "the server closed the control connection; is it still running?")) {
            try client.execute("quit")
        }
    }

    @Test("writing to a server that is gone is the same clear error (EPIPE, with SIGPIPE ignored as the executables do)")
    func writeAfterServerClosed() throws {
        signal(SIGPIPE, SIG_IGN)
        let peer = try ScriptedQMPPeer(greeting: Self.greeting, replies: [[#"{"return": {}, "id": 1}"#]])
        let client = try QMPClient(socketPath: peer.path)
        peer.wait()
        // The peer has closed: the first command may fail on its write (EPIPE) or on the
        // read (end of file); later ones fail on the write. Both say what happened.
        for _ in 0..<3 {
            do {
                _ = try client.execute("query-version", ["padding": .string(String(repeating: "x", count: 300_000))])
                Issue.record("a command to a closed server succeeded")
            } catch {
                #expect(error.desc.hasPrefix("the server closed the control connection"), "\(error)")
                #expect(error.desc.contains("still running"), "\(error)")
            }
        }
    }
}
