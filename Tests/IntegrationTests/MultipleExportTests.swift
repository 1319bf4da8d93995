import Foundation
import NBDClient
import Testing

/// One server, several exports (`--export NAME=PATH[:ro]`), chosen by name; the empty
/// name picks the first.
@Suite("Multiple exports", .serialized)
struct MultipleExportTests {
    /// Serves a.raw (8 MiB, writable) and b.raw (4 MiB, read-only).
    final class TwoExports: @unchecked Sendable {
        let directory: TestDirectory
        let a: String
        let b: String
        let server: TidemarkProcess

        init(extraArguments: [String] = []) throws {
            directory = try TestDirectory()
            a = directory.file("a.raw")
            b = directory.file("b.raw")
            try ImageFile.createFilled(a, size: 8 << 20, seed: 1)
            try ImageFile.createFilled(b, size: 4 << 20, seed: 2)
            server = try TidemarkProcess(
                arguments: ["serve", "--export", "a=\(a)", "--export", "b=\(b):ro", "--unix", directory.socketPath]
                    + extraArguments,
                directory: directory)
        }

        func connect(_ export: String, _ configure: (inout NBDConnectionConfiguration) -> Void = { _ in }) throws -> NBDConnection {
            try server.connect(export: export, configure)
        }
    }

    @Test("each name opens its own image with its own size and mode")
    func exportsByName() throws {
        let exports = try TwoExports()
        let a = try exports.connect("a")
        let b = try exports.connect("b") { $0.strictMode = [] }
        #expect(try a.size == 8 << 20)
        #expect(try !a.isReadOnly)
        #expect(try b.size == 4 << 20)
        #expect(try b.isReadOnly)
        #expect(try a.pread(count: 4096, offset: 0) == ImageFile.pattern(count: 4096, offset: 0, seed: 1))
        #expect(try b.pread(count: 4096, offset: 0) == ImageFile.pattern(count: 4096, offset: 0, seed: 2))

        try a.pwrite(ImageFile.constant(0xAB, count: 4096), offset: 0)
        try a.flush()
        #expect(try b.pread(count: 4096, offset: 0) == ImageFile.pattern(count: 4096, offset: 0, seed: 2))
        #expect(try ImageFile.read(exports.a, offset: 0, count: 4096) == ImageFile.constant(0xAB, count: 4096))
        expectErrno(EPERM, "WRITE on the :ro export") { try b.pwrite(ImageFile.constant(1, count: 4096), offset: 0) }
        expectUsable(b, "after EPERM")
        #expect(try ImageFile.read(exports.b) == ImageFile.pattern(count: 4 << 20, offset: 0, seed: 2))
    }

    @Test("the empty export name selects the first export")
    func defaultExport() throws {
        let exports = try TwoExports()
        let connection = try exports.connect("")
        #expect(try connection.size == 8 << 20)
        #expect(try !connection.isReadOnly)
        #expect(try connection.pread(count: 4096, offset: 4096) == ImageFile.pattern(count: 4096, offset: 4096, seed: 1))
        // Through a URI without a path too.
        let viaURI = try NBDConnection()
        try viaURI.connect(uri: "nbd+unix:///?socket=\(exports.directory.socketPath)")
        #expect(try viaURI.size == 8 << 20)
    }

    @Test("NBD_OPT_LIST names every export, in order")
    func listExports() throws {
        let exports = try TwoExports()
        let connection = try NBDConnection(NBDConnectionConfiguration(optMode: true))
        try connection.connect(unixSocket: exports.directory.socketPath)
        let listed = try connection.optList()
        #expect(listed.map(\.name) == ["a", "b"])
        try connection.optGo(exportName: "b")
        #expect(try connection.size == 4 << 20)
    }

    @Test("an unknown name is refused with NBD_REP_ERR_UNKNOWN; another name then works")
    func unknownExport() throws {
        let exports = try TwoExports()
        let connection = try NBDConnection(NBDConnectionConfiguration(optMode: true))
        try connection.connect(unixSocket: exports.directory.socketPath)
        #expect(nbdError { try connection.optGo(exportName: "nosuch") } != nil)
        #expect(connection.isNegotiating)
        #expect(nbdError { try connection.optInfo(exportName: "nosuch") } != nil)
        try connection.optGo(exportName: "a")
        #expect(try connection.size == 8 << 20)

        let raw = try RawNBDSocket(unixSocket: exports.directory.socketPath)
        try raw.handshake()
        try raw.sendOption(.go, data: RawNBDSocket.goPayload(export: "nosuch"))
        let replies = try raw.readOptionReplies()
        #expect(replies.last?.type == RawNBDSocket.Reply.errUnknown.rawValue)
        #expect(replies.last?.option == RawNBDSocket.Option.go.rawValue)
        // Plain connect fails too, without taking the server down.
        let plain = try NBDConnection(NBDConnectionConfiguration(exportName: "nosuch"))
        #expect(nbdError { try plain.connect(unixSocket: exports.directory.socketPath) } != nil)
        #expect(exports.server.isRunning)
    }

    @Test("--description is announced in LIST and in NBD_INFO_DESCRIPTION")
    func description() throws {
        let fixture = try ServerFixture(extraArguments: ["--description", "Tidemark test disk"])
        let lister = try NBDConnection(NBDConnectionConfiguration(optMode: true))
        try lister.connect(unixSocket: fixture.directory.socketPath)
        #expect(try lister.optList() == [NBDExportListing(name: "disk", description: "Tidemark test disk")])
        try lister.optAbort()

        let connection = try fixture.connect { $0.fullInfo = true }
        #expect(try connection.exportDescription == "Tidemark test disk")
    }
}
