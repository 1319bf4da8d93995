import CLinuxIO
import Logging
import NBDProtocol
import NIOCore
import NIOPosix
import NIOTLS
import TidemarkTLS

/// Asks a connection to wind down: finish what is in flight, then close.
public struct ConnectionShouldQuiesceEvent: Sendable {
    public init() {}
}

/// One client connection's I/O: it feeds received bytes to ``NBDServerConnection`` and
/// carries out the actions it returns. It keeps only what touches NIO — the receive
/// buffer and its top-up, the burst's outgoing buffer and its flush, the payload budget,
/// timers, completions from the I/O pool, and telling the loop's ``IdlePoller`` when the
/// connection has answered everything. Every protocol decision, including when a
/// disconnect or a stop may close, is the machine's.
final class NBDConnectionHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    /// WRITE requests up to this size are buffered without asking the ``PayloadBudget``:
    /// the per-connection allowance, and the 4 KiB path never touches the shared counter.
    static let unbudgetedRequestSize = 256 << 10
    /// How soon a connection refused budget asks again.
    static let budgetRetryInterval: TimeAmount = .milliseconds(50)

    private let registry: ExportRegistry
    private let pool: NIOThreadPool
    private let handshakeTimeout: TimeAmount
    private let requestTimeout: TimeAmount
    private let budget: PayloadBudget
    /// Reply bytes waiting in `outbox` or being read on the pool at which no new request
    /// is decoded (the channel's own high water mark covers the bytes handed to it).
    private let outputLimit: Int
    private var logger: Logger

    private let connection: NBDServerConnection
    /// Runs the commands of the chosen export; set on entering transmission.
    private var executor: CommandExecutor?
    private var received: ByteBuffer?
    /// Replies produced during this read burst, written to the socket in one go. Empty
    /// (no storage of its own) between bursts; ``prepareOutbox(context:)`` gives it one.
    private var outbox = ByteBuffer()
    /// How much a burst's reply buffer holds before it must grow.
    static let outboxCapacity = 64 * 1024
    private var handshakeDeadline: Scheduled<Void>?
    /// The channel is being closed (by this handler or the peer): nothing more is sent.
    private var channelClosing = false
    private var flushPending = false
    private var flushScheduled = false
    private var readPending = false
    /// Bytes of READ replies being produced on the I/O pool.
    private var offloadedReadBytes = 0
    /// The channel's writability as last announced (`channelWritabilityChanged`), so the
    /// per-request check is a field read rather than a call through the channel.
    private var channelWritable = true
    /// What the request at the front of `received` holds of the payload budget.
    private var chargedBytes = 0
    /// The front request needs budget that was not available: reading waits for it.
    private var awaitingBudget = false
    private var budgetRetry: Scheduled<Void>?
    /// When bytes last arrived while a request was partly received.
    private var lastInput = NIODeadline.now()
    private var stallTimer: Scheduled<Void>?
    /// Server-wide metrics (`--metrics`), and this connection's request accounting once
    /// it is in transmission; both nil without `--metrics`.
    private let serverMetrics: ServerMetrics?
    private var requestMetrics: ConnectionMetrics?
    /// TLS credentials (`serve --tls on|require`); the TLS handler joins the pipeline only
    /// when the client sends STARTTLS.
    private let tls: TLSServerCredentials?
    /// STARTTLS was acknowledged and the TLS handshake is running.
    private var awaitingTLS = false
    /// The client shut its sending side (the channel allows half-closure): what it sent
    /// is still served and answered, then the connection closes.
    private var clientInputEnded = false
    /// TLS is in the pipeline: replies are handed to it in flushes of at most
    /// `tlsFlushUnit` bytes (see ``send(_:context:)``).
    private var encrypting = false
    /// Plaintext written to the TLS handler since the last flush.
    private var unflushedTLSBytes = 0
    /// Replies (or what is left of one) waiting, in order, for the channel to take more
    /// under TLS. The channel's writability stops only new requests; a 32 MiB reply
    /// already produced would otherwise be encrypted whole into the channel's queue.
    private var tlsBacklog = CircularBuffer<ByteBuffer>(initialCapacity: 4)
    /// The backlog is being written: a flush inside it can announce the channel
    /// unwritable, and nothing may be written between two slices of one reply.
    private var sendingSlices = false
    /// The most plaintext one flush hands to TLS. swift-nio-ssl encrypts all of a flush's
    /// writes into one ciphertext buffer and keeps that buffer's capacity for the life of
    /// the connection, and the channel's writability cannot see plaintext queued in front of
    /// it until the flush. Unbounded, a burst of 1 MiB reads at QD8 held 32 MiB of
    /// ciphertext buffer per connection (peak RSS 88 MiB for one client).
    static let tlsFlushUnit = 256 * 1024
    /// The event loop's idle poller (`serve --poll-max-ns`), nil when polling is off.
    private let poller: IdlePoller?
    /// The connection's socket while it is one of the poller's; set on entering transmission.
    private var socketDescriptor: CInt?
    /// The poller counts this connection as idle.
    private var pollingIdle = false
    /// Whether this client waits for each reply, learnt from how many requests each
    /// socket read brings (`requestsThisRead`, counted until `channelReadComplete`).
    private var pacing = ClientPacing()
    private var requestsThisRead = 0

    init(
        registry: ExportRegistry, pool: NIOThreadPool, handshakeTimeout: TimeAmount, offersStructuredReplies: Bool,
        offersExtendedHeaders: Bool = true, requestTimeout: TimeAmount, budget: PayloadBudget, outputLimit: Int, metrics: ServerMetrics? = nil,
        tls: TLSServerCredentials? = nil, poller: IdlePoller? = nil, logger: Logger
    ) {
        self.poller = poller
        self.serverMetrics = metrics
        self.tls = tls
        self.connection = NBDServerConnection(
            configuration: .init(
                offersStructuredReplies: offersStructuredReplies, offersExtendedHeaders: offersExtendedHeaders,
                tls: tls?.policy ?? .unavailable))
        self.registry = registry
        self.pool = pool
        self.handshakeTimeout = handshakeTimeout
        self.requestTimeout = requestTimeout
        self.budget = budget
        self.outputLimit = outputLimit
        self.logger = logger
    }

    // MARK: - Lifecycle

    func channelActive(context: ChannelHandlerContext) {
        var greeting = context.channel.allocator.buffer(capacity: 18)
        connection.writeGreeting(into: &greeting)
        context.writeAndFlush(wrapOutboundOut(greeting), promise: nil)
        handshakeDeadline = context.eventLoop.assumeIsolated().scheduleTask(in: handshakeTimeout) { [weak self] in
            guard let self, let reason = self.connection.handshakeDeadlinePassed() else { return }
            self.close(reason, context: context)
        }
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        tearDown()
        channelClosing = true
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if TLSUpgrade.isUncleanShutdown(error) {
            // libnbd closes without a TLS close_notify: an ordinary disconnect.
            logger.debug("client closed its TLS connection without close_notify")
        } else if awaitingTLS {
            logger.warning(
                "TLS handshake failed: \(error)", metadata: ["event": "tls.refused", "reason": "\(error)"])
            serverMetrics?.handshakeFailed(reason: "tls")
        } else {
            logger.debug("connection error: \(error)")
        }
        endConnection(context: context)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case .handshakeCompleted(let negotiated) = event as? TLSUserEvent {
            tlsHandshakeCompleted(protocol: negotiated, context: context)
            return
        }
        if case .inputClosed = event as? ChannelEvent {
            clientInputEnded = true
            guard connection.isInTransmission, !awaitingTLS else {
                endConnection(context: context)
                return
            }
            processReceived(context: context)
            return
        }
        guard event is ConnectionShouldQuiesceEvent else {
            context.fireUserInboundEventTriggered(event)
            return
        }
        if let reason = connection.quiesce() { close(reason, context: context) }
    }

    // MARK: - Inbound bytes

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        // Closing: the client's last replies may still be going out; nothing more is read.
        guard !channelClosing else { return }
        if pollingIdle, let socketDescriptor {
            pollingIdle = false
            poller?.inputArrived(socketDescriptor)
        }
        readBytes(unwrapInboundIn(data), context: context)
        if received != nil || connection.isWithinRequest { notePartialInput(context: context) }
    }

    private func readBytes(_ data: ByteBuffer, context: ChannelHandlerContext) {
        var incoming = data
        guard var pending = received, pending.readableBytes > 0 else {
            received = incoming
            processReceived(context: context)
            return
        }
        received = nil
        if connection.isInTransmission {
            // A request straddles the two reads: top it up with only the bytes it lacks,
            // then decode the rest of `incoming` where it lies instead of copying it all.
            topUp(&pending, from: &incoming, context: context)
            received = pending
            processReceived(context: context)
            guard incoming.readableBytes > 0 else { return }
            if received == nil || received?.readableBytes == 0 {
                received = incoming
                processReceived(context: context)
                return
            }
            // Reading is paused with requests still buffered: keep the rest behind them.
            pending = received ?? ByteBuffer()
            received = nil
        }
        pending.discardReadBytes()
        pending.writeBuffer(&incoming)
        received = pending
        processReceived(context: context)
    }

    /// Moves into `pending` the bytes of `incoming` that complete its first request.
    private func topUp(_ pending: inout ByteBuffer, from incoming: inout ByteBuffer, context: ChannelHandlerContext) {
        while incoming.readableBytes > 0, let missing = connection.bytesMissing(in: pending), missing > 0 {
            var part = incoming.readSlice(length: min(missing, incoming.readableBytes)) ?? ByteBuffer()
            pending.writeBuffer(&part)
            reserveForNextRequest(&pending, context: context)
        }
    }

    /// Gives a partly received WRITE one buffer of its final size now, rather than
    /// growing it through repeated appends. Above ``unbudgetedRequestSize`` the size is
    /// first taken from the shared ``PayloadBudget``; when it does not fit, the buffer
    /// stays as it is and reading waits (``awaitingBudget``) until it does.
    private func reserveForNextRequest(_ buffer: inout ByteBuffer, context: ChannelHandlerContext) {
        awaitingBudget = false
        guard let needed = connection.bytesNeeded(in: buffer), buffer.capacity - buffer.readerIndex < needed else { return }
        if needed > Self.unbudgetedRequestSize && chargedBytes < needed {
            guard budget.tryAcquire(needed - chargedBytes) else {
                waitForBudget(context: context)
                return
            }
            chargedBytes = needed
            awaitingBudget = false
        }
        var grown = context.channel.allocator.buffer(capacity: needed)
        grown.writeBuffer(&buffer)
        buffer = grown
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        pacing.readCompleted(requests: requestsThisRead)
        requestsThisRead = 0
        flushIfNeeded(context: context)
        offerIdlePolling()
        context.fireChannelReadComplete()
    }

    private func processReceived(context: ChannelHandlerContext) {
        defer { if clientInputEnded { endInputIfDecoded(context: context) } }
        guard var buffer = received else { return }
        received = nil
        pump(&buffer, context: context)
        if connection.isClosed { return }
        guard buffer.readableBytes > 0 else { return }
        reserveForNextRequest(&buffer, context: context)
        received = buffer
    }

    /// After the client shut its sending side: once no whole request is left in the
    /// buffer (a partial one never completes), the machine closes when nothing is in flight.
    private func endInputIfDecoded(context: ChannelHandlerContext) {
        guard !channelClosing, !connection.isClosed, !connection.inputHasEnded else { return }
        if let buffer = received, buffer.readableBytes > 0, connection.bytesMissing(in: buffer) == 0 { return }
        received = nil
        if let reason = connection.inputEnded() { close(reason, context: context) }
    }

    /// Steps the connection machine over the buffered bytes until it needs more, holds
    /// the input, or the connection closes, carrying out each action.
    private func pump(_ buffer: inout ByteBuffer, context: ChannelHandlerContext) {
        while !connection.isClosed {
            if connection.isInTransmission, outputIsFull(context: context) { return }
            prepareOutbox(context: context)
            let written = outbox.writerIndex
            let action = connection.next(&buffer, catalog: registry, output: &outbox)
            if outbox.writerIndex != written { flushPending = true }
            switch action {
            case .needMoreData, .pauseReading:
                return
            case .continueNegotiating:
                continue
            case .optionRefused(let refusal):
                var metadata: Logger.Metadata = ["event": "handshake.refused", "reason": "\(refusal)"]
                if let name = refusal.exportName { metadata["export"] = .string(name) }
                logger.warning("handshake refused: \(refusal)", metadata: metadata)
            case .enterTransmission(let session):
                enterTransmission(session, context: context)
            case .execute(let cookie, let command, let cost):
                requestsThisRead += 1
                execute(command, cookie: cookie, cost: cost, context: context)
            case .refused(_, let command, _, let message):
                requestsThisRead += 1
                logger.debug("\(NBDNames.command(command)) refused: \(message)")
                if let metrics = requestMetrics { metrics.refused(rawCommand: command, startedAt: metrics.started()) }
            case .close(let reason):
                close(reason, context: context)
            case .startTLS:
                startTLS(leftover: &buffer, context: context)
                return
            }
        }
    }

    // MARK: - TLS

    /// Sends the plaintext ACK, then puts TLS in front and hands it the bytes the client
    /// sent after STARTTLS.
    private func startTLS(leftover buffer: inout ByteBuffer, context: ChannelHandlerContext) {
        guard let tls else {
            endConnection(context: context)
            return
        }
        flushIfNeeded(context: context)
        let leftover = buffer.readableBytes > 0 ? buffer : nil
        buffer.moveReaderIndex(to: buffer.writerIndex)
        awaitingTLS = true
        do {
            try TLSUpgrade.start(
                credentials: tls, pipeline: context.pipeline.syncOperations, leftover: leftover, logger: logger)
            encrypting = true
        } catch {
            logger.error("cannot start TLS: \(error)", metadata: ["event": "tls.refused", "reason": "\(error)"])
            endConnection(context: context)
        }
    }

    /// The client finished its TLS handshake: check who it is, then negotiate inside TLS.
    private func tlsHandshakeCompleted(protocol negotiated: String?, context: ChannelHandlerContext) {
        guard awaitingTLS, let tls, !connection.isClosed else { return }
        awaitingTLS = false
        switch TLSUpgrade.authorize(credentials: tls, pipeline: context.pipeline.syncOperations) {
        case .refused(let refusal):
            logger.warning(
                "TLS refused: \(refusal)", metadata: ["event": "tls.refused", "reason": "\(refusal)"])
            serverMetrics?.handshakeFailed(reason: "tls")
            endConnection(context: context)
        case .allowed(let identity):
            if let identity { logger[metadataKey: "client"] = .string(identity) }
            logger.debug("TLS established")
            connection.tlsEstablished()
            processReceived(context: context)
            flushIfNeeded(context: context)
        }
    }

    private func enterTransmission(_ session: NBDSession, context: ChannelHandlerContext) {
        handshakeDeadline?.cancel()
        handshakeDeadline = nil
        guard let export = registry.export(named: session.exportName) else {
            logger.warning(
                "handshake refused: export '\(session.exportName)' was removed during the handshake",
                metadata: ["event": "handshake.refused", "reason": "export removed", "export": "\(session.exportName)"])
            endConnection(context: context)
            return
        }
        logger[metadataKey: "export"] = "\(session.exportName)"
        logger.debug(
            "transmission started",
            metadata: ["framing": session.framing == .extended ? "extended headers" : "compact headers"])
        context.triggerUserOutboundEvent(ConnectionExportChosen(exportName: session.exportName), promise: nil)
        executor = CommandExecutor(
            export: export, session: session, allocator: context.channel.allocator, pool: pool,
            eventLoop: context.eventLoop)
        if let serverMetrics {
            requestMetrics = ConnectionMetrics(server: serverMetrics, export: export.name, eventLoop: context.eventLoop)
        }
        if let poller,
            let descriptor = try? context.pipeline.syncOperations.withUnsafeTransportIfAvailable(
                of: NIOBSDSocket.Handle.self, { $0 })
        {
            socketDescriptor = descriptor
            poller.joined(descriptor)
        }
    }

    // MARK: - Requests

    private func execute(_ command: NBDCommand, cookie: UInt64, cost: UInt64, context: ChannelHandlerContext) {
        guard let executor else { return }
        let start = requestMetrics?.started()
        // Where an inline reply will start, for metrics only.
        let replyStart = outbox.writerIndex
        let result = executor.execute(command, cookie: cookie, outbox: &outbox)
        switch result {
        case .written:
            flushPending = true
            if let start { recordInline(command, cost: cost, startedAt: start, replyStart: replyStart) }
            completed(cost: cost, context: context)
        case .reply(let reply):
            send(reply, context: context)
            flushPending = true
            if let start { requestMetrics?.completed(.init(command, cost: cost, at: start), reply: reply) }
            completed(cost: cost, context: context)
        case .pending(let future):
            // Plain values for the completion, not the command (a WRITE holds its payload).
            let measured = start.map { ConnectionMetrics.Started(command, cost: cost, at: $0) }
            var offloaded = 0
            if case .read = command { offloaded = Int(cost) }
            offloadedReadBytes += offloaded
            future.assumeIsolated().whenComplete { [weak self] result in
                guard let self, !self.connection.isClosed else { return }
                let wasAtLimit = self.offloadedReadBytes >= self.outputLimit
                self.offloadedReadBytes -= offloaded
                switch result {
                case .success(let reply):
                    if let measured { self.requestMetrics?.completed(measured, reply: reply) }
                    self.send(reply, context: context)
                    self.flushPending = true
                    self.completed(cost: cost, context: context)
                    if wasAtLimit && self.offloadedReadBytes < self.outputLimit {
                        self.resumeReading(context: context)
                    }
                    self.scheduleFlush(context: context)
                case .failure(let error):
                    // Only a pool that is shutting down fails; the connection cannot go on.
                    self.logger.info("I/O pool unavailable: \(error)")
                    self.endConnection(context: context)
                }
            }
        }
    }

    /// Counts a request whose reply was appended to `outbox` at `replyStart`. Only a READ
    /// can have failed there (an I/O error reply); one whose reply is shorter than its
    /// data is looked at, the others are successes without touching the buffer.
    private func recordInline(_ command: NBDCommand, cost: UInt64, startedAt start: UInt64, replyStart: Int) {
        var failed = false
        if case .read(_, let length, _) = command, outbox.writerIndex - replyStart < Int(length) {
            failed = NBDReplyEncoder.isErrorReply(outbox, at: replyStart)
        }
        requestMetrics?.completed(
            RequestKind(command), bytes: RequestKind.bytes(of: command, cost: cost), startedAt: start, failed: failed)
    }

    /// Tells the machine a reply is queued and does what it says.
    private func completed(cost: UInt64, context: ChannelHandlerContext) {
        switch connection.requestCompleted(cost: cost) {
        case .none:
            break
        case .resumeReading:
            resumeReading(context: context)
        case .close(let reason):
            close(reason, context: context)
        }
    }

    // MARK: - Flow control

    func read(context: ChannelHandlerContext) {
        if isHoldingInput {
            readPending = true
            return
        }
        context.read()
    }

    /// True while the server, not the client, keeps the next request from coming in:
    /// the machine holds it (in flight at the limit, a disconnect, a stop), or the
    /// handler's resources do (no payload budget, replies not yet taken by the client).
    private var isHoldingInput: Bool {
        guard connection.isInTransmission else { return false }
        return connection.isHoldingInput || awaitingBudget || !channelWritable || offloadedReadBytes >= outputLimit
            || !tlsBacklog.isEmpty
    }

    /// True when replies waiting for the client have reached the limit: the channel is
    /// above its high water mark, or the burst's buffer or the pool's reads are at
    /// `outputLimit`. A full burst buffer is handed to the channel first, so that the
    /// channel's writability (and with it the resumption) accounts for it.
    private func outputIsFull(context: ChannelHandlerContext) -> Bool {
        if outbox.readableBytes >= (encrypting ? Self.tlsFlushUnit : outputLimit) {
            flushIfNeeded(context: context)
        }
        return !channelWritable || offloadedReadBytes >= outputLimit || !tlsBacklog.isEmpty
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        channelWritable = context.channel.isWritable
        if channelWritable {
            if !tlsBacklog.isEmpty {
                writeTLSBacklog(context: context)
                context.flush()
                unflushedTLSBytes = 0
            }
            resumeReading(context: context)
        } else {
            // Replies are piling up: push them out now rather than at the end of the tick.
            flushIfNeeded(context: context)
        }
        context.fireChannelWritabilityChanged()
    }

    private func resumeReading(context: ChannelHandlerContext) {
        // Requests already buffered run first; then the socket is read again.
        processReceived(context: context)
        // Their replies must go out even when no read follows (the client may have sent
        // everything and be waiting): resumption comes from writability, the pool or a
        // timer, never from channelReadComplete.
        if flushPending { scheduleFlush(context: context) }
        if readPending, !isHoldingInput {
            readPending = false
            // Waiting on the server is not the client's stall.
            lastInput = .now()
            context.read()
        }
    }

    // MARK: - Input limits

    /// Reading stops until the front request's buffer fits in the payload budget; a
    /// timer asks again (other connections release theirs without telling this one).
    private func waitForBudget(context: ChannelHandlerContext) {
        if !awaitingBudget {
            awaitingBudget = true
            logger.debug("payload budget of \(budget.limit) bytes exhausted; pausing input")
        }
        guard budgetRetry == nil else { return }
        budgetRetry = context.eventLoop.assumeIsolated().scheduleTask(in: Self.budgetRetryInterval) { [weak self] in
            guard let self else { return }
            self.budgetRetry = nil
            guard self.awaitingBudget, !self.connection.isClosed else { return }
            self.awaitingBudget = false
            if var buffer = self.received {
                self.received = nil
                self.reserveForNextRequest(&buffer, context: context)
                self.received = buffer
            }
            if !self.awaitingBudget { self.resumeReading(context: context) }
        }
    }

    /// Bytes arrived and a request is still incomplete: (re)starts the stall clock and
    /// makes sure a timer will look at it.
    private func notePartialInput(context: ChannelHandlerContext) {
        guard connection.isInTransmission, !connection.isClosed else { return }
        lastInput = .now()
        if stallTimer == nil { armStallTimer(at: lastInput + requestTimeout, context: context) }
    }

    private func armStallTimer(at deadline: NIODeadline, context: ChannelHandlerContext) {
        stallTimer = context.eventLoop.assumeIsolated().scheduleTask(deadline: deadline) { [weak self] in
            guard let self else { return }
            self.stallTimer = nil
            self.checkStall(context: context)
        }
    }

    /// Closes the connection when its partly received request has not grown for
    /// `requestTimeout` while the server was ready to read it.
    private func checkStall(context: ChannelHandlerContext) {
        let buffer = received ?? ByteBuffer()
        guard !connection.isClosed, buffer.readableBytes > 0 || connection.isWithinRequest,
            (connection.bytesMissing(in: buffer) ?? 1) > 0
        else { return }
        let now = NIODeadline.now()
        if isHoldingInput { lastInput = now }
        if now - lastInput >= requestTimeout {
            let needed = connection.bytesNeeded(in: buffer).map { " of \($0)" } ?? ""
            logger.warning(
                "closing connection: a request stalled for \(requestTimeout.nanoseconds / 1_000_000) ms with \(buffer.readableBytes)\(needed) bytes received (--request-timeout)")
            endConnection(context: context)
            return
        }
        armStallTimer(at: lastInput + requestTimeout, context: context)
    }

    /// The connection is over (closing, or closed by the peer): the machine takes no more
    /// input, the socket leaves the poller, buffered requests are dropped, the timers stop,
    /// the payload budget goes back and the metrics take their last fold. Safe to repeat.
    private func tearDown() {
        leaveIdlePolling()
        connection.connectionEnded()
        received = nil
        handshakeDeadline?.cancel()
        handshakeDeadline = nil
        releaseResources()
        requestMetrics?.finish()
    }

    /// Gives back the payload budget and stops the timers; the connection is gone.
    private func releaseResources() {
        if chargedBytes > 0 {
            budget.release(chargedBytes)
            chargedBytes = 0
            // Its large WRITE buffer (up to 32 MiB) came from the heap, which keeps what is
            // freed there (`clinuxio_keep_large_allocations`): give it back, or connections
            // that announced large WRITEs and died leave their memory behind.
            clinuxio_release_free_memory()
        }
        awaitingBudget = false
        budgetRetry?.cancel()
        budgetRetry = nil
        stallTimer?.cancel()
        stallTimer = nil
    }

    /// Gives the burst's reply buffer its storage on first use.
    private func prepareOutbox(context: ChannelHandlerContext) {
        if outbox.capacity == 0 { outbox = context.channel.allocator.buffer(capacity: Self.outboxCapacity) }
    }

    private func scheduleFlush(context: ChannelHandlerContext) {
        guard !flushScheduled else { return }
        flushScheduled = true
        context.eventLoop.assumeIsolated().execute { [weak self] in
            guard let self else { return }
            self.flushScheduled = false
            self.flushIfNeeded(context: context)
            self.offerIdlePolling()
        }
    }

    // MARK: - Idle polling

    /// Every request received has been answered and the replies are on their way: the
    /// loop may poll this socket for the next one (``IdlePoller``).
    private func offerIdlePolling() {
        guard let poller, let socketDescriptor, !pollingIdle, !channelClosing, !clientInputEnded,
            connection.isInTransmission, connection.inFlight == 0, (received?.readableBytes ?? 0) == 0,
            !flushPending, tlsBacklog.isEmpty, !isHoldingInput
        else { return }
        pollingIdle = true
        poller.becameIdle(socketDescriptor, wantsPoll: pacing.waitsForEachReply)
    }

    /// Takes the socket out of the poller's sets before the channel closes it.
    private func leaveIdlePolling() {
        guard let socketDescriptor else { return }
        self.socketDescriptor = nil
        pollingIdle = false
        poller?.removed(socketDescriptor)
    }

    private func flushIfNeeded(context: ChannelHandlerContext) {
        guard flushPending, !sendingSlices else { return }
        flushPending = false
        if outbox.readableBytes > 0 {
            send(outbox, context: context)
            // The channel holds those bytes now: the next burst starts a buffer of its own
            // rather than copying this one on its first write.
            outbox = ByteBuffer()
        }
        context.flush()
        unflushedTLSBytes = 0
    }

    /// Writes a reply (or a burst of them) towards the client. In plaintext it goes to the
    /// channel as is. Under TLS it joins the backlog, which goes out in slices while the
    /// channel is writable, with a flush each time `tlsFlushUnit` bytes are waiting: what
    /// TLS buffers and encrypts at once, and the ciphertext queued in the channel, stay
    /// bounded whatever the reply size (up to 32 MiB) and however many pool reads
    /// complete in one tick.
    private func send(_ buffer: ByteBuffer, context: ChannelHandlerContext) {
        guard encrypting else {
            context.write(wrapOutboundOut(buffer), promise: nil)
            return
        }
        tlsBacklog.append(buffer)
        writeTLSBacklog(context: context)
    }

    /// Writes the TLS backlog while the channel is writable (all of it when the connection
    /// is closing, as a plaintext channel takes everything written before a close).
    private func writeTLSBacklog(context: ChannelHandlerContext) {
        guard !sendingSlices else { return }
        sendingSlices = true
        defer { sendingSlices = false }
        while (channelWritable || channelClosing), var next = tlsBacklog.popFirst() {
            let length = min(Self.tlsFlushUnit - unflushedTLSBytes, next.readableBytes)
            guard let slice = next.readSlice(length: length) else { break }
            if next.readableBytes > 0 { tlsBacklog.prepend(next) }
            context.write(wrapOutboundOut(slice), promise: nil)
            unflushedTLSBytes += length
            if unflushedTLSBytes >= Self.tlsFlushUnit {
                context.flush()
                unflushedTLSBytes = 0
            }
        }
    }

    /// Closes for a reason the connection machine gave, saying why where a person
    /// would want to know.
    private func close(_ reason: ConnectionCloseReason, context: ChannelHandlerContext) {
        switch reason {
        case .handshakeFailed(let failure):
            logger.warning("handshake refused: \(failure)", metadata: ["event": "handshake.refused", "reason": "\(failure)"])
            serverMetrics?.handshakeFailed(reason: failure.metricReason)
        case .handshakeTimedOut:
            logger.warning(
                "handshake refused: no export chosen within \(handshakeTimeout.nanoseconds / 1_000_000_000) s",
                metadata: ["event": "handshake.refused", "reason": "handshake timed out"])
            serverMetrics?.handshakeFailed(reason: "timeout")
        case .framingError(let error):
            logger.warning("closing connection: \(error)", metadata: ["event": "protocol.violation", "reason": "\(error)"])
        case .clientDisconnected:
            logger.debug("client disconnected")
        case .clientAborted, .quiesced:
            break
        }
        switch reason {
        case .clientDisconnected, .clientAborted, .quiesced, .handshakeFailed:
            endConnection(context: context, delivering: true)
        case .handshakeTimedOut, .framingError:
            // The deadline frees the slot, and a broken stream has nothing left to deliver.
            endConnection(context: context)
        }
    }

    /// Sends what is queued and closes the channel, once.
    ///
    /// - Parameter delivering: replies already written must reach the client first: after
    ///   NBD_CMD_DISC the spec wants every outstanding request handled, and a client that
    ///   pipelined reads before it (then shut its side, as libnbd does) is still reading
    ///   their replies. The channel closes once they are all on the socket; a client that
    ///   stops reading is cut off after `requestTimeout`. Without it, bytes the socket had
    ///   not taken yet are dropped (a broken or stalled connection).
    private func endConnection(context: ChannelHandlerContext, delivering: Bool = false) {
        guard !channelClosing else { return }
        channelClosing = true
        // Before the flush: a writability change during it must not decode more input.
        tearDown()
        flushIfNeeded(context: context)
        if !tlsBacklog.isEmpty {
            writeTLSBacklog(context: context)
            context.flush()
        }
        guard delivering else {
            context.close(promise: nil)
            return
        }
        // An empty write completes once everything written before it is on the socket
        // (TLS orders it behind its ciphertext); the kernel delivers the rest after close.
        let written = context.eventLoop.makePromise(of: Void.self)
        let cutOff = context.eventLoop.assumeIsolated().scheduleTask(in: requestTimeout) {
            context.close(promise: nil)
        }
        written.futureResult.assumeIsolated().whenComplete { _ in
            cutOff.cancel()
            context.close(promise: nil)
        }
        context.writeAndFlush(wrapOutboundOut(ByteBuffer()), promise: written)
    }
}

@available(*, unavailable)
extension NBDConnectionHandler: Sendable {}
