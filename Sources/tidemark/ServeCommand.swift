import ArgumentParser
import BlockStorage
import CLinuxIO
import DirtyTracking
import Dispatch
import Logging
import NIOCore
import NIOPosix
import QMPWire
import TidemarkControl
import TidemarkMetrics
import TidemarkServer
import TidemarkService
import TidemarkTLS

#if canImport(Glibc)
import Glibc
#endif

/// `tidemark serve`: export images over NBD until SIGINT/SIGTERM.
struct ServeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Serve disk images over NBD.",
        discussion: """
            With no IMAGE and no --export, serves ./tidemark-data/disk.img (created as a sparse \
            1 GiB file if missing) as export 'disk' on 127.0.0.1:10809. With --unix alone it \
            listens only on that Unix socket. Under systemd socket activation (LISTEN_FDS) it \
            serves the inherited socket instead.

            Persistent bitmaps of a regular file live beside it in IMAGE.tidemark/; those of a \
            block device live in the state directory (--state-dir, default /var/lib/tidemark), \
            in a store named after the disk's identity (WWID, serial, LVM/MD UUID, or a loop \
            device's backing file), never under /dev. A device whose identity is not the one \
            last served at its path is refused.
            """
    )

    static let defaultImagePath = "tidemark-data/disk.img"
    static let defaultImageSize: UInt64 = 1 << 30
    static let defaultControlPath = "tidemark-data/control.sock"

    /// True when neither IMAGE nor --export was given.
    private var usesDefaultImage: Bool { image == nil && exports.isEmpty && !empty && liveRestore == nil }

    // `tidemark restore --live SOURCE TARGET` runs as `serve` with these (LiveRestoreArguments).
    @Option(name: .customLong("live-restore"), help: .hidden)
    var liveRestore: String?
    @Option(name: .customLong("live-restore-target"), help: .hidden)
    var liveRestoreTarget: String?
    @Option(name: .customLong("rate"), help: .hidden)
    var liveRestoreRate: String?
    @Flag(name: .customLong("progress"), help: .hidden)
    var showProgress = false

    @Argument(help: "Raw image file or block device to serve.")
    var image: String?

    @Option(help: "Export name for IMAGE.")
    var name: String = "disk"

    @Flag(help: "Serve IMAGE read-only.")
    var readOnly = false

    @Option(name: .customLong("export"), help: ArgumentHelp(
                "Add an export (repeatable). PATH may be backup:DIR[@POINT][:rw]: a point of a backup chain (index, checkpoint or file name; the newest by default), read-only, or with :rw writable through an overlay beside the chain.",
                valueName: "NAME=PATH[:ro]"))
    var exports: [String] = []

    @Option(
        name: .customLong("bitmap"),
        help: ArgumentHelp(
            "Create (or load) a persistent, recording bitmap on the first export (repeatable).",
            valueName: "NAME[:GRANULARITY]"))
    var bitmaps: [String] = []

    @Option(
        help: ArgumentHelp(
            "Folder for the bitmap stores of block devices (default /var/lib/tidemark, created 0700) and, when given, of regular files too.",
            valueName: "DIR"))
    var stateDir: String?

    @Option(help: "Human-readable description shown in export lists.")
    var description: String = ""

    @Option(help: "Listen on this Unix socket (alone, unless --bind or --port is given too).")
    var unix: String?

    @Option(help: "TCP address to listen on.")
    var bind: String?

    @Option(help: "TCP port to listen on.")
    var port: Int?

    @Flag(help: "Start with no export at all; add them with block-export-add over --control.")
    var empty = false

    @Option(help: "QMP management socket (default with the default image: ./tidemark-data/control.sock).")
    var control: String?

    @Option(help: "Seconds a checkpoint whose client disconnected stays pending before it is aborted.")
    var checkpointTimeout: Int = 60

    @Option(help: "Most client connections at once.")
    var maxConnections: Int = 1024

    @Option(help: "Seconds a client may take to choose an export.")
    var handshakeTimeout: Int = 10

    @Option(
        help: ArgumentHelp(
            "Seconds a partly received request may go without new bytes before its connection is closed.",
            valueName: "SECONDS"))
    var requestTimeout: Double = 30

    @Option(
        help: ArgumentHelp(
            "MiB all connections together may hold for partly received WRITE requests (default: 256, or 1/8 of RAM if less).",
            valueName: "MIB"))
    var payloadBudget: Int?

    @Option(
        help: ArgumentHelp(
            "Longest time an event loop busy-polls idle connections for their next request before it sleeps, as QEMU's iothread poll-max-ns; the window adapts below it. 0 never polls.",
            valueName: "NANOSECONDS"))
    var pollMaxNs: UInt64 = ServerConfiguration.defaultPollMaximumNanoseconds

    @Option(help: "Event loop threads (default: one per core).")
    var eventLoops: Int?

    @Option(help: "Threads for cache misses, syncs and allocation changes.")
    var ioThreads: Int = 4

    @Flag(
        help: ArgumentHelp(
            "Refuse structured replies, as a server that predates them (nbdkit --no-sr).",
            discussion: "Clients fall back to simple replies; block status and dirty bitmaps are then unavailable."))
    var noStructuredReplies = false

    @Flag(
        help: ArgumentHelp(
            "Refuse NBD extended headers, as a server that predates them (qemu-nbd before 8.2).",
            discussion: "qemu 8.2+ and libnbd 1.18+ then fall back to compact 28-byte requests and 32-bit lengths."))
    var noExtendedHeaders = false

    @Option(
        help: ArgumentHelp(
            "Serve Prometheus metrics at http://ADDR:PORT/metrics (port 0: any free port, logged at start).",
            valueName: "ADDR:PORT"))
    var metrics: String?

    @Option(
        help: ArgumentHelp(
            "TLS: off, on (offered; plaintext clients still served) or require.",
            discussion: "on and require need --tls-certificates or --tls-psk."))
    var tls: TLSMode = .off

    @Option(
        help: ArgumentHelp(
            "X.509 credentials: DIR holds ca-cert.pem, server-cert.pem, server-key.pem and optionally ca-crl.pem, signed by that CA (the qemu-nbd/nbdkit layout; `tidemark tls init DIR` makes them). Reloaded on SIGHUP.",
            valueName: "DIR"))
    var tlsCertificates: String?

    @Option(
        help: ArgumentHelp(
            "Pre-shared keys: FILE holds psktool's identity:hexkey lines (TLS 1.2). Reloaded on SIGHUP.",
            valueName: "FILE"))
    var tlsPsk: String?

    @Flag(help: "Clients must present a certificate signed by ca-cert.pem (mutual TLS).")
    var tlsVerifyPeer = false

    @Option(
        help: ArgumentHelp(
            "Allow only this client (repeatable): a certificate subject as qemu's --tls-authz lists it ('CN=client,O=Example') or a PSK identity.",
            valueName: "NAME"))
    var tlsAllow: [String] = []

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: String = "info"

    @Option(
        help: ArgumentHelp(
            "Log line format on stderr: text, or json (one object per line).",
            discussion: "JSON lines carry time (RFC 3339, UTC, microseconds), level, event, message and fields such as export, connection and peer."))
    var logFormat: LogFormat = .text

    func validate() throws {
        if let port, !(0...65535).contains(port) { throw ValidationError("--port must be between 0 and 65535") }
        if maxConnections < 1 { throw ValidationError("--max-connections must be at least 1") }
        if handshakeTimeout < 1 { throw ValidationError("--handshake-timeout must be at least 1 second") }
        if !(requestTimeout >= 0.1 && requestTimeout <= 86_400) {
            throw ValidationError("--request-timeout must be between 0.1 and 86400 seconds")
        }
        if pollMaxNs > 1_000_000 {
            throw ValidationError("--poll-max-ns must be at most 1000000 (1 ms); 0 turns polling off")
        }
        if let payloadBudget, !(32...(1 << 20)).contains(payloadBudget) {
            throw ValidationError("--payload-budget must be between 32 and 1048576 MiB (a 32 MiB WRITE must fit)")
        }
        if empty && (image != nil || !exports.isEmpty) {
            throw ValidationError("--empty cannot be combined with IMAGE or --export")
        }
        if empty && control == nil { throw ValidationError("--empty needs --control to add exports later") }
        if liveRestore != nil {
            guard liveRestoreTarget != nil else { throw ValidationError("a live restore needs a TARGET") }
            guard image == nil && !empty else { throw ValidationError("restore --live serves its TARGET; give no IMAGE or --empty") }
            if let liveRestoreRate, LiveRestoreArguments.parseRate(liveRestoreRate) == nil {
                throw ValidationError("--rate needs bytes per second, e.g. 200M or 1G (got '\(liveRestoreRate)')")
            }
        }
        if checkpointTimeout < 0 { throw ValidationError("--checkpoint-timeout cannot be negative") }
        if stateDir?.isEmpty == true { throw ValidationError("--state-dir needs a folder") }
        guard Logger.Level(rawValue: logLevel) != nil else { throw ValidationError("unknown --log-level '\(logLevel)'") }
        for spec in exports {
            let parsed = try ExportSpecification(parsing: spec)
            if ChainExportSpecification.isChain(parsed.path) {
                do { _ = try ChainExportSpecification(parsing: parsed.path) } catch { throw ValidationError("\(error)") }
            }
        }
        for spec in bitmaps { _ = try BitmapSpecification(parsing: spec) }
        if let metrics { _ = try MetricsListener(parsing: metrics) }
        do {
            try tlsSettings.validate()
        } catch {
            throw ValidationError("\(error)")
        }
    }

    private var tlsSettings: TLSServerSettings {
        TLSServerSettings(
            mode: tls, certificatesDirectory: tlsCertificates, pskFile: tlsPsk, verifyPeer: tlsVerifyPeer,
            allowedNames: tlsAllow)
    }

    func run() async throws {
        // Read replies of up to 32 MiB are allocated per request; keep them off mmap so
        // each does not page-fault its memory in afresh (in a 3-round A/B: +7% on 1 MiB reads, within noise elsewhere).
        clinuxio_keep_large_allocations(40 << 20)
        let level = Logger.Level(rawValue: logLevel) ?? .info
        let output = LogOutput.standardError
        let journalValue = getenv("JOURNAL_STREAM").map { String(cString: $0) }
        let encoder = LogRecordEncoder(
            format: logFormat, journalPrefixes: logFormat == .text && output.isJournalStream(environmentValue: journalValue))
        LoggingSystem.bootstrap { label in
            LogLineHandler(label: label, level: level, encoder: encoder, output: output)
        }
        let logger = Logger(label: "tidemark")
        // First of all, so a SIGINT or SIGTERM during a long start (bitmap stores being
        // loaded) stops the server cleanly once it is up rather than killing it midway.
        let shutdown = ShutdownTrigger(signals: [SIGINT, SIGTERM])
        // Before anything is opened: the connection cap is computed from it at start.
        let descriptors = DescriptorLimit.raiseSoftLimit()
        let notifications = ServiceNotifications.fromEnvironment(logger: logger)

        let registry = ExportRegistry()
        for export in try makeExports(logger: logger) {
            try registry.add(export)
        }
        var credentials: TLSServerCredentials?
        if tls != .off {
            do {
                let loaded = try TLSServerCredentials(settings: tlsSettings, logger: logger)
                logger.info("TLS \(tls.rawValue): \(loaded.summary)", metadata: ["event": "tls.loaded"])
                credentials = loaded
            } catch {
                throw ValidationError("\(error)")
            }
        }
        let reloader = credentials.map { CredentialReloader(credentials: $0, logger: logger) }
        let activation = SocketActivation.fromEnvironment()
        if descriptors.soft > descriptors.originalSoft {
            logger.debug("descriptor limit raised from \(descriptors.originalSoft) to \(descriptors.soft)")
        }
        let configuration = ServerConfiguration(
            listeners: activation?.listeners ?? listeners(),
            maximumConnections: maxConnections,
            handshakeTimeout: .seconds(Int64(handshakeTimeout)),
            eventLoopCount: eventLoops ?? System.coreCount,
            ioThreadCount: max(1, ioThreads),
            offersStructuredReplies: !noStructuredReplies,
            offersExtendedHeaders: !noExtendedHeaders,
            payloadBudget: payloadBudget.map { $0 << 20 } ?? PayloadBudget.defaultLimit,
            requestTimeout: .nanoseconds(Int64(requestTimeout * 1_000_000_000)),
            tls: credentials,
            pollMaximumNanoseconds: pollMaxNs
        )
        let metricsListener = try metrics.map { try MetricsListener(parsing: $0) }
        let serverMetrics = metricsListener.map { _ in MetricsListener.bootstrap() }
        let server = NBDServer(configuration: configuration, registry: registry, metrics: serverMetrics?.0, logger: logger)
        let bound = try await server.start()
        let controlGroup = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let controlPlane = ControlPlane(
            registry: registry, logger: logger, checkpointTimeout: .seconds(Int64(checkpointTimeout)),
            timerLoop: controlGroup.next(), stateDirectory: stateDir, onQuit: { shutdown.trigger("quit command") })
        var controlServer: ControlServer?
        if let controlPath = control ?? (usesDefaultImage ? Self.defaultControlPath : nil) {
            controlServer = try await ControlServer.start(
                path: controlPath, control: controlPlane, group: controlGroup, logger: logger)
            logger.info("control socket at \(controlPath)", metadata: ["event": "control.listening", "path": "\(controlPath)"])
        }
        var metricsEndpoint: MetricsEndpoint?
        if let metricsListener, let (metrics, prometheus) = serverMetrics {
            let (endpoint, port) = try await metricsListener.start(registry: prometheus, metrics: metrics, exports: registry)
            metricsEndpoint = endpoint
            let shownHost = metricsListener.host.contains(":") ? "[\(metricsListener.host)]" : metricsListener.host
            logger.info("metrics at http://\(shownHost):\(port)/metrics")
        }
        let defaultName = registry.all.first?.name ?? ""
        for listener in bound {
            let line = "listening on \(listener.uri(exportName: defaultName))"
            if activation == nil {
                print(line)
            } else {
                logger.info("\(line)", metadata: ["event": "server.listening"])
            }
        }
        fflush(nil)
        // READY=1 only now: every listener is bound and the `listening on` lines are out.
        let exportCount = registry.all.count
        let firstURI = bound.first?.uri(exportName: defaultName) ?? "no listener"
        notifications.ready(status: Self.status(exports: exportCount, uri: firstURI, connections: 0))
        let reporter = Task {
            await notifications.keepReporting {
                Self.status(exports: registry.all.count, uri: firstURI, connections: server.connectionCount)
            }
        }
        let reason = await shutdown.wait()
        logger.info("stopping (\(reason)); finishing in-flight requests", metadata: ["event": "server.stopping"])
        notifications.stopping(status: "stopping (\(reason)): finishing in-flight requests")
        await controlServer?.close()
        await server.shutdown()
        await metricsEndpoint?.stop()
        await controlPlane.shutdown()
        try? await controlGroup.shutdownGracefully()
        reporter.cancel()
        reloader?.stop()
        logger.info("stopped", metadata: ["event": "server.stopped"])
    }

    /// The `STATUS=` line `systemctl status` shows.
    private static func status(exports: Int, uri: String, connections: Int) -> String {
        "serving \(exports) export\(exports == 1 ? "" : "s") on \(uri); \(connections) connection\(connections == 1 ? "" : "s")"
    }

    private func listeners() -> [ServerConfiguration.Listener] {
        var result: [ServerConfiguration.Listener] = []
        if let unix { result.append(.unix(path: unix)) }
        if unix == nil || bind != nil || port != nil {
            result.append(.tcp(host: bind ?? "127.0.0.1", port: port ?? 10809))
        }
        return result
    }

    private func makeExports(logger: Logger) throws -> [Export] {
        let requestedBitmaps = try bitmaps.map { try BitmapSpecification(parsing: $0) }
        var specifications = try exports.map { try ExportSpecification(parsing: $0) }
        if empty { return [] }
        var restored: [Export] = []
        if let liveRestore, let liveRestoreTarget {
            let source = try ChainExportSpecification(parsing: ChainExportSpecification.prefix + liveRestore)
            let (export, copier) = try ExportOpener.openLiveRestore(
                name: name, source: source, target: liveRestoreTarget,
                bytesPerSecond: liveRestoreRate.flatMap(LiveRestoreArguments.parseRate), showProgress: showProgress,
                bitmaps: requestedBitmaps.map { .init(name: $0.name, granularity: $0.granularity) },
                stateDirectory: stateDir, logger: logger)
            copier.start()
            restored.append(export)
            if specifications.isEmpty { return restored }
        }
        if let image {
            specifications.insert(ExportSpecification(name: name, path: image, readOnly: readOnly), at: 0)
        } else if specifications.isEmpty {
            try createDefaultImage()
            specifications = [ExportSpecification(name: name, path: Self.defaultImagePath, readOnly: readOnly)]
        }
        return try restored + specifications.enumerated().map { index, specification in
            if ChainExportSpecification.isChain(specification.path) {
                return try ExportOpener.openChain(
                    name: specification.name,
                    specification: ChainExportSpecification(parsing: specification.path), description: description,
                    bitmaps: index == 0 && restored.isEmpty ? requestedBitmaps.map { .init(name: $0.name, granularity: $0.granularity) } : [],
                    stateDirectory: stateDir, logger: logger)
            }
            return try ExportOpener.open(
                name: specification.name, path: specification.path, readOnly: specification.readOnly,
                description: description,
                bitmaps: index == 0 && restored.isEmpty ? requestedBitmaps.map { .init(name: $0.name, granularity: $0.granularity) } : [],
                stateDirectory: stateDir, logger: logger)
        }
    }

    private func createDefaultImage() throws {
        if mkdir("tidemark-data", 0o755) != 0 && errno != EEXIST {
            throw ValidationError("cannot create ./tidemark-data: \(String(cString: strerror(errno)))")
        }
        try RawImage.createSparseFileIfMissing(path: Self.defaultImagePath, size: Self.defaultImageSize)
    }
}

/// One `--export NAME=PATH[:ro]` argument.
struct ExportSpecification: Equatable {
    var name: String
    var path: String
    var readOnly: Bool

    init(name: String, path: String, readOnly: Bool) {
        self.name = name
        self.path = path
        self.readOnly = readOnly
    }

    init(parsing text: String) throws {
        guard let equals = text.firstIndex(of: "=") else {
            throw ValidationError("--export needs NAME=PATH[:ro], got '\(text)'")
        }
        name = String(text[..<equals])
        var rest = String(text[text.index(after: equals)...])
        readOnly = false
        if rest.hasSuffix(":ro") {
            readOnly = true
            rest.removeLast(3)
        }
        path = rest
        guard !name.isEmpty, !path.isEmpty else {
            throw ValidationError("--export needs a non-empty NAME and PATH, got '\(text)'")
        }
        guard name.utf8.count <= 4096 else { throw ValidationError("export names are limited to 4096 bytes") }
    }
}
