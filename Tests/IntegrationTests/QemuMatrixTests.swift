import Foundation
import NBDClient
import Testing

/// One column of the QEMU matrix: a QEMU release as the client, how the server runs, and
/// the framing they must end up with.
struct QemuMatrixClient: CustomStringConvertible, Sendable {
    let release: QemuRelease
    /// Extra `tidemark serve` arguments for this column.
    let serverArguments: [String]
    /// True when the client must negotiate NBD extended headers.
    let extendedHeaders: Bool

    var description: String {
        let framing = extendedHeaders ? "extended headers" : "compact headers"
        return serverArguments.isEmpty
            ? "\(release), \(framing)" : "\(release) against serve \(serverArguments.joined(separator: " ")), \(framing)"
    }

    /// qemu 7.2 (no extended headers), qemu 10 (extended headers), and qemu 10 against a
    /// server that refuses them (it falls back to compact headers).
    static let all: [QemuMatrixClient] = [
        QemuMatrixClient(release: .qemu7, serverArguments: [], extendedHeaders: false),
        QemuMatrixClient(release: .qemu10, serverArguments: [], extendedHeaders: true),
        QemuMatrixClient(release: .qemu10, serverArguments: ["--no-extended-headers"], extendedHeaders: false),
    ]

    /// The `tidemark serve` arguments: the column's, and debug logging, whose "transmission
    /// started" lines name each connection's framing.
    var serveArguments: [String] { serverArguments + ["--log-level", "debug"] }

    /// Checks the server log: a QEMU connection got this column's framing, and with compact
    /// framing expected, none got extended headers.
    func expectFraming(_ server: TidemarkProcess, sourceLocation: SourceLocation = #_sourceLocation) {
        let lines = server.serverLog.split(separator: "\n").filter { $0.contains("transmission started") }
        let extended = lines.filter { $0.contains("framing=\"extended headers\"") }.count
        let compact = lines.filter { $0.contains("framing=\"compact headers\"") }.count
        if extendedHeaders {
            #expect(extended > 0, "no connection negotiated extended headers:\n\(lines.joined(separator: "\n"))", sourceLocation: sourceLocation)
        } else {
            #expect(extended == 0 && compact > 0, "framing of the connections:\n\(lines.joined(separator: "\n"))", sourceLocation: sourceLocation)
        }
    }
}

/// The QEMU matrix: {qemu 7.2, qemu 10.0} × {qemu-io data commands, qemu-img info, map of
/// base:allocation and of a dirty bitmap, convert out of and into the export, compare}, each
/// cell one test case, results checked on the image file as well as through the client.
@Suite("QEMU matrix", .serialized)
struct QemuMatrixTests {
    static let mib = 1 << 20

    static func server(_ client: QemuMatrixClient, size: Int = ServerFixture.defaultSize, filled: Bool = false, extra: [String] = [])
        throws -> ServerFixture
    {
        try ServerFixture(size: size, filled: filled, extraArguments: client.serveArguments + extra)
    }

    @Test("the matrix runs the QEMU releases it names", arguments: QemuRelease.allCases)
    func releaseVersions(release: QemuRelease) throws {
        for tool in ["qemu-img", "qemu-io", "qemu-nbd", "qemu-storage-daemon"] {
            let output = try release.check(tool, ["--version"]).stdout
            let firstLine = output.split(separator: "\n").first.map(String.init) ?? ""
            #expect(firstLine.contains(" " + release.versionPrefix), "\(tool) of \(release): \(firstLine)")
        }
    }

    @Test("qemu-io: write, read -P, write -z, write -z -u, discard, aio and FUA; the file agrees", arguments: QemuMatrixClient.all)
    func qemuIOPatterns(client: QemuMatrixClient) throws {
        let fixture = try Self.server(client)
        try client.release.qemuIO(fixture.uri, [
            "write -P 0xab 0 1M",
            "write -P 0xcd 1M 64k",
            "write -f -P 0xef 3M 4k",
            "write -P 0x12 5M 1536",
            "aio_write -P 0x34 6M 256k",
            "aio_flush",
            "read -P 0xab 0 1M",
            "read -P 0xcd 1M 64k",
            "read -P 0xef 3M 4k",
            "read -P 0x12 5M 1536",
            "read -P 0x34 6M 256k",
            "read -P 0 2M 1M",
            "flush",
        ])
        let image = try ImageFile.read(fixture.image)
        #expect(Array(image[0..<Self.mib]) == ImageFile.constant(0xAB, count: Self.mib))
        #expect(Array(image[Self.mib..<(Self.mib + 65536)]) == ImageFile.constant(0xCD, count: 65536))
        #expect(Array(image[(3 * Self.mib)..<(3 * Self.mib + 4096)]) == ImageFile.constant(0xEF, count: 4096))
        #expect(Array(image[(5 * Self.mib)..<(5 * Self.mib + 1536)]) == ImageFile.constant(0x12, count: 1536))
        #expect(Array(image[(6 * Self.mib)..<(6 * Self.mib + 262_144)]) == ImageFile.constant(0x34, count: 262_144))

        try client.release.qemuIO(fixture.uri, [
            "write -z 0 64k",
            "write -z -u 64k 64k",
            "discard 1M 64k",
            "read -P 0 0 128k",
            "read -P 0xab 128k 896k",
            "read -P 0 1M 64k",
        ])
        let after = try ImageFile.read(fixture.image, offset: 0, count: Self.mib + 65536)
        #expect(Array(after[0..<131_072]) == ImageFile.constant(0, count: 131_072))
        #expect(Array(after[131_072..<Self.mib]) == ImageFile.constant(0xAB, count: Self.mib - 131_072))
        #expect(Array(after[Self.mib...]) == ImageFile.constant(0, count: 65536))
        // A pattern that does not match must be reported: the check above is not vacuous.
        #expect(throws: HarnessError.self) { try client.release.qemuIO(fixture.uri, ["read -P 0x77 0 4k"]) }
        client.expectFraming(fixture.server)
    }

    @Test("qemu-img info reports the virtual size", arguments: QemuMatrixClient.all)
    func info(client: QemuMatrixClient) throws {
        let fixture = try Self.server(client, size: 24 << 20)
        let result = try client.release.check("qemu-img", ["info", "--output=json", fixture.uri])
        let json = try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any]
        #expect(json?["virtual-size"] as? Int == 24 << 20, "\(result.stdout)")
        #expect(json?["format"] as? String == "raw", "\(result.stdout)")
        client.expectFraming(fixture.server)
    }

    /// `qemu-img map --output=json` entries as (start, length, data, zero).
    static func mapEntries(_ output: String) throws -> [(start: UInt64, length: UInt64, data: Bool, zero: Bool)] {
        guard let entries = try JSONSerialization.jsonObject(with: Data(output.utf8)) as? [[String: Any]] else {
            throw HarnessError("qemu-img map output is not a JSON array:\n\(output)")
        }
        return try entries.map { entry in
            guard let start = (entry["start"] as? NSNumber)?.uint64Value,
                let length = (entry["length"] as? NSNumber)?.uint64Value,
                let data = entry["data"] as? Bool, let zero = entry["zero"] as? Bool
            else { throw HarnessError("unexpected qemu-img map entry \(entry)") }
            return (start, length, data, zero)
        }
    }

    @Test("qemu-img map of base:allocation matches the file's data and holes", arguments: QemuMatrixClient.all)
    func mapAllocation(client: QemuMatrixClient) throws {
        let fixture = try Self.server(client)
        try client.release.qemuIO(fixture.uri, ["write -P 0x01 3M 1M", "write -P 0x02 9M 64k"])
        let result = try client.release.check("qemu-img", ["map", "--output=json", "-f", "raw", fixture.uri])
        let entries = try Self.mapEntries(result.stdout)
        // Merge neighbours with the same data flag, then compare with the expected layout.
        var runs: [BitmapExtent] = []
        for entry in entries {
            runs.append(BitmapExtent(entry.start, entry.length, entry.data ? 0 : 3))
            #expect(entry.data || entry.zero, "a hole that is not zero: \(entry)")
        }
        let mib = UInt64(Self.mib)
        let expected = [
            BitmapExtent(0, 3 * mib, 3), BitmapExtent(3 * mib, mib, 0), BitmapExtent(4 * mib, 5 * mib, 3),
            BitmapExtent(9 * mib, 65536, 0), BitmapExtent(9 * mib + 65536, UInt64(ServerFixture.defaultSize) - 9 * mib - 65536, 3),
        ]
        #expect(BitmapMaps.merged(runs) == expected, "\(result.stdout)")
        #expect(try BitmapMaps.merged(runs) == BitmapMaps.fileAllocation(fixture.image), "\(result.stdout)")
        client.expectFraming(fixture.server)
    }

    @Test("qemu-img map with x-dirty-bitmap=qemu:dirty-bitmap:b0 shows exactly the dirty granules", arguments: QemuMatrixClient.all)
    func mapDirtyBitmap(client: QemuMatrixClient) throws {
        let fixture = try ServerFixture(
            size: Int(BitmapInteropTests.size), extraArguments: client.serveArguments + ["--bitmap", "b0", "--bitmap", "fine:4096"])
        let connection = try fixture.connect()
        try BitmapInteropTests.applyPattern(connection)
        try connection.shutdown()
        guard let socket = fixture.server.socketPath else { throw HarnessError("no Unix listener") }
        for (bitmap, dirty) in [("b0", BitmapInteropTests.b0Dirty), ("fine", BitmapInteropTests.fineDirty)] {
            let result = try client.release.check("qemu-img", [
                "map", "--output=json", "--image-opts",
                "driver=nbd,server.type=unix,server.path=\(socket),export=disk,x-dirty-bitmap=\(BitmapMaps.context(bitmap))",
            ])
            // x-dirty-bitmap feeds the bitmap in as if it were base:allocation: dirty = "hole".
            let extents = try Self.mapEntries(result.stdout).map { BitmapExtent($0.start, $0.length, $0.data ? 0 : 1) }
            #expect(
                BitmapMaps.merged(extents) == BitmapMaps.bitmapMap(dirty: dirty, size: BitmapInteropTests.size),
                "\(bitmap):\n\(result.stdout)")
        }
        client.expectFraming(fixture.server)
    }

    @Test("qemu-img convert from the export into a file: same bytes, holes kept", arguments: QemuMatrixClient.all)
    func convertFromExport(client: QemuMatrixClient) throws {
        let fixture = try Self.server(client, filled: true)
        try client.release.qemuIO(fixture.uri, ["discard 4M 2M"])
        let copy = fixture.directory.file("copy.raw")
        try client.release.check("qemu-img", ["convert", "-f", "raw", "-O", "raw", fixture.uri, copy])
        #expect(try ImageFile.read(copy) == ImageFile.read(fixture.image))
        #expect(try ImageFile.allocatedBytes(copy) <= ServerFixture.defaultSize - (2 << 20) + 65536)
        client.expectFraming(fixture.server)
    }

    @Test("qemu-img convert -n from a file into the export: the image holds the file's bytes", arguments: QemuMatrixClient.all)
    func convertIntoExport(client: QemuMatrixClient) throws {
        let fixture = try Self.server(client, filled: true)
        let source = fixture.directory.file("source.raw")
        var bytes = ImageFile.pattern(count: ServerFixture.defaultSize, offset: 0, seed: 41)
        bytes.replaceSubrange((2 << 20)..<(6 << 20), with: ImageFile.constant(0, count: 4 << 20))
        try ImageFile.write(source, bytes: bytes)
        try client.release.check("qemu-img", ["convert", "-n", "-f", "raw", "-O", "raw", source, fixture.uri])
        #expect(try ImageFile.read(fixture.image) == bytes)
        client.expectFraming(fixture.server)
    }

    @Test("qemu-img compare: identical says so, one changed byte is found at its offset", arguments: QemuMatrixClient.all)
    func compare(client: QemuMatrixClient) throws {
        let fixture = try Self.server(client, filled: true)
        let copy = fixture.directory.file("copy.raw")
        try ImageFile.write(copy, bytes: ImageFile.read(fixture.image))
        let same = try client.release.run("qemu-img", ["compare", "-f", "raw", "-F", "raw", fixture.uri, copy])
        #expect(same.status == 0, "\(same)")
        #expect(same.stdout.contains("Images are identical"), "\(same)")

        let changed = 7 * Self.mib + 12345
        try client.release.qemuIO(fixture.uri, ["write -P 0x00 \(changed) 1"])
        let differ = try client.release.run("qemu-img", ["compare", "-f", "raw", "-F", "raw", fixture.uri, copy])
        #expect(differ.status == 1, "\(differ)")
        // qemu-img names the first differing sector's offset.
        let sector = changed / 512 * 512
        #expect(differ.stdout.contains("Content mismatch at offset \(sector)!"), "\(differ)")
        client.expectFraming(fixture.server)
    }
}
