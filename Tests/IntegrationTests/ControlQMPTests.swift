import Foundation
import NBDClient
import Testing
import QMPWire

#if canImport(Glibc)
import Glibc
#endif

/// The QMP wire protocol of the control socket, over a raw Unix socket: greeting,
/// negotiation, ids, errors for every kind of bad input (the connection goes on after
/// each), oversized messages, several clients, the socket's mode, and `quit`.
@Suite("Control: QMP wire protocol")
struct ControlQMPTests {
    /// After a bad input: exactly one error reply (class GenericError, no id unless
    /// `id`), whose desc satisfies `check`; then the connection still runs a command.
    static func expectInputError(
        _ client: QMPTestClient, sending raw: String, id: QMPJSON? = nil, _ what: String, timeout: TimeInterval = 10,
        sourceLocation: SourceLocation = #_sourceLocation, check: (String) -> Bool
    ) {
        do {
            try client.sendRaw(raw)
            let reply = try client.receiveReply(timeout: timeout)
            guard let error = try QMPTestClient.error(of: reply) else {
                Issue.record("\(what): expected an error, got \(reply)", sourceLocation: sourceLocation)
                return
            }
            #expect(error.errorClass == "GenericError", "\(what): \(error)", sourceLocation: sourceLocation)
            #expect(check(error.desc), "\(what): unexpected desc '\(error.desc)'", sourceLocation: sourceLocation)
            #expect(reply["id"] == id, "\(what): id of \(reply)", sourceLocation: sourceLocation)
            // The connection goes on: the very next reply is the answer to this command.
            let next = try client.request(["execute": "query-version", "id": "after"], timeout: timeout)
            #expect(next["id"] == "after" && next["return"] != nil, "\(what): after the error got \(next)", sourceLocation: sourceLocation)
        } catch {
            Issue.record("\(what): \(error)", sourceLocation: sourceLocation)
        }
    }

    @Test("greeting: QMP.version.qemu {major, minor, micro}, package, capabilities []; query-version agrees")
    func greeting() throws {
        let fixture = try ControlFixture()
        let client = try fixture.qmp(negotiate: false)
        let greeting = client.greeting
        #expect(greeting.objectValue.map { Set($0.keys) } == ["QMP"])
        let qmp = try #require(greeting["QMP"])
        #expect(qmp.objectValue.map { Set($0.keys) } == ["version", "capabilities"])
        #expect(qmp["capabilities"] == [])
        let version = try #require(qmp["version"])
        #expect(version["qemu"]?["major"]?.intValue != nil)
        #expect(version["qemu"]?["minor"]?.intValue != nil)
        #expect(version["qemu"]?["micro"]?.intValue != nil)
        #expect(version["package"]?.stringValue != nil)
        #expect(try client.request(["execute": "qmp_capabilities"]) == ["return": [:]])
        #expect(try client.run("query-version") == version)
    }

    @Test("negotiation: commands before qmp_capabilities are CommandNotFound; qmp_capabilities twice")
    func negotiation() throws {
        let fixture = try ControlFixture()
        let client = try fixture.qmp(negotiate: false)
        for command in ["query-version", "query-block-exports", "quit", "no-such-command"] {
            let reply = try client.request(["execute": .string(command), "id": .string(command)])
            #expect(reply["id"] == .string(command))
            #expect(
                try QMPTestClient.error(of: reply)
                    == QMPReplyError(
                        errorClass: "CommandNotFound", desc: "Expecting capabilities negotiation with 'qmp_capabilities'"),
                "\(command) before negotiation: \(reply)")
        }
        #expect(fixture.server.isRunning, "quit before negotiation must not stop the server")
        #expect(try client.request(["execute": "qmp_capabilities", "id": 1]) == ["return": [:], "id": 1])
        expectQMPError(
            client, "qmp_capabilities", class: "CommandNotFound", "Capabilities negotiation is already complete, command ignored")
        #expect(try client.run("query-version")["qemu"] != nil)
        // qemu.qmp's negotiation sends arguments {"enable": [...]}-style objects; an empty one is fine.
        let other = try fixture.qmp(negotiate: false)
        #expect(try other.request(["execute": "qmp_capabilities", "arguments": [:]])["return"] == [:])
    }

    @Test("unknown command: CommandNotFound naming it; the connection goes on")
    func unknownCommand() throws {
        let fixture = try ControlFixture()
        let client = try fixture.qmp()
        expectQMPError(client, "frobnicate", class: "CommandNotFound", "The command frobnicate has not been found")
        expectQMPError(client, "drive-backup", ["device": "disk"], class: "CommandNotFound", "The command drive-backup has not been found")
        #expect(try client.run("query-version")["qemu"] != nil)
    }

    @Test("malformed JSON, non-object input, missing or mistyped execute: GenericError, connection goes on")
    func malformedInput() throws {
        let fixture = try ControlFixture()
        let client = try fixture.qmp()
        Self.expectInputError(client, sending: #"{"execute": }"# + "\n", "missing value") { $0.hasPrefix("JSON parse error") }
        Self.expectInputError(client, sending: #"{"execute": "query-version", "id": tru}"# + "\n", "bad literal") {
            $0.hasPrefix("JSON parse error")
        }
        Self.expectInputError(client, sending: "42\n", "a number") { $0.contains("expected an object") }
        Self.expectInputError(client, sending: "null\n", "null") { $0.contains("expected an object") }
        Self.expectInputError(client, sending: "\"just a string\"\n", "a string") { $0.contains("expected an object") }
        Self.expectInputError(client, sending: #"{"arguments": {}}"# + "\n", "no execute") {
            $0 == "QMP input lacks member 'execute'"
        }
        Self.expectInputError(client, sending: #"{"execute": 42, "id": 5}"# + "\n", id: 5, "execute not a string") {
            $0 == "QMP input lacks member 'execute'"
        }
        Self.expectInputError(client, sending: #"{"exec-oob": "query-version", "id": "oob"}"# + "\n", id: "oob", "exec-oob") {
            $0 == "Out-of-band execution is not supported"
        }
        // The data path is untouched.
        let connection = try fixture.connect()
        #expect(try connection.pread(count: 4096, offset: 0) == ImageFile.constant(0, count: 4096))
    }

    @Test("strict JSON: a trailing comma is a parse error, not a command")
    func trailingComma() throws {
        let fixture = try ControlFixture()
        let client = try fixture.qmp()
        Self.expectInputError(client, sending: #"{"execute": "query-version",}"# + "\n", "trailing comma in an object") {
            $0.hasPrefix("JSON parse error")
        }
        Self.expectInputError(
            client, sending: #"{"execute": "block-dirty-bitmap-merge", "arguments": {"node": "disk", "target": "t", "bitmaps": ["a",]}}"# + "\n",
            "trailing comma in an array"
        ) { $0.hasPrefix("JSON parse error") }
    }

    @Test("duplicate keys are a parse error (as in QEMU), never a command: execute twice does not quit the server")
    func duplicateKeys() throws {
        let fixture = try ControlFixture()
        let client = try fixture.qmp()
        Self.expectInputError(client, sending: #"{"execute":"query-version","execute":"quit"}"# + "\n", "execute twice") {
            $0.hasPrefix("JSON parse error") && $0.contains("Duplicate key 'execute'")
        }
        Self.expectInputError(
            client, sending: #"{"execute":"block-dirty-bitmap-add","arguments":{"node":"disk","name":"a","name":"b"}}"# + "\n",
            "a duplicate argument"
        ) { $0.contains("Duplicate key 'name'") }
        #expect(try ControlFixture.bitmaps(client).isEmpty, "the command with a duplicate argument must not have run")
        // The server still runs and serves: a new client and the data path both work.
        #expect(fixture.server.isRunning)
        let second = try fixture.qmp()
        #expect(try second.run("query-version")["package"] == "tidemark")
        let connection = try fixture.connect()
        #expect(try connection.pread(count: 512, offset: 0).count == 512)
        try connection.shutdown()
    }

    @Test("a top-level string holding a brace is one error; the next command is answered")
    func stringWithBrace() throws {
        let fixture = try ControlFixture()
        let client = try fixture.qmp()
        Self.expectInputError(client, sending: "\"{oops\"\n", "a string with a brace", timeout: 3) {
            $0.contains("expected an object")
        }
    }

    @Test("an array of commands is one error, never a command (QEMU: \"QMP input must be a JSON object\")")
    func arrayOfCommands() throws {
        let fixture = try ControlFixture()
        let client = try fixture.qmp()
        try client.sendRaw(#"[{"execute": "query-version", "id": "inner"}]"# + "\n")
        try client.send(["execute": "query-version", "id": "after-array"])
        var replies: [QMPJSON] = []
        while true {
            let reply = try client.receiveReply()
            replies.append(reply)
            if reply["id"] == "after-array" { break }
        }
        #expect(!replies.contains { $0["id"] == "inner" }, "a command inside an array was executed: \(replies)")
        #expect(replies.count == 2, "expected one error for the array, then the reply: \(replies)")
        #expect(try replies.first.flatMap(QMPTestClient.error(of:))?.errorClass == "GenericError")
    }

    @Test("arguments: not an object, missing, mistyped, unexpected: GenericError naming the parameter")
    func argumentErrors() throws {
        let fixture = try ControlFixture()
        let client = try fixture.qmp()
        let add = "block-dirty-bitmap-add"
        expectQMPError(client, "query-version", [1], "Invalid parameter type for 'arguments', expected: object, got an array")
        expectQMPError(client, add, "b0", "Invalid parameter type for 'arguments', expected: object, got a string")
        expectQMPError(client, "query-version", ["verbose": true], "Parameter 'verbose' is unexpected")
        expectQMPError(client, "query-block-exports", ["x": 1], "Parameter 'x' is unexpected")
        expectQMPError(client, add, ["node": "disk"], "Parameter 'name' is missing")
        expectQMPError(client, add, ["name": "b0"], "Parameter 'node' is missing")
        expectQMPError(client, add, ["node": "disk", "name": "b0", "bogus": 1], "Parameter 'bogus' is unexpected")
        expectQMPError(client, add, ["node": 1, "name": "b0"], "Invalid parameter type for 'node', expected: string, got a number")
        expectQMPError(client, add, ["node": "disk", "name": 7], "Invalid parameter type for 'name', expected: string, got a number")
        expectQMPError(
            client, add, ["node": "disk", "name": "b0", "granularity": "64K"],
            "Invalid parameter type for 'granularity', expected: non-negative integer, got a string")
        expectQMPError(
            client, add, ["node": "disk", "name": "b0", "granularity": -65536],
            "Invalid parameter type for 'granularity', expected: non-negative integer, got a number")
        expectQMPError(
            client, add, ["node": "disk", "name": "b0", "persistent": "yes"],
            "Invalid parameter type for 'persistent', expected: boolean, got a string")
        expectQMPError(
            client, add, ["node": "disk", "name": "b0", "disabled": 0],
            "Invalid parameter type for 'disabled', expected: boolean, got a number")
        expectQMPError(
            client, "block-dirty-bitmap-merge", ["node": "disk", "target": "b0", "bitmaps": "b1"],
            "Invalid parameter type for 'bitmaps', expected: array, got a string")
        expectQMPError(
            client, "block-dirty-bitmap-merge", ["node": "disk", "target": "b0", "bitmaps": [1]],
            "Invalid parameter type for 'bitmaps', expected: string or {node, name}")
        expectQMPError(client, "block-dirty-bitmap-merge", ["node": "disk", "target": "b0"], "Parameter 'bitmaps' is missing")
        expectQMPError(client, "transaction", [:], "Parameter 'actions' is missing")
        expectQMPError(client, "transaction", ["actions": [:]], "Invalid parameter type for 'actions', expected: array, got an object")
        expectQMPError(client, "transaction", ["actions": [["data": [:]]]], "Parameter 'actions[].type' is missing")
        expectQMPError(client, "checkpoint-create", ["node": "disk"], "Parameter 'bitmap' is missing")
        expectQMPError(
            client, "checkpoint-create", ["node": "disk", "bitmap": "b0", "consume": "no"],
            "Invalid parameter type for 'consume', expected: boolean, got a string")
        expectQMPError(client, "checkpoint-complete", ["node": "disk"], "Parameter 'name' is missing")
        expectQMPError(client, "block-export-del", [:], "Parameter 'id' is missing")
        // None of it changed anything, and the connection still works.
        #expect(try ControlFixture.bitmaps(client).isEmpty)
        #expect(try client.run("query-version")["qemu"] != nil)
    }

    @Test("an oversized message (> 1 MiB) is refused; the connection and the data path go on")
    func oversizedMessage() throws {
        let fixture = try ControlFixture()
        let client = try fixture.qmp()
        let padding = String(repeating: "x", count: (1 << 20) + 65536)
        let big = #"{"execute": "block-dirty-bitmap-add", "id": "big", "arguments": {"node": "disk", "name": "big", "pad": ""#
            + padding + "\"}}\n"
        try client.sendRaw(big)
        let reply = try client.receiveReply(timeout: 30)
        let error = try #require(try QMPTestClient.error(of: reply), "expected an error: \(reply)")
        #expect(error.errorClass == "GenericError")
        #expect(error.desc.contains("too large"), "\(error)")
        #expect(try client.run("query-version")["qemu"] != nil)
        #expect(try ControlFixture.bitmaps(client)["big"] == nil, "the oversized command must not run")
        // A message just under the limit is accepted.
        let fits = String(repeating: "y", count: (1 << 20) - 200)
        let nearLimit = try client.request(["execute": "query-version", "id": .string(fits)], timeout: 30)
        #expect(nearLimit["return"] != nil && nearLimit["id"] == .string(fits))
        let connection = try fixture.connect()
        try connection.pwrite(ImageFile.constant(7, count: 512), offset: 0)
        #expect(try connection.pread(count: 512, offset: 0) == ImageFile.constant(7, count: 512))
    }

    @Test("id is echoed as sent: string, number, object; on returns and on errors, before negotiation too")
    func idEcho() throws {
        let fixture = try ControlFixture()
        let client = try fixture.qmp(negotiate: false)
        let early = try client.request(["execute": "query-version", "id": "pre"])
        #expect(early["id"] == "pre" && early["error"] != nil)
        #expect(try client.request(["execute": "qmp_capabilities", "id": ["seq": [1, "a"]]]) == ["return": [:], "id": ["seq": [1, "a"]]])
        for id: QMPJSON in ["abc", 42, 0, -7, ["k": "v"], "", .double(1.5)] {
            let ok = try client.request(["execute": "query-version", "id": id])
            #expect(ok["id"] == id && ok["return"] != nil, "\(ok)")
            let failed = try client.request(["execute": "block-dirty-bitmap-remove", "arguments": ["node": "disk", "name": "nope"], "id": id])
            #expect(failed["id"] == id && failed["error"] != nil, "\(failed)")
            let unknown = try client.request(["execute": "nope", "id": id])
            #expect(unknown["id"] == id && unknown["error"]?["class"] == "CommandNotFound", "\(unknown)")
        }
        // Without an id, the reply has none.
        let plain = try client.request(["execute": "query-version"])
        #expect(plain["id"] == nil && plain["return"] != nil)
    }

    @Test("several commands in one write, and one command across several writes")
    func framing() throws {
        let fixture = try ControlFixture()
        let client = try fixture.qmp()
        try client.sendRaw(#"{"execute":"query-version","id":1}{"execute":"query-block-exports","id":2}"# + "\r\n" + #" {"execute":"nope","id":3}"#)
        let replies = try (0..<3).map { _ in try client.receiveReply() }
        #expect(replies.map { $0["id"] } == [1, 2, 3])
        #expect(replies[1]["return"]?[0]?["id"] == "disk")
        let text = #"{"execute": "block-dirty-bitmap-add", "arguments": {"node": "disk", "name": "split"}, "id": "s"}"#
        for byte in text.utf8 { try client.sendRaw([byte]) }
        #expect(try client.receiveReply() == ["return": [:], "id": "s"])
        #expect(try ControlFixture.bitmaps(client)["split"] != nil)
    }

    @Test("several clients at once: commands interleave, each gets its own replies, events go to all")
    func severalClients() throws {
        let fixture = try ControlFixture()
        let clients = try (0..<4).map { _ in try fixture.qmp() }
        for (index, client) in clients.enumerated() {
            try client.run("block-dirty-bitmap-add", ["node": "disk", "name": .string("mine\(index)")])
        }
        for client in clients {
            #expect(Set(try ControlFixture.bitmaps(client).keys) == ["mine0", "mine1", "mine2", "mine3"])
        }
        // Concurrent traffic on every client.
        let failures = Failures()
        let group = DispatchGroup()
        for (index, client) in clients.enumerated() {
            group.enter()
            Thread {
                defer { group.leave() }
                do {
                    for round in 0..<25 {
                        let name = QMPJSON.string("c\(index)-\(round)")
                        try client.run("block-dirty-bitmap-add", ["node": "disk", "name": name, "disabled": true])
                        try client.run("block-dirty-bitmap-remove", ["node": "disk", "name": name])
                    }
                } catch {
                    failures.add("client \(index): \(error)")
                }
            }.start()
        }
        #expect(group.wait(timeout: .now() + 60) == .success)
        #expect(failures.all.isEmpty, "\(failures.all)")
        // An event reaches every client, including the one that caused it.
        for client in clients { client.events.removeAll() }
        let created = try clients[0].run("checkpoint-create", ["node": "disk", "bitmap": "mine1"])
        #expect(created["name"] == "c1")
        for (index, client) in clients.enumerated() {
            let event = try client.waitForEvent("CHECKPOINT_CREATED")
            #expect(event["data"] == ["node": "disk", "name": "c1", "bitmap": "mine1", "consume": false], "client \(index)")
            #expect(event["timestamp"]?["seconds"]?.intValue != nil && event["timestamp"]?["microseconds"]?.intValue != nil)
        }
        // A client that leaves does not disturb the others.
        clients[3].close()
        #expect(try clients[2].run("query-checkpoints").arrayValue?.count == 1)
    }

    @Test("no events before capabilities negotiation (QMP spec; qemu.qmp's negotiation relies on it)")
    func noEventsBeforeNegotiation() throws {
        let fixture = try ControlFixture()
        let active = try fixture.qmp()
        try active.run("block-dirty-bitmap-add", ["node": "disk", "name": "b0"])
        let waiting = try fixture.qmp(negotiate: false)
        try active.run("checkpoint-create", ["node": "disk", "bitmap": "b0"])
        _ = try active.waitForEvent("CHECKPOINT_CREATED")
        // The event was broadcast while `waiting` had not negotiated: it must not get it,
        // before or after negotiating.
        let early = try waiting.drain(timeout: 0.5)
        #expect(early.isEmpty, "a client in negotiation mode received \(early)")
        try waiting.send(["execute": "qmp_capabilities", "id": "neg"])
        let first = try waiting.receive()
        #expect(first == ["return": [:], "id": "neg"], "first message after qmp_capabilities: \(first)")
        // Once negotiated, it does get events.
        try active.run("checkpoint-complete", ["node": "disk", "name": "c1"])
        let completed = try waiting.waitForEvent("CHECKPOINT_COMPLETED")
        #expect(completed["data"] == ["node": "disk", "name": "c1"])
    }

    @Test("the control socket is a socket with mode 0600")
    func socketMode() throws {
        let fixture = try ControlFixture()
        var info = stat()
        #expect(stat(fixture.controlPath, &info) == 0)
        #expect(info.st_mode & S_IFMT == S_IFSOCK)
        #expect(info.st_mode & 0o7777 == 0o600, "mode \(String(info.st_mode & 0o7777, radix: 8))")
        #expect(info.st_uid == getuid())
    }

    @Test("quit: the reply comes, then the server exits 0 and removes its control socket")
    func quit() throws {
        let fixture = try ControlFixture()
        let observer = try fixture.qmp()
        let client = try fixture.qmp()
        expectQMPError(client, "quit", ["now": true], "Parameter 'now' is unexpected")
        #expect(fixture.server.isRunning)
        #expect(try client.execute("quit") == ["return": [:], "id": 2])
        try fixture.server.waitForExit(timeout: 30)
        #expect(fixture.server.termination == .success, "\(fixture.server.termination)\n\(fixture.server.serverLog)")
        #expect(!FileManager.default.fileExists(atPath: fixture.controlPath), "control socket left behind")
        #expect(throws: QMPConnectionClosed.self) { _ = try observer.drain(timeout: 5) }
    }
}
