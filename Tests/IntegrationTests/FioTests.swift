import Foundation
import NBDClient
import Testing

/// fio with its libnbd engine, verifying every block it wrote with crc32c.
@Suite("fio", .serialized)
struct FioTests {
    /// fio's engine and verification options for `uri`, before a job's own.
    static func verifyingArguments(_ uri: String) -> [String] {
        ["--ioengine=nbd", "--uri=\(uri)", "--output-format=json", "--verify=crc32c", "--do_verify=1",
         "--verify_fatal=1", "--verify_backlog=0", "--verify_state_save=0"]
    }

    /// Runs fio in `directory` (fio leaves files in its working directory otherwise).
    static func fio(
        _ uri: String, in directory: TestDirectory, _ arguments: [String], environment: [String: String] = [:]
    ) throws -> [String: Any] {
        let result = try ExternalTool.check(
            "fio", verifyingArguments(uri) + arguments, timeout: 180, environment: environment,
            currentDirectory: directory.path)
        guard let start = result.stdout.firstIndex(of: "{"),
              let json = try JSONSerialization.jsonObject(with: Data(result.stdout[start...].utf8)) as? [String: Any]
        else {
            throw HarnessError("fio printed no JSON:\n\(result)")
        }
        return json
    }

    static func jobErrors(_ json: [String: Any]) -> [Int] {
        (json["jobs"] as? [[String: Any]] ?? []).map { $0["error"] as? Int ?? -1 }
    }

    /// Bytes the first job moved in `direction` ("read" or "write"); a verify pass counts
    /// as reads.
    static func ioBytes(_ json: [String: Any], _ direction: String) -> Int? {
        ((json["jobs"] as? [[String: Any]])?.first?[direction] as? [String: Any])?["io_bytes"] as? Int
    }

    @Test("random 4 KiB writes at queue depth 16, verified with crc32c")
    func randomWriteVerify() throws {
        let fixture = try ServerFixture()
        let json = try Self.fio(fixture.uri, in: fixture.directory, [
            "--name=randwrite", "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=16m",
        ])
        #expect(Self.jobErrors(json) == [0])
        let written = (json["jobs"] as? [[String: Any]])?.first?["write"] as? [String: Any]
        #expect(written?["io_bytes"] as? Int == 16 << 20)
    }

    @Test("mixed block sizes 512 B – 256 KiB, sequential, verified with crc32c")
    func mixedSizesVerify() throws {
        let fixture = try ServerFixture()
        let json = try Self.fio(fixture.uri, in: fixture.directory, [
            "--name=mixed", "--rw=write", "--bsrange=512-256k", "--iodepth=8", "--size=16m",
        ])
        #expect(Self.jobErrors(json) == [0])
    }

    @Test("two fio jobs on separate connections and regions, verified with crc32c")
    func twoJobs() throws {
        let fixture = try ServerFixture()
        let json = try Self.fio(fixture.uri, in: fixture.directory, [
            "--name=a", "--rw=randwrite", "--bs=64k", "--iodepth=4", "--offset=0", "--size=8m",
            "--name=b", "--rw=randwrite", "--bs=16k", "--iodepth=4", "--offset=8m", "--size=8m",
        ])
        #expect(Self.jobErrors(json) == [0, 0])
    }
}
