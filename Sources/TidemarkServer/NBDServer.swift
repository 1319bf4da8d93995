import BlockStorage
import DirtyTracking
import Logging
import NIOCore
import NIOPosix
import Synchronization

/// A running NBD server: its listeners, its connections and the threads behind them.
///
/// The data path lives in `NBDConnectionHandler`; this type only binds sockets, enforces
/// the connection limit and coordinates a graceful stop.
public final class NBDServer: Sendable {
    /// A socket the server listens on, with an address a client can paste.
    public struct BoundListener: Sendable {
        public let listener: ServerConfiguration.Listener
        /// The TCP port actually bound (useful when port 0 was asked for).
        public let port: Int?

        /// A libnbd/qemu URI for `exportName` on this listener.
        public func uri(exportName: String) -> String {
            switch listener {
            case .tcp(let host, _):
                let shownHost = host.contains(":") ? "[\(host)]" : host
                return "nbd://\(shownHost):\(port ?? 10809)/\(exportName)"
            case .unix(let path):
                return "nbd+unix:///\(exportName)?socket=\(path)"
            case .inherited(let descriptor):
                return "inherited socket fd \(descriptor)"
            }
        }
    }

    public let configuration: ServerConfiguration
    public let registry: ExportRegistry
    private let logger: Logger
    private let group: MultiThreadedEventLoopGroup
    private let pool: NIOThreadPool
    /// Each event loop's ``IdlePoller``, by loop; empty when `--poll-max-ns` is 0.
    private let pollers: [ObjectIdentifier: NIOLoopBoundBox<IdlePoller>]
    private let serverChannels = Mutex<[any Channel]>([])
    private let connections = Mutex<[ObjectIdentifier: any Channel]>([:])
    private let bitmapSaver = Mutex<RepeatedTask?>(nil)
    /// The connection cap in force: `configuration.maximumConnections`, lowered at start
    /// to what fits in the descriptor limit (see ``DescriptorLimit``).
    private let connectionCap: Atomic<Int>
    /// Shared by every connection: bytes of partly received WRITE requests.
    public let payloadBudget: PayloadBudget
    /// Metrics of connections and requests; nil (and no cost) without `--metrics`.
    public let metrics: ServerMetrics?
    /// Refusals over the connection cap since the last warning, and when that was.
    private let refusals = Mutex<(count: Int, lastWarning: ContinuousClock.Instant?)>((0, nil))
    /// At most one "connection limit reached" warning in this interval.
    static let refusalWarningInterval: Duration = .seconds(10)
    /// The channel's write buffer water marks: above `high` a connection decodes no new
    /// request (and QMP drops a client that reads no events) until it is below `low`.
    public static let writeBufferWaterMark = ChannelOptions.Types.WriteBufferWaterMark(low: 1 << 20, high: 4 << 20)
    /// How often changed bitmap bits are saved (besides FLUSH and shutdown).
    public static let bitmapSaveInterval: TimeAmount = .seconds(30)

    public init(
        configuration: ServerConfiguration, registry: ExportRegistry, metrics: ServerMetrics? = nil, logger: Logger
    ) {
        self.metrics = metrics
        self.configuration = configuration
        self.registry = registry
        self.logger = logger
        self.payloadBudget = PayloadBudget(limit: configuration.payloadBudget)
        self.connectionCap = Atomic(configuration.maximumConnections)
        self.group = MultiThreadedEventLoopGroup(numberOfThreads: max(1, configuration.eventLoopCount))
        self.pool = NIOThreadPool(numberOfThreads: max(1, configuration.ioThreadCount))
        var pollers: [ObjectIdentifier: NIOLoopBoundBox<IdlePoller>] = [:]
        if configuration.pollMaximumNanoseconds > 0 {
            let statistics = metrics?.idlePolls ?? IdlePollStatistics()
            for loop in group.makeIterator() {
                pollers[ObjectIdentifier(loop)] = NIOLoopBoundBox.makeBoxSendingValue(
                    IdlePoller(
                        maximumNanoseconds: configuration.pollMaximumNanoseconds, eventLoop: loop,
                        statistics: statistics),
                    eventLoop: loop)
            }
        }
        self.pollers = pollers
    }

    /// The most client connections served at once.
    public var maximumConnections: Int { connectionCap.load(ordering: .relaxed) }

    /// Number of client connections open now.
    public var connectionCount: Int { connections.withLock { $0.count } }

    /// Binds every listener and starts accepting clients.
    public func start() async throws -> [BoundListener] {
        pool.start()
        var bound: [BoundListener] = []
        for listener in configuration.listeners {
            let channel: any Channel
            do {
                channel = try await bind(listener)
            } catch {
                throw ServerError.bindFailed(address: "\(listener)", reason: "\(error)")
            }
            serverChannels.withLock { $0.append(channel) }
            bound.append(BoundListener(listener: listener, port: channel.localAddress?.port))
        }
        capConnectionsToDescriptors()
        let registry = self.registry
        let pool = self.pool
        let logger = self.logger
        // Exports whose last periodic save failed: a failure is logged once, as an error,
        // and the first success after it as info, instead of an error every interval.
        let failing = Mutex<Set<String>>([])
        let task = group.next().scheduleRepeatedTask(
            initialDelay: Self.bitmapSaveInterval, delay: Self.bitmapSaveInterval
        ) { _ in
            pool.submit { _ in
                for export in registry.all where export.openViews != nil {
                    do {
                        try export.tracker.saveIfNeeded()
                        if failing.withLock({ $0.remove(export.name) != nil }) {
                            logger.info("saving bitmaps of export '\(export.name)' works again")
                        }
                    } catch {
                        if failing.withLock({ $0.insert(export.name).inserted }) {
                            logger.error(
                                "saving bitmaps of export '\(export.name)' failed: \(error); the journal keeps them crash-safe, saves are retried quietly until one succeeds")
                        }
                    }
                }
            }
        }
        bitmapSaver.withLock { $0 = task }
        return bound
    }

    /// Lowers the connection cap to what the descriptor limit leaves once the exports,
    /// event loops and listeners are open, keeping ``DescriptorLimit/reserve`` spare.
    private func capConnectionsToDescriptors() {
        let limit = DescriptorLimit.current()
        let requested = configuration.maximumConnections
        let cap = limit.connectionCap(requested: requested, openNow: DescriptorLimit.openCount())
        connectionCap.store(cap, ordering: .relaxed)
        if cap < requested {
            logger.warning(
                "descriptor limit \(limit.soft) (hard \(limit.hard)) leaves room for \(cap) connections: capping connections at \(cap) instead of \(requested) (raise the limit, e.g. LimitNOFILE=, to allow more)")
        }
    }

    private func bind(_ listener: ServerConfiguration.Listener) async throws -> any Channel {
        let bootstrap = makeBootstrap()
        switch listener {
        case .tcp(let host, let port):
            return try await bootstrap.bind(host: host, port: port).get()
        case .unix(let path):
            return try await bootstrap.bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true).get()
        case .inherited(let descriptor):
            return try await bootstrap.withBoundSocket(descriptor).get()
        }
    }

    private func makeBootstrap() -> ServerBootstrap {
        let registry = self.registry
        let pool = self.pool
        let logger = self.logger
        let timeout = configuration.handshakeTimeout
        let offersStructuredReplies = configuration.offersStructuredReplies
        let offersExtendedHeaders = configuration.offersExtendedHeaders
        let tls = configuration.tls
        let requestTimeout = configuration.requestTimeout
        let budget = payloadBudget
        let waterMark = Self.writeBufferWaterMark
        let metrics = self.metrics
        let pollers = self.pollers
        return ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 256)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(
                .recvAllocator,
                value: AdaptiveRecvByteBufferAllocator(minimum: 4096, initial: 64 * 1024, maximum: 2 << 20))
            .childChannelOption(.maxMessagesPerRead, value: 8)
            .childChannelOption(.writeBufferWaterMark, value: waterMark)
            // libnbd shuts its sending side right after NBD_CMD_DISC and reads on: the replies
            // to what it sent before must still go out (NBDConnectionHandler, inputClosed).
            .childChannelOption(.allowRemoteHalfClosure, value: true)
            // A 1 MiB reply goes out in one or two writes instead of many EPOLLOUT rounds
            // (3-round fio A/B: +10% on 1 MiB sequential reads).
            .childChannelOption(.socketOption(.so_sndbuf), value: 4 << 20)
            .childChannelInitializer { [weak self] channel in
                var logger = logger
                if let peer = ConnectionAccountingHandler.peerDescription(channel.remoteAddress) {
                    logger[metadataKey: "peer"] = .string(peer)
                }
                guard let self, self.admit(channel, logger: logger) else {
                    return channel.close()
                }
                logger[metadataKey: "connection"] = .stringConvertible(ConnectionIdentifier.next())
                return channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(ConnectionAccountingHandler(logger: logger, kind: "NBD"))
                    try channel.pipeline.syncOperations.addHandler(
                        NBDConnectionHandler(
                            registry: registry, pool: pool, handshakeTimeout: timeout,
                            offersStructuredReplies: offersStructuredReplies, offersExtendedHeaders: offersExtendedHeaders,
                            requestTimeout: requestTimeout,
                            budget: budget, outputLimit: waterMark.high, metrics: metrics, tls: tls,
                            poller: pollers[ObjectIdentifier(channel.eventLoop)]?.value, logger: logger))
                }
            }
    }

    /// Registers a new connection unless the limit is reached.
    private func admit(_ channel: any Channel, logger: Logger) -> Bool {
        let id = ObjectIdentifier(channel)
        let admitted = connections.withLock { open in
            guard open.count < connectionCap.load(ordering: .relaxed) else { return false }
            open[id] = channel
            return true
        }
        guard admitted else {
            warnRefused()
            return false
        }
        let closed = metrics?.connectionOpened(transport: ServerMetrics.transport(of: channel))
        channel.closeFuture.whenComplete { [weak self] _ in
            _ = self?.connections.withLock { $0.removeValue(forKey: id) }
            closed?()
        }
        return true
    }

    /// Logs a refusal over the cap, at most once per ``refusalWarningInterval``, with the
    /// number refused since the last warning: a client storm must not flood the log.
    private func warnRefused() {
        let now = ContinuousClock.now
        let refused: Int? = refusals.withLock { state in
            state.count += 1
            if let last = state.lastWarning, now - last < Self.refusalWarningInterval { return nil }
            defer { state = (0, now) }
            return state.count
        }
        guard let refused else { return }
        logger.warning(
            "connection refused: connection limit of \(maximumConnections) reached; refused \(refused) client(s) (closed at once; raise --max-connections or the descriptor limit)",
            metadata: [
                "event": "connection.refused",
                "reason": "connection limit of \(maximumConnections) reached",
                "refused": "\(refused)",
            ])
    }

    /// Stops gracefully: no new clients, in-flight requests finish, images are flushed.
    /// - Parameter deadline: connections still open after this long are closed anyway.
    public func shutdown(deadline: TimeAmount = .seconds(30)) async {
        let listeners = serverChannels.withLock { channels in
            defer { channels = [] }
            return channels
        }
        for channel in listeners {
            try? await channel.close().get()
        }
        let open = connections.withLock { Array($0.values) }
        for channel in open {
            channel.pipeline.fireUserInboundEventTriggered(ConnectionShouldQuiesceEvent())
        }
        let start = ContinuousClock.now
        let limit = Duration.nanoseconds(deadline.nanoseconds)
        while connectionCount > 0 && ContinuousClock.now - start < limit {
            try? await Task.sleep(for: .milliseconds(20))
        }
        for channel in connections.withLock({ Array($0.values) }) {
            try? await channel.close().get()
        }
        bitmapSaver.withLock { task in
            task?.cancel()
            task = nil
        }
        // Views end with the server (their checkpoints stay pending); then live exports
        // are flushed and their bitmaps saved.
        for export in registry.all { registry.closeAllViews(of: export) }
        for export in registry.all {
            do {
                if !export.isReadOnly { try export.flushImage() }
                try export.tracker.save(cleanShutdown: true)
            } catch {
                logger.error("flushing export '\(export.name)' failed: \(error)")
            }
        }
        try? await pool.shutdownGracefully()
        try? await group.shutdownGracefully()
    }
}
