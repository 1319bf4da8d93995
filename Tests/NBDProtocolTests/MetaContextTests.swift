import NBDProtocol
import NIOCore
import Testing

/// A LIST query case: export, queries, the context names expected back.
struct ListCase: Sendable, CustomTestStringConvertible {
    var export: String
    var queries: [String]
    var expected: [String]
    var testDescription: String { "\(export) \(queries) → \(expected)" }
}

@Suite("Handshake: LIST_META_CONTEXT and SET_META_CONTEXT")
struct MetaContextTests {
    static let listCases: [ListCase] = [
        ListCase(export: "disk", queries: [], expected: ["base:allocation", "qemu:dirty-bitmap:b0"]),
        ListCase(
            export: "bitmaps", queries: [],
            expected: ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"]),
        ListCase(export: "ro", queries: [], expected: ["base:allocation"]),
        ListCase(export: "", queries: [], expected: ["base:allocation", "qemu:dirty-bitmap:b0"]),
        ListCase(
            export: "bitmaps", queries: ["qemu:"],
            expected: ["qemu:allocation-depth", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"]),
        ListCase(
            export: "bitmaps", queries: ["qemu:dirty-bitmap:"], expected: ["qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"]),
        ListCase(export: "bitmaps", queries: ["base:"], expected: ["base:allocation"]),
        ListCase(export: "disk", queries: ["qemu:"], expected: ["qemu:dirty-bitmap:b0"]),
        ListCase(export: "ro", queries: ["qemu:"], expected: []),
        ListCase(export: "bitmaps", queries: ["qemu:dirty-bitmap:b1"], expected: ["qemu:dirty-bitmap:b1"]),
        ListCase(export: "bitmaps", queries: ["base:allocation"], expected: ["base:allocation"]),
        ListCase(export: "bitmaps", queries: ["x-vendor:thing", "nbd-server:x", "nope"], expected: []),
        ListCase(export: "bitmaps", queries: ["qemu:dirty-bitmap:b9", "base:holes", ""], expected: []),
        // Duplicates and overlaps come back once each, and in a fixed order.
        ListCase(
            export: "bitmaps", queries: ["qemu:dirty-bitmap:b1", "base:", "qemu:dirty-bitmap:", "base:allocation"],
            expected: ["base:allocation", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"]),
        ListCase(export: "bitmaps", queries: ["x-vendor:thing", "base:allocation"], expected: ["base:allocation"]),
    ]

    @Test("LIST_META_CONTEXT returns the matching contexts with id 0, then ACK", arguments: listCases)
    func list(testCase: ListCase) throws {
        for structured in [false, true] {
            var driver = HandshakeDriver.negotiating()
            if structured { _ = try driver.send(Client.structuredReply) }
            let replies = try driver.send(Client.listMeta(testCase.export, testCase.queries))
            #expect(replies.allSatisfy { $0.option == Wire.optListMeta })
            #expect(replies.last == OptionReply(option: Wire.optListMeta, type: Wire.repAck, data: []))
            let contexts = replies.dropLast().compactMap(\.metaContext)
            #expect(contexts.count == replies.count - 1)
            #expect(contexts.map(\.name).sorted() == testCase.expected.sorted())
            #expect(contexts.allSatisfy { $0.id == 0 })
            #expect(replies.dropLast().allSatisfy { $0.data.count > 4 })
        }
    }

    @Test("LIST_META_CONTEXT for an unknown export gets ERR_UNKNOWN")
    func listUnknownExport() throws {
        var driver = HandshakeDriver.negotiating()
        let replies = try driver.send(Client.listMeta("missing", []))
        #expect(replies.map(\.type) == [Wire.errUnknown])
        #expect(replies.first?.option == Wire.optListMeta)
    }

    @Test("SET_META_CONTEXT before structured replies gets ERR_INVALID")
    func setBeforeStructuredReplies() throws {
        var driver = HandshakeDriver.negotiating()
        let replies = try driver.send(Client.setMeta("disk", ["base:allocation"]))
        #expect(replies.map(\.type) == [Wire.errInvalid])
        #expect(replies.first?.option == Wire.optSetMeta)
        _ = try driver.send(Client.go("disk"))
        #expect(driver.session?.metaContexts == [])
    }

    @Test("SET selects several contexts with distinct non-zero ids that the session keeps")
    func setSeveral() throws {
        var driver = HandshakeDriver.negotiating()
        _ = try driver.send(Client.structuredReply)
        let queries = ["qemu:dirty-bitmap:b1", "base:allocation", "qemu:dirty-bitmap:b0", "x-other:thing"]
        let replies = try driver.send(Client.setMeta("bitmaps", queries))
        #expect(replies.allSatisfy { $0.option == Wire.optSetMeta })
        #expect(replies.last?.type == Wire.repAck)
        let contexts = replies.dropLast().compactMap(\.metaContext)
        #expect(contexts.count == 3)
        #expect(Set(contexts.map(\.name)) == ["base:allocation", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"])
        #expect(Set(contexts.map(\.id)).count == 3)
        #expect(contexts.allSatisfy { $0.id != 0 })

        _ = try driver.send(Client.go("bitmaps"))
        let session = try #require(driver.session)
        let fromReplies = Dictionary(uniqueKeysWithValues: contexts.map { ($0.name, $0.id) })
        let fromSession = Dictionary(uniqueKeysWithValues: session.metaContexts.map { ($0.name, $0.id) })
        #expect(fromReplies == fromSession)
        #expect(session.metaContexts.count == 3)
    }

    @Test("SET with a duplicated query selects the context once")
    func setDuplicate() throws {
        var driver = HandshakeDriver.negotiating()
        _ = try driver.send(Client.structuredReply)
        let replies = try driver.send(Client.setMeta("disk", ["base:allocation", "base:allocation"]))
        #expect(replies.compactMap(\.metaContext).map(\.name) == ["base:allocation"])
        _ = try driver.send(Client.go("disk"))
        #expect(driver.session?.metaContexts.map(\.name) == ["base:allocation"])
    }

    @Test(
        "SET with wildcard or no queries selects nothing",
        arguments: [["base:"], ["qemu:"], ["qemu:dirty-bitmap:"], [], ["qemu:", "base:", "qemu:dirty-bitmap:"]])
    func setWildcards(queries: [String]) throws {
        var driver = HandshakeDriver.negotiating()
        _ = try driver.send(Client.structuredReply)
        let replies = try driver.send(Client.setMeta("bitmaps", queries))
        #expect(replies == [OptionReply(option: Wire.optSetMeta, type: Wire.repAck, data: [])])
        _ = try driver.send(Client.go("bitmaps"))
        #expect(driver.session?.metaContexts == [])
    }

    @Test("contexts SET for one export are dropped when GO picks another")
    func setThenGoOtherExport() throws {
        var driver = HandshakeDriver.negotiating()
        _ = try driver.send(Client.structuredReply)
        let replies = try driver.send(Client.setMeta("ro", ["base:allocation"]))
        #expect(replies.compactMap(\.metaContext).count == 1)
        _ = try driver.send(Client.go("disk"))
        #expect(driver.session?.exportName == "disk")
        #expect(driver.session?.metaContexts == [])
    }

    @Test("contexts SET for the default export (empty name) survive GO by its canonical name, and vice versa")
    func setDefaultExportName() throws {
        var driver = HandshakeDriver.negotiating()
        _ = try driver.send(Client.structuredReply)
        _ = try driver.send(Client.setMeta("", ["base:allocation"]))
        _ = try driver.send(Client.go("disk"))
        #expect(driver.session?.metaContexts.map(\.name) == ["base:allocation"])

        var other = HandshakeDriver.negotiating()
        _ = try other.send(Client.structuredReply)
        _ = try other.send(Client.setMeta("disk", ["qemu:dirty-bitmap:b0"]))
        _ = try other.send(Client.go(""))
        #expect(other.session?.metaContexts.map(\.name) == ["qemu:dirty-bitmap:b0"])
    }

    @Test("contexts survive EXPORT_NAME on the same export")
    func setThenExportName() throws {
        var driver = HandshakeDriver.negotiating()
        _ = try driver.send(Client.structuredReply)
        _ = try driver.send(Client.setMeta("disk", ["base:allocation"]))
        _ = driver.feed(Client.option(Wire.optExportName, Array("disk".utf8)))
        #expect(driver.session?.metaContexts.map(\.name) == ["base:allocation"])
        #expect(driver.session?.structuredReplies == true)
    }

    @Test("a later successful SET replaces the earlier selection")
    func setReplaces() throws {
        var driver = HandshakeDriver.negotiating()
        _ = try driver.send(Client.structuredReply)
        _ = try driver.send(Client.setMeta("disk", ["base:allocation", "qemu:dirty-bitmap:b0"]))
        let second = try driver.send(Client.setMeta("disk", ["qemu:dirty-bitmap:b0"]))
        let context = try #require(second.compactMap(\.metaContext).first)
        _ = try driver.send(Client.go("disk"))
        #expect(driver.session?.metaContexts == [NBDSelectedContext(id: context.id, name: "qemu:dirty-bitmap:b0")])
    }

    /// SET requests that fail, and the error each gets.
    static let failingSets: [([UInt8], UInt32)] = [
        (Client.setMeta("missing", ["base:allocation"]), Wire.errUnknown),
        (Client.option(Wire.optSetMeta, [0, 0, 0, 9]), Wire.errInvalid),
        (Client.option(Wire.optSetMeta, []), Wire.errInvalid),
        (Client.setMeta("disk", [String](repeating: "base:allocation", count: 257)), Wire.errTooBig),
    ]

    @Test("a failed SET clears the earlier selection", arguments: failingSets)
    func failedSetClears(request: [UInt8], error: UInt32) throws {
        var driver = HandshakeDriver.negotiating()
        _ = try driver.send(Client.structuredReply)
        #expect(try driver.send(Client.setMeta("disk", ["base:allocation"])).count == 2)
        let replies = try driver.send(request)
        #expect(replies.map(\.type) == [error])
        #expect(replies.first?.option == Wire.optSetMeta)
        _ = try driver.send(Client.go("disk"))
        #expect(driver.session?.metaContexts == [])
    }

    @Test("up to 256 queries are answered; 257 get ERR_TOO_BIG", arguments: [Wire.optListMeta, Wire.optSetMeta])
    func tooManyQueries(option: UInt32) throws {
        var driver = HandshakeDriver.negotiating()
        _ = try driver.send(Client.structuredReply)
        let many = [String](repeating: "base:allocation", count: 255) + ["qemu:dirty-bitmap:b0"]
        let ok = try driver.send(Client.option(option, Client.metaPayload(name: "disk", queries: many)))
        #expect(ok.last?.type == Wire.repAck)
        #expect(ok.compactMap(\.metaContext).count == 2)
        let tooMany = try driver.send(
            Client.option(option, Client.metaPayload(name: "disk", queries: many + ["base:allocation"])))
        #expect(tooMany.map(\.type) == [Wire.errTooBig])
    }

    static let malformedPayloads: [[UInt8]] = {
        var cases: [[UInt8]] = [[], [0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]]
        // Name length past the end.
        var b = Bytes()
        b.u32(100)
        b.string("disk")
        b.u32(0)
        cases.append(b.bytes)
        // Query count larger than the data can hold.
        b = Bytes()
        b.u32(4)
        b.string("disk")
        b.u32(0xFFFF_FFFF)
        cases.append(b.bytes)
        // Query length past the end.
        b = Bytes()
        b.u32(4)
        b.string("disk")
        b.u32(1)
        b.u32(16)
        b.string("base:allocation")
        cases.append(b.bytes)
        // Second query missing.
        b = Bytes()
        b.u32(4)
        b.string("disk")
        b.u32(2)
        b.u32(15)
        b.string("base:allocation")
        cases.append(b.bytes)
        // Trailing garbage.
        cases.append(Client.metaPayload(name: "disk", queries: ["base:allocation"]) + [1])
        // Export name with a NUL.
        b = Bytes()
        b.u32(2)
        b.raw([0x64, 0])
        b.u32(0)
        cases.append(b.bytes)
        return cases
    }()

    @Test("malformed LIST/SET payloads get ERR_INVALID and negotiation continues", arguments: malformedPayloads)
    func malformed(payload: [UInt8]) throws {
        for option in [Wire.optListMeta, Wire.optSetMeta] {
            var driver = HandshakeDriver.negotiating()
            _ = try driver.send(Client.structuredReply)
            let replies = try driver.send(Client.option(option, payload))
            #expect(replies.map(\.type) == [Wire.errInvalid])
            #expect(replies.first?.option == option)
            #expect(driver.input.readableBytes == 0)
            #expect(try driver.send(Client.listMeta("disk", [])).last?.type == Wire.repAck)
        }
    }

    @Test("a query longer than 4096 bytes matches nothing but is not an error")
    func overlongQuery() throws {
        var driver = HandshakeDriver.negotiating()
        _ = try driver.send(Client.structuredReply)
        let long = "base:" + String(repeating: "a", count: 5000)
        let replies = try driver.send(Client.setMeta("disk", [long, "base:allocation"]))
        #expect(replies.compactMap(\.metaContext).map(\.name) == ["base:allocation"])
        #expect(replies.last?.type == Wire.repAck)
    }
}
