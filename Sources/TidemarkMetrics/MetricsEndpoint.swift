import CoreMetrics
import NIOCore
import NIOHTTP1
import NIOPosix
import Prometheus
import Synchronization
import TidemarkServer

/// `GET /metrics` in Prometheus text format, on a small HTTP/1 listener with an event
/// loop thread of its own: a scrape (collecting state, rendering the registry) never
/// runs on, or waits for, the data path's loops.
///
/// Every scrape first runs `collect` (publishing what connections folded in, sampling
/// bitmaps, checkpoints and views), then renders the registry. The listener answers one
/// request per connection and bounds what a client can make it hold (see
/// ``MetricsHTTPHandler``): the port may be reachable by anyone.
public final class MetricsEndpoint: Sendable {
    /// Most scrape connections open at once; more are closed at accept.
    public static let maximumConnections = 16
    /// How often `tick` runs (publishing folded request tallies, noting pending
    /// checkpoints).
    public static let tickInterval: TimeAmount = .seconds(1)

    public let registry: PrometheusCollectorRegistry
    private let group: MultiThreadedEventLoopGroup
    private let channel: Mutex<(any Channel)?>
    private let ticker: Mutex<RepeatedTask?>
    private let openConnections = Atomic<Int>(0)

    /// The Prometheus factory the process bootstraps swift-metrics with: request
    /// latencies (recorded in seconds) get buckets from 10 µs to 1 s
    /// (``RequestTally/bucketBounds``).
    public static func makeFactory(registry: PrometheusCollectorRegistry) -> PrometheusMetricsFactory {
        var factory = PrometheusMetricsFactory(registry: registry)
        factory.valueHistogramBuckets["tidemark_request_duration_seconds"] =
            RequestTally.bucketBounds.map { Double($0) / 1e9 }
        return factory
    }

    public init(registry: PrometheusCollectorRegistry) {
        self.registry = registry
        self.group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        self.channel = Mutex(nil)
        self.ticker = Mutex(nil)
    }

    /// Binds `host:port` and serves until ``stop()``.
    /// - Parameters:
    ///   - collect: runs on the endpoint's thread before each rendering.
    ///   - tick: runs on the endpoint's thread every ``tickInterval``.
    /// - Returns: the port bound (useful with port 0).
    public func start(
        host: String, port: Int, collect: @escaping @Sendable () -> Void, tick: @escaping @Sendable () -> Void = {}
    ) async throws -> Int {
        let registry = self.registry
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 32)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.maxMessagesPerRead, value: 1)
            .childChannelInitializer { [self] channel in
                guard openConnections.wrappingAdd(1, ordering: .relaxed).newValue <= Self.maximumConnections else {
                    openConnections.subtract(1, ordering: .relaxed)
                    return channel.close()
                }
                channel.closeFuture.whenComplete { [self] _ in openConnections.subtract(1, ordering: .relaxed) }
                return channel.eventLoop.makeCompletedFuture {
                    let sync = channel.pipeline.syncOperations
                    try sync.addHandler(HTTPRequestSizeLimit(limit: MetricsHTTPHandler.maximumRequestBytes))
                    try sync.addHandler(HTTPResponseEncoder())
                    try sync.addHandler(ByteToMessageHandler(HTTPRequestDecoder(leftOverBytesStrategy: .dropBytes)))
                    try sync.addHandler(
                        MetricsHTTPHandler(render: {
                            collect()
                            return registry.emitToBuffer()
                        }))
                }
            }
        let bound = try await bootstrap.bind(host: host, port: port).get()
        channel.withLock { $0 = bound }
        let task = group.next().scheduleRepeatedTask(initialDelay: .zero, delay: Self.tickInterval) { _ in tick() }
        ticker.withLock { $0 = task }
        return bound.localAddress?.port ?? port
    }

    /// Closes the listener and stops the thread.
    public func stop() async {
        ticker.withLock { task in
            task?.cancel()
            task = nil
        }
        let bound = channel.withLock { channel in
            defer { channel = nil }
            return channel
        }
        try? await bound?.close().get()
        try? await group.shutdownGracefully()
    }
}
