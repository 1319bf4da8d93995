import Foundation
import NBDClient
import Testing
import QMPWire

/// The `tidemark` command line against a running server through its control socket:
/// `bitmap add|remove|clear|enable|disable|merge|list --control`, `checkpoint
/// create|complete|abort`, `query` (text and `--json`).
@Suite("Control: CLI through --control")
struct ControlCLITests {
    static func cli(_ arguments: [String], sourceLocation: SourceLocation = #_sourceLocation) throws -> ToolResult {
        let result = try ControlPrograms.tidemark(arguments)
        #expect(result.succeeded, "\(result)", sourceLocation: sourceLocation)
        return result
    }

    @Test("bitmap add/list/merge/clear/disable/enable/remove through --control")
    func bitmapCommands() throws {
        let fixture = try ControlFixture()
        let control = ["--control", fixture.controlPath, "--export", "disk"]
        let observer = try fixture.qmp()
        try Self.cli(["bitmap", "add"] + control + ["b1"])
        try Self.cli(["bitmap", "add"] + control + ["--granularity", "4K", "--transient", "--disabled", "fine"])
        var bitmaps = try ControlFixture.bitmaps(observer)
        #expect(bitmaps["b1"] == [
            "name": "b1", "count": 0, "granularity": 65536, "recording": true, "busy": false, "persistent": true, "generation": 0,
        ])
        #expect(bitmaps["fine"]?["granularity"] == 4096 && bitmaps["fine"]?["persistent"] == false && bitmaps["fine"]?["recording"] == false)

        try fixture.write([(2 << 20, 4096)])
        let listed = try Self.cli(["bitmap", "list"] + control + ["--json"])
        let list = try QMPJSON.parse(listed.stdout)
        #expect(list.arrayValue?.map { $0["name"] } == ["b1", "fine"], "\(listed.stdout)")
        #expect(list[0]?["count"] == 65536)
        let text = try Self.cli(["bitmap", "list"] + control)
        #expect(text.stdout.contains("b1\tgranularity=65536\tcount=65536\trecording=true"), "\(text.stdout)")

        try Self.cli(["bitmap", "merge"] + control + ["fine", "b1"])
        #expect(try ControlFixture.bitmaps(observer)["fine"]?["count"] == 65536)
        try Self.cli(["bitmap", "clear"] + control + ["fine"])
        #expect(try ControlFixture.bitmaps(observer)["fine"]?["count"] == 0)
        try Self.cli(["bitmap", "enable"] + control + ["fine"])
        #expect(try ControlFixture.bitmaps(observer)["fine"]?["recording"] == true)
        try Self.cli(["bitmap", "disable"] + control + ["b1"])
        #expect(try ControlFixture.bitmaps(observer)["b1"]?["recording"] == false)
        try Self.cli(["bitmap", "remove"] + control + ["fine"])
        bitmaps = try ControlFixture.bitmaps(observer)
        #expect(Set(bitmaps.keys) == ["b1"])

        // Errors: the server's message, a non-zero status.
        let missing = try ControlPrograms.tidemark(["bitmap", "remove"] + control + ["missing"])
        #expect(!missing.succeeded)
        #expect(missing.stderr.contains("bitmap 'missing' not found"), "\(missing)")
        let duplicate = try ControlPrograms.tidemark(["bitmap", "add"] + control + ["b1"])
        #expect(!duplicate.succeeded && duplicate.stderr.contains("bitmap 'b1' already exists"), "\(duplicate)")
        let noExport = try ControlPrograms.tidemark(["bitmap", "add", "--control", fixture.controlPath, "--export", "nope", "x"])
        #expect(!noExport.succeeded && noExport.stderr.contains("nope"), "\(noExport)")
        let noServer = try ControlPrograms.tidemark(["bitmap", "list", "--control", fixture.directory.file("absent.sock")])
        #expect(!noServer.succeeded && noServer.stderr.contains("absent.sock"), "\(noServer)")
        #expect(fixture.server.isRunning)
    }

    @Test("checkpoint create/complete/abort and query --json through the CLI; the increment read with nbdinfo")
    func checkpointAndQuery() throws {
        // A short server default timeout: the CLI's checkpoints must not be aborted when it exits.
        let fixture = try ControlFixture(extraArguments: ["--checkpoint-timeout", "1"])
        let control = ["--control", fixture.controlPath, "--export", "disk"]
        let observer = try fixture.qmp()
        try Self.cli(["bitmap", "add"] + control + ["b1"])
        try Self.cli(["bitmap", "add"] + control + ["b2"])
        try fixture.write([(1 << 20, 4096), (8 << 20, 4096)])

        let created = try Self.cli(["checkpoint", "create"] + control + ["--bitmap", "b1", "--json"])
        #expect(try QMPJSON.parse(created.stdout).removing(JSONValue.lineageKeys) == ["name": "c1", "bitmap": "b1", "count": 131072], "\(created.stdout)")
        let named = try Self.cli(["checkpoint", "create"] + control + ["--bitmap", "b2", "--name", "nightly"])
        #expect(named.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "nightly")
        _ = try observer.waitForEvent("CHECKPOINT_CREATED") { $0["data"]?["name"] == "nightly" }

        try fixture.write([(12 << 20, 4096)])
        usleep(2_000_000)  // past the server's 1 s default timeout
        let events = observer.events + (try observer.drain(timeout: 0.1))
        #expect(!events.contains { $0["event"] == "CHECKPOINT_ABORTED" }, "the CLI's checkpoints were aborted: \(events)")

        let queried = try Self.cli(["query", "--control", fixture.controlPath, "--json"])
        let nodes = try QMPJSON.parse(queried.stdout)
        #expect(nodes == (try observer.run("query-named-block-nodes")), "query --json prints query-named-block-nodes")
        let bitmaps = nodes[0]?["dirty-bitmaps"]?.arrayValue ?? []
        #expect(bitmaps.map { $0["name"] } == ["b1", "b2", "c1", "nightly"])
        #expect(bitmaps.first { $0["name"] == "c1" }?["checkpoint-of"] == "b1")
        #expect(bitmaps.first { $0["name"] == "c1" }?["busy"] == true)
        let plain = try Self.cli(["query", "--control", fixture.controlPath])
        #expect(plain.stdout.contains("export disk"), "\(plain.stdout)")
        #expect(plain.stdout.contains("bitmap c1\tcount=131072"), "\(plain.stdout)")
        #expect(plain.stdout.contains("checkpoint-of=b1"), "\(plain.stdout)")

        let map = try BitmapMaps.nbdinfoMap(uri: try fixture.uri(), context: BitmapMaps.context("c1"))
        #expect(map.extents == BitmapMaps.bitmapMap(dirty: [(1 << 20, 65536), (8 << 20, 65536)], size: fixture.size), "\(map.text)")

        try Self.cli(["checkpoint", "complete"] + control + ["c1"])
        try Self.cli(["checkpoint", "abort"] + control + ["nightly"])
        let after = try ControlFixture.bitmaps(observer)
        #expect(Set(after.keys) == ["b1", "b2"])
        #expect(after["b1"]?["count"] == 65536, "only the write after the checkpoint")
        #expect(after["b2"]?["count"] == 196608, "abort merged the increment back")

        let bad = try ControlPrograms.tidemark(["checkpoint", "complete"] + control + ["c1"])
        #expect(!bad.succeeded && bad.stderr.contains("bitmap 'c1' not found"), "\(bad)")
        let busy = try ControlPrograms.tidemark(["checkpoint", "create"] + control + ["--bitmap", "missing"])
        #expect(!busy.succeeded && busy.stderr.contains("bitmap 'missing' not found"), "\(busy)")
    }
}
