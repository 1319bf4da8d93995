import ArgumentParser
import CoreMetrics
import Prometheus
import TidemarkMetrics
import TidemarkServer

/// `tidemark serve --metrics ADDR:PORT`: swift-metrics bootstrapped onto a Prometheus
/// registry, the server's ``ServerMetrics`` on it, and the HTTP endpoint that renders it.
struct MetricsListener {
    /// The version reported by `tidemark_build_info`.
    static let version = "0.1.0"

    let host: String
    let port: Int

    /// Parses `HOST:PORT` or `[IPV6]:PORT`.
    init(parsing text: String) throws {
        guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]),
            (0...65535).contains(port)
        else { throw ValidationError("--metrics needs ADDR:PORT (e.g. 127.0.0.1:9810), got '\(text)'") }
        var host = String(text[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        guard !host.isEmpty else { throw ValidationError("--metrics needs an address before the port, got '\(text)'") }
        self.host = host
        self.port = port
    }

    /// Bootstraps the process' metrics system (once per process) and returns what the
    /// server records into.
    static func bootstrap() -> (ServerMetrics, PrometheusCollectorRegistry) {
        let registry = PrometheusCollectorRegistry()
        let factory = MetricsEndpoint.makeFactory(registry: registry)
        MetricsSystem.bootstrap(factory)
        Meter(label: "tidemark_build_info", dimensions: [("version", version)], factory: factory).set(1)
        return (ServerMetrics(factory: factory), registry)
    }

    /// Starts the endpoint; returns it and the port bound.
    func start(
        registry: PrometheusCollectorRegistry, metrics: ServerMetrics, exports: ExportRegistry
    ) async throws -> (MetricsEndpoint, Int) {
        let endpoint = MetricsEndpoint(registry: registry)
        let bound = try await endpoint.start(
            host: host, port: port,
            collect: { metrics.collect(registry: exports) },
            tick: { metrics.tick(registry: exports) })
        return (endpoint, bound)
    }
}
