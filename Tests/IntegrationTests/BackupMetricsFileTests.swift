import Foundation
import Testing

/// `tidemark backup … --metrics-file`: node_exporter textfile output after a success and
/// after a failure, written atomically.
@Suite("Backup metrics file", .serialized)
struct BackupMetricsFileTests {
    @Test("a success writes timestamp, bytes and duration; a later failure adds its timestamp and keeps them")
    func successThenFailure() throws {
        let fixture = try ServerFixture(filled: true)
        let scratch = try TestDirectory()
        let chain = scratch.file("chain")
        let metrics = scratch.file("tidemark_backup.prom")
        let before = Date().timeIntervalSince1970

        let full = try BackupChecks.backup(["full", fixture.uri, chain, "--metrics-file", metrics])
        let after = Date().timeIntervalSince1970
        let copied = try #require(full["bytesCopied"] as? Int)
        #expect(copied > 0)
        let text = try String(contentsOfFile: metrics, encoding: .utf8)
        let samples = HTTPProbe.samples(text)
        let chainLabel = #"chain="\#(chain)""#
        let success = try #require(samples["tidemark_backup_last_success_timestamp_seconds{\(chainLabel)}"])
        #expect(success >= before.rounded(.down) && success <= after + 1)
        #expect(samples[#"tidemark_backup_last_bytes{\#(chainLabel),kind="full"}"#] == Double(copied))
        let duration = try #require(samples[#"tidemark_backup_last_duration_seconds{\#(chainLabel),kind="full"}"#])
        #expect(duration > 0 && duration < after - before + 1)
        #expect(samples.keys.contains { $0.hasPrefix("tidemark_backup_last_failure") } == false)
        #expect(text.contains("# TYPE tidemark_backup_last_bytes gauge"))

        // A failing incremental (no such bitmap): the failure is recorded, the success kept.
        let failed = try ControlPrograms.tidemark(
            ["backup", "incremental", fixture.uri, chain, "--bitmap", "no-such-bitmap", "--metrics-file", metrics])
        #expect(!failed.succeeded)
        let failureAt = Date().timeIntervalSince1970
        let afterFailure = HTTPProbe.samples(try String(contentsOfFile: metrics, encoding: .utf8))
        let failure = try #require(afterFailure["tidemark_backup_last_failure_timestamp_seconds{\(chainLabel)}"])
        #expect(failure >= success && failure <= failureAt + 1)
        for (key, value) in samples { #expect(afterFailure[key] == value, "\(key) changed after the failure") }
        #expect(afterFailure.count == samples.count + 1)
        // Only the file itself: the temporary was renamed into place.
        #expect(try FileManager.default.contentsOfDirectory(atPath: scratch.path).sorted() == ["chain", "tidemark_backup.prom"])
    }
}
