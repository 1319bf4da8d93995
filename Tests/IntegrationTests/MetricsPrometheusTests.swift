import Foundation
import NBDClient
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A real Prometheus server (Debian's 2.42) scraping `serve --metrics`: the exposition is
/// one Prometheus accepts, and its query API sees the traffic.
@Suite("Metrics scraped by Prometheus", .serialized)
struct MetricsPrometheusTests {
    /// The value of a one-series instant query, or nil while it has no result.
    static func query(_ expression: String, port: Int) throws -> Double? {
        let encoded = expression.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? expression
        let response = try HTTPProbe.get(port: port, "/api/v1/query?query=\(encoded)")
        guard response.status == 200,
            let object = try JSONSerialization.jsonObject(with: Data(response.body.utf8)) as? [String: Any],
            let data = object["data"] as? [String: Any], let results = data["result"] as? [[String: Any]],
            results.count == 1, let value = results[0]["value"] as? [Any], value.count == 2,
            let text = value[1] as? String
        else { return nil }
        return Double(text)
    }

    /// Polls `expression` until it equals `expected` (or 30 s pass); returns the last value.
    static func waitFor(_ expression: String, toBe expected: Double, port: Int) throws -> Double? {
        let deadline = Date().addingTimeInterval(30)
        var last: Double?
        repeat {
            last = try? query(expression, port: port)
            if last == expected { return last }
            usleep(250_000)
        } while Date() < deadline
        return last
    }

    @Test("Prometheus scrapes the endpoint every second and its API reports the write count and latency histogram")
    func prometheusScrapes() throws {
        let prometheus = try ExternalTool.locate("prometheus")
        let (fixture, metricsPort) = try MetricsTests.serveWithMetrics()
        let scratch = try TestDirectory()
        let config = scratch.file("prometheus.yml")
        try """
        global:
          scrape_interval: 1s
          evaluation_interval: 1s
        scrape_configs:
          - job_name: tidemark
            metrics_path: /metrics
            static_configs:
              - targets: ['127.0.0.1:\(metricsPort)']
        """.write(toFile: config, atomically: true, encoding: .utf8)

        var server: BackgroundProgram?
        var apiPort = 0
        for _ in 0..<5 {
            apiPort = try HTTPProbe.freePort()
            let started = try BackgroundProgram(prometheus, [
                "--config.file=\(config)", "--storage.tsdb.path=\(scratch.file("tsdb"))",
                "--web.listen-address=127.0.0.1:\(apiPort)", "--log.level=warn",
            ])
            let deadline = Date().addingTimeInterval(30)
            while Date() < deadline && started.process.isRunning {
                if let ready = try? HTTPProbe.get(port: apiPort, "/-/ready"), ready.status == 200 { break }
                usleep(100_000)
            }
            if started.process.isRunning {
                server = started
                break
            }
        }
        guard let server else { throw HarnessError("prometheus did not start") }
        defer { server.kill(signal: SIGTERM) }

        #expect(try Self.waitFor(#"up{job="tidemark"}"#, toBe: 1, port: apiPort) == 1, "the target never came up")

        let writes = 25
        do {
            let connection = try fixture.connect()
            let block = [UInt8](repeating: 7, count: 4096)
            for index in 0..<writes { try connection.pwrite(block, offset: UInt64(index) * 4096) }
            try connection.shutdown()
        }
        let selector = #"{job="tidemark",export="disk",command="write""#
        #expect(try Self.waitFor("tidemark_requests_total\(selector),result=\"ok\"}", toBe: Double(writes), port: apiPort)
            == Double(writes))
        #expect(try Self.waitFor("tidemark_request_duration_seconds_count\(selector)}", toBe: Double(writes), port: apiPort)
            == Double(writes))
        #expect(try Self.waitFor("tidemark_request_bytes_total\(selector)}", toBe: Double(writes * 4096), port: apiPort)
            == Double(writes * 4096))
        #expect(try Self.waitFor(#"tidemark_build_info{job="tidemark",version="0.1.0"}"#, toBe: 1, port: apiPort) == 1)
        // Prometheus parsed the histogram as one: a quantile over its buckets is a number.
        let quantile = try Self.query(
            #"histogram_quantile(0.5, sum by (le) (tidemark_request_duration_seconds_bucket{command="write"}))"#,
            port: apiPort)
        #expect(quantile.map { $0 > 0 && $0 <= 1 } == true, "median write latency: \(String(describing: quantile))")
    }
}
