import CoreMetrics
import NIOCore
import Synchronization

/// The server's metrics, published through swift-metrics to whatever backend the process
/// bootstrapped (`tidemark serve --metrics`: Prometheus).
///
/// The data path never calls swift-metrics: each connection tallies its requests in a
/// ``RequestTally`` on its event loop and folds it in here (under one lock, a few hundred
/// additions) every ``foldInterval`` while busy and when it closes. ``tick(registry:)``
/// (every second) and ``collect(registry:)`` (each scrape) run on the metrics endpoint's
/// thread, off the data path's loops: both publish the folded tallies; the scrape also
/// samples the state-like values (bitmaps, checkpoints, views, journal) that change with
/// every write and are cheaper read once per scrape than updated per write. Connection
/// events are rare and go to swift-metrics directly.
public final class ServerMetrics: Sendable {
    /// How long a busy connection keeps its tally before folding it in.
    public static let foldInterval: TimeAmount = .milliseconds(250)

    let factory: any MetricsFactory
    /// How the event loops' idle polls ended (``IdlePoller``), counted on the loops.
    public let idlePolls = IdlePollStatistics()
    /// What connections folded in since the last publication, by export name.
    private let folded = Mutex<[String: RequestTally]>([:])
    /// The swift-metrics objects made so far; used only by `collect`, under its lock.
    private let published: Mutex<PublishedMetrics>
    private let clock: @Sendable () -> ContinuousClock.Instant

    /// - Parameters:
    ///   - factory: the backend; the process' bootstrapped one by default.
    ///   - clock: the time pending checkpoints are aged by (a parameter for tests).
    public init(
        factory: any MetricsFactory = MetricsSystem.factory,
        clock: @escaping @Sendable () -> ContinuousClock.Instant = { ContinuousClock.now }
    ) {
        self.factory = factory
        self.clock = clock
        self.published = Mutex(PublishedMetrics())
    }

    // MARK: - Connections

    /// The `transport` label of a connection from its local address.
    static func transport(of channel: any Channel) -> String {
        if case .unixDomainSocket = channel.localAddress { return "unix" }
        return "tcp"
    }

    /// A client connection was admitted; returns what to call when it closes.
    func connectionOpened(transport: String) -> @Sendable () -> Void {
        let dimensions = [("transport", transport), ("tls", "false")]
        let open = Meter(label: "tidemark_connections", dimensions: dimensions, factory: factory)
        open.increment()
        Counter(label: "tidemark_connections_total", dimensions: dimensions, factory: factory).increment()
        return { open.decrement() }
    }

    /// A handshake ended without a session (see ``HandshakeFailure/metricReason``).
    func handshakeFailed(reason: String) {
        Counter(label: "tidemark_handshake_failures_total", dimensions: [("reason", reason)], factory: factory).increment()
    }

    // MARK: - Requests

    /// Adds a connection's tally for `export` (called on its event loop).
    func fold(_ tally: RequestTally, export: String) {
        folded.withLock { tallies in tallies[export, default: RequestTally()].add(tally) }
    }

    /// Takes everything folded in so far (publication, and tests).
    public func drainFolded() -> [String: RequestTally] {
        folded.withLock { tallies in
            defer { tallies = [:] }
            return tallies
        }
    }

    // MARK: - Scrape

    /// Publishes folded request tallies and samples exports' state; call before rendering.
    public func collect(registry: ExportRegistry) {
        let tallies = drainFolded()
        let now = clock()
        published.withLock { published in
            for (export, tally) in tallies { published.publish(tally, export: export, factory: factory) }
            published.sample(registry.all, now: now, factory: factory)
            published.publishIdlePolls(caught: idlePolls.caught, expired: idlePolls.expired, factory: factory)
        }
    }

    /// Run every second or so by the metrics endpoint, off the data path: publishes what
    /// connections folded in, so a scrape never replays more than a second of requests
    /// into the histograms (after a day without scrapes it would replay a day's), and
    /// notes when checkpoints became pending, so their age does not depend on the scrape
    /// interval.
    public func tick(registry: ExportRegistry) {
        let tallies = drainFolded()
        let now = clock()
        published.withLock { published in
            for (export, tally) in tallies { published.publish(tally, export: export, factory: factory) }
            published.notePending(registry.all, now: now)
        }
    }
}
