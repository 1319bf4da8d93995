import Foundation
import NBDClient
import Testing

/// `nbdinfo` (libnbd 1.14) against the server: what a user sees of exports, flags and maps.
@Suite("nbdinfo", .serialized)
struct NbdinfoTests {
    /// `nbdinfo --json ARGS` parsed; the first element of "exports".
    static func json(_ arguments: [String]) throws -> (top: [String: Any], exports: [[String: Any]]) {
        let result = try ExternalTool.check("nbdinfo", ["--json"] + arguments, timeout: 60)
        guard let top = try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any] else {
            throw HarnessError("nbdinfo --json printed no object:\n\(result.stdout)")
        }
        return (top, top["exports"] as? [[String: Any]] ?? [])
    }

    /// `nbdinfo --map` lines as (offset, length, type, description).
    static func map(_ uri: String) throws -> [(offset: UInt64, length: UInt64, type: UInt32, description: String)] {
        let result = try ExternalTool.check("nbdinfo", ["--map", uri], timeout: 60)
        return try result.stdout.split(separator: "\n").map { line in
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            guard fields.count >= 4, let offset = UInt64(fields[0]), let length = UInt64(fields[1]), let type = UInt32(fields[2]) else {
                throw HarnessError("unexpected nbdinfo --map line '\(line)'")
            }
            return (offset, length, type, fields[3...].joined(separator: " "))
        }
    }

    @Test("nbdinfo --json shows size, every flag, block sizes and base:allocation")
    func describeWritable() throws {
        let fixture = try ServerFixture()
        let (top, exports) = try Self.json([fixture.uri])
        #expect(top["protocol"] as? String == "newstyle-fixed")
        #expect(top["structured"] as? Bool == true)
        let export = try #require(exports.first)
        #expect(export["export-name"] as? String == "disk")
        #expect(export["export-size"] as? Int == ServerFixture.defaultSize)
        #expect(export["is_read_only"] as? Bool == false)
        #expect(export["is_rotational"] as? Bool == false)
        for flag in ["can_cache", "can_df", "can_fast_zero", "can_flush", "can_fua", "can_multi_conn", "can_trim", "can_zero"] {
            #expect(export[flag] as? Bool == true, "\(flag)")
        }
        #expect(export["block_size_minimum"] as? Int == 512)
        #expect(export["block_size_preferred"] as? Int == 4096)
        #expect(export["block_size_maximum"] as? Int == 32 << 20)
        #expect((export["contexts"] as? [String])?.contains("base:allocation") == true)
    }

    @Test("nbdinfo --size, --is and --can answer like the flags")
    func flagQueries() throws {
        let fixture = try ServerFixture(size: 5 << 20)
        #expect(try ExternalTool.check("nbdinfo", ["--size", fixture.uri]).stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "5242880")
        for flag in ["connect", "read", "write", "cache", "df", "fast-zero", "flush", "fua", "multi-conn", "trim", "zero", "structured-reply"] {
            let result = try ExternalTool.run("nbdinfo", ["--can", flag, fixture.uri])
            #expect(result.status == 0, "--can \(flag): \(result)")
        }
        for flag in ["read-only", "rotational", "tls"] {
            let result = try ExternalTool.run("nbdinfo", ["--is", flag, fixture.uri])
            #expect(result.status == 2, "--is \(flag): \(result)")
        }
    }

    @Test("nbdinfo on a read-only export")
    func describeReadOnly() throws {
        let fixture = try ServerFixture(extraArguments: ["--read-only"])
        #expect(try ExternalTool.run("nbdinfo", ["--is", "read-only", fixture.uri]).status == 0)
        for flag in ["write", "trim", "zero", "fast-zero"] {
            let result = try ExternalTool.run("nbdinfo", ["--can", flag, fixture.uri])
            #expect(result.status == 2, "--can \(flag) on a read-only export: \(result)")
        }
        let export = try #require(try Self.json([fixture.uri]).exports.first)
        #expect(export["is_read_only"] as? Bool == true)
        #expect(export["can_flush"] as? Bool == true)
    }

    @Test("nbdinfo --list shows every export with its description")
    func list() throws {
        let directory = try TestDirectory()
        let a = directory.file("a.raw")
        let b = directory.file("b.raw")
        try ImageFile.createSparse(a, size: 2 << 20)
        try ImageFile.createSparse(b, size: 3 << 20)
        let server = try TidemarkProcess(
            arguments: ["serve", "--export", "a=\(a)", "--export", "b=\(b):ro", "--unix", directory.socketPath],
            directory: directory)
        let (_, exports) = try Self.json(["--list", try server.unixURI(export: "")])
        #expect(exports.compactMap { $0["export-name"] as? String } == ["a", "b"])
        #expect(exports.compactMap { $0["export-size"] as? Int } == [2 << 20, 3 << 20])
        #expect(exports.compactMap { $0["is_read_only"] as? Bool } == [false, true])

        let text = try ExternalTool.check("nbdinfo", ["--list", try server.unixURI(export: "")]).stdout
        #expect(text.contains("export=\"a\"") || text.contains("export=a") || text.contains("\"a\""), "\(text)")
    }

    @Test("nbdinfo --list shows --description")
    func listDescription() throws {
        let fixture = try ServerFixture(extraArguments: ["--description", "Tidemark via nbdinfo"])
        let (_, exports) = try Self.json(["--list", fixture.uri])
        #expect(exports.first?["description"] as? String == "Tidemark via nbdinfo")
    }

    @Test("nbdinfo --map matches the writes and holes")
    func allocationMap() throws {
        let fixture = try ServerFixture()
        let connection = try fixture.connect()
        try connection.pwrite(ImageFile.constant(1, count: 1 << 20), offset: 2 << 20)
        try connection.pwrite(ImageFile.constant(2, count: 65536), offset: 8 << 20)
        try connection.flush()
        let map = try Self.map(fixture.uri)
        let expected: [(UInt64, UInt64, UInt32, String)] = [
            (0, 2 << 20, 3, "hole,zero"),
            (2 << 20, 1 << 20, 0, "data"),
            (3 << 20, 5 << 20, 3, "hole,zero"),
            (8 << 20, 65536, 0, "data"),
            ((8 << 20) + 65536, UInt64(ServerFixture.defaultSize - (8 << 20) - 65536), 3, "hole,zero"),
        ]
        #expect(map.count == expected.count, "\(map)")
        for (got, want) in zip(map, expected) {
            #expect(got.offset == want.0 && got.length == want.1 && got.type == want.2 && got.description == want.3, "\(got) ≠ \(want)")
        }
    }

    @Test("nbdinfo --map --totals adds up to the export size")
    func mapTotals() throws {
        let fixture = try ServerFixture(filled: true)
        let connection = try fixture.connect()
        try connection.trim(count: 4 << 20, offset: 0)
        try connection.flush()
        let result = try ExternalTool.check("nbdinfo", ["--map", "--totals", fixture.uri])
        var total: UInt64 = 0
        var hole: UInt64 = 0
        for line in result.stdout.split(separator: "\n") {
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            guard fields.count >= 3, let bytes = UInt64(fields[0]), let type = UInt32(fields[2]) else { continue }
            total += bytes
            if type == 3 { hole += bytes }
        }
        #expect(total == UInt64(ServerFixture.defaultSize), "\(result.stdout)")
        #expect(hole == 4 << 20, "\(result.stdout)")
    }

    @Test("nbdinfo --can connect fails for an unknown export name")
    func unknownExport() throws {
        let fixture = try ServerFixture()
        let result = try ExternalTool.run("nbdinfo", ["--can", "connect", try fixture.server.unixURI(export: "nosuch")])
        #expect(result.status != 0)
        #expect(fixture.server.isRunning)
    }
}
