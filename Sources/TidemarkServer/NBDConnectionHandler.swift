import Logging
import NBDProtocol
import NIOCore
import NIOPosix

/// Asks a connection to wind down: finish what is in flight, then close.
public struct ConnectionShouldQuiesceEvent: Sendable {
    public init() {}
}

/// One client connection: feeds bytes to the handshake and transmission state machines
/// and carries out what they decide. It makes no protocol decisions of its own.
final class NBDConnectionHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    /// Transmission-phase state, held by reference so the per-request path mutates the
    /// state machine in place instead of copying it out of an enum and back.
    private final class Transmission {
        var machine: TransmissionStateMachine
        let executor: CommandExecutor

        init(machine: TransmissionStateMachine, executor: CommandExecutor) {
            self.machine = machine
            self.executor = executor
        }
    }

    private enum Phase {
        case handshake(HandshakeStateMachine)
        case transmission(Transmission)
        case closed
    }

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

    private var phase: Phase
    private var decoder = NBDRequestDecoder()
    private var received: ByteBuffer?
    /// Replies produced during this read burst, written to the socket in one go.
    private var outbox: ByteBuffer?
    private var timeoutTask: Scheduled<Void>?
    private var flushPending = false
    private var flushScheduled = false
    private var readPending = false
    private var quiescing = false
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

    init(
        registry: ExportRegistry, pool: NIOThreadPool, handshakeTimeout: TimeAmount, offersStructuredReplies: Bool,
        requestTimeout: TimeAmount, budget: PayloadBudget, outputLimit: Int, metrics: ServerMetrics? = nil,
        logger: Logger
    ) {
        self.serverMetrics = metrics
        self.phase = .handshake(HandshakeStateMachine(offersStructuredReplies: offersStructuredReplies))
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
        if case .handshake(let machine) = phase {
            var greeting = context.channel.allocator.buffer(capacity: 18)
            machine.writeGreeting(into: &greeting)
            context.writeAndFlush(wrapOutboundOut(greeting), promise: nil)
        }
        let loop = context.eventLoop.assumeIsolated()
        timeoutTask = loop.scheduleTask(in: handshakeTimeout) { [weak self] in
            guard let self, case .handshake = self.phase else { return }
            self.logger.warning(
                "handshake refused: no export chosen within \(self.handshakeTimeout.nanoseconds / 1_000_000_000) s",
                metadata: ["event": "handshake.refused", "reason": "handshake timed out"])
            self.serverMetrics?.handshakeFailed(reason: "timeout")
            self.close(context: context)
        }
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        timeoutTask?.cancel()
        timeoutTask = nil
        phase = .closed
        received = nil
        releaseResources()
        requestMetrics?.finish()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        logger.debug("connection error: \(error)")
        close(context: context)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        guard event is ConnectionShouldQuiesceEvent else {
            context.fireUserInboundEventTriggered(event)
            return
        }
        quiescing = true
        switch phase {
        case .handshake:
            close(context: context)
        case .transmission(let transmission):
            if transmission.machine.inFlight == 0 { close(context: context) }
        case .closed:
            break
        }
    }

    // MARK: - Inbound bytes

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        readBytes(unwrapInboundIn(data), context: context)
        if received != nil { notePartialInput(context: context) }
    }

    private func readBytes(_ data: ByteBuffer, context: ChannelHandlerContext) {
        var incoming = data
        guard var pending = received, pending.readableBytes > 0 else {
            received = incoming
            processReceived(context: context)
            return
        }
        received = nil
        if case .transmission = phase {
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
        while incoming.readableBytes > 0, let missing = decoder.bytesMissing(in: pending), missing > 0 {
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
        guard let needed = decoder.bytesNeeded(in: buffer), buffer.capacity - buffer.readerIndex < needed else { return }
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
        flushIfNeeded(context: context)
        context.fireChannelReadComplete()
    }

    private func processReceived(context: ChannelHandlerContext) {
        guard var buffer = received else { return }
        received = nil
        runStateMachines(&buffer, context: context)
        if case .closed = phase { return }
        guard buffer.readableBytes > 0 else { return }
        reserveForNextRequest(&buffer, context: context)
        received = buffer
    }

    /// Feeds buffered bytes to the current phase's state machine until it needs more,
    /// pauses, or the connection closes.
    private func runStateMachines(_ buffer: inout ByteBuffer, context: ChannelHandlerContext) {
        while true {
            switch phase {
            case .closed:
                return
            case .handshake(var machine):
                var output = context.channel.allocator.buffer(capacity: 256)
                let action = machine.process(&buffer, catalog: registry, output: &output)
                if let refusal = machine.takeRefusal() {
                    var metadata: Logger.Metadata = ["event": "handshake.refused", "reason": "\(refusal)"]
                    if let name = refusal.exportName { metadata["export"] = .string(name) }
                    logger.warning("handshake refused: \(refusal)", metadata: metadata)
                }
                phase = .handshake(machine)
                if output.readableBytes > 0 {
                    context.write(wrapOutboundOut(output), promise: nil)
                    flushPending = true
                }
                switch action {
                case .needMoreData:
                    return
                case .continueNegotiating:
                    continue
                case .abort:
                    close(context: context)
                case .close(let failure):
                    logger.warning(
                        "handshake refused: \(failure)", metadata: ["event": "handshake.refused", "reason": "\(failure)"])
                    serverMetrics?.handshakeFailed(reason: failure.metricReason)
                    close(context: context)
                case .enterTransmission(let session):
                    enterTransmission(session, context: context)
                case .startTLS:
                    // This handler never configures a TLS policy, so the machine cannot ask.
                    close(context: context)
                }
            case .transmission(let transmission):
                guard !transmission.machine.shouldPauseReading, !outputIsFull(context: context) else { return }
                switch decoder.decode(&buffer) {
                case .needMoreData:
                    return
                case .protocolViolation(let error):
                    logger.warning(
                        "closing connection: \(error)", metadata: ["event": "protocol.violation", "reason": "\(error)"])
                    close(context: context)
                case .request(let request):
                    awaitingBudget = false
                    if chargedBytes > 0 {
                        // Complete: its bytes now count as in flight (maximumBytesInFlight).
                        budget.release(chargedBytes)
                        chargedBytes = 0
                    }
                    let disposition = transmission.machine.received(request)
                    handle(disposition, transmission: transmission, context: context)
                }
            }
        }
    }

    private func enterTransmission(_ session: NBDSession, context: ChannelHandlerContext) {
        timeoutTask?.cancel()
        timeoutTask = nil
        guard let export = registry.export(named: session.exportName) else {
            logger.warning(
                "handshake refused: export '\(session.exportName)' was removed during the handshake",
                metadata: ["event": "handshake.refused", "reason": "export removed", "export": "\(session.exportName)"])
            close(context: context)
            return
        }
        logger[metadataKey: "export"] = "\(session.exportName)"
        logger.debug("transmission started")
        context.triggerUserOutboundEvent(ConnectionExportChosen(exportName: session.exportName), promise: nil)
        let executor = CommandExecutor(
            export: export, session: session, allocator: context.channel.allocator, pool: pool,
            eventLoop: context.eventLoop)
        phase = .transmission(Transmission(machine: TransmissionStateMachine(session: session), executor: executor))
        if let serverMetrics {
            requestMetrics = ConnectionMetrics(server: serverMetrics, export: export.name, eventLoop: context.eventLoop)
        }
    }

    // MARK: - Requests

    private func handle(_ disposition: RequestDisposition, transmission: Transmission, context: ChannelHandlerContext) {
        let cost = TransmissionStateMachine.cost(of: disposition)
        switch disposition {
        case .disconnect:
            logger.debug("client disconnected")
            if transmission.machine.canCloseNow { close(context: context) }
        case .reject(let cookie, let command, let error, let message):
            let start = requestMetrics?.started()
            logger.debug("request refused: \(message)")
            withOutbox(context: context) { outbox in
                NBDReplyEncoder.writeError(
                    cookie: cookie, command: command, error: error, message: message,
                    structured: transmission.executor.session.structuredReplies, into: &outbox)
            }
            if let start { requestMetrics?.refused(rawCommand: command, startedAt: start) }
            completed(cost: cost, transmission: transmission, context: context)
        case .execute(let cookie, let command):
            let start = requestMetrics?.started()
            // Where an inline reply will start (a new outbox starts at 0), for metrics only.
            let replyStart = start == nil ? 0 : outbox?.writerIndex ?? 0
            let result = withOutbox(context: context) { outbox in
                transmission.executor.execute(command, cookie: cookie, outbox: &outbox)
            }
            switch result {
            case .written:
                if let start { recordInline(command, cost: cost, startedAt: start, replyStart: replyStart) }
                completed(cost: cost, transmission: transmission, context: context)
            case .reply(let reply):
                context.write(wrapOutboundOut(reply), promise: nil)
                flushPending = true
                if let start { requestMetrics?.completed(.init(command, cost: cost, at: start), reply: reply) }
                completed(cost: cost, transmission: transmission, context: context)
            case .pending(let future):
                // Plain values for the completion, not the command (a WRITE holds its payload).
                let measured = start.map { ConnectionMetrics.Started(command, cost: cost, at: $0) }
                var offloaded = 0
                if case .read = command { offloaded = Int(cost) }
                offloadedReadBytes += offloaded
                future.assumeIsolated().whenComplete { [weak self] result in
                    guard let self, case .transmission = self.phase else { return }
                    let wasAtLimit = self.offloadedReadBytes >= self.outputLimit
                    self.offloadedReadBytes -= offloaded
                    switch result {
                    case .success(let reply):
                        if let measured { self.requestMetrics?.completed(measured, reply: reply) }
                        context.write(self.wrapOutboundOut(reply), promise: nil)
                        self.flushPending = true
                        self.completed(cost: cost, transmission: transmission, context: context)
                        if wasAtLimit && self.offloadedReadBytes < self.outputLimit {
                            self.resumeReading(context: context)
                        }
                        self.scheduleFlush(context: context)
                    case .failure(let error):
                        // Only a pool that is shutting down fails; the connection cannot go on.
                        self.logger.info("I/O pool unavailable: \(error)")
                        self.close(context: context)
                    }
                }
            }
        }
    }

    /// Counts a request whose reply was appended to `outbox` at `replyStart`. Only a READ
    /// can have failed there (an I/O error reply); one whose reply is shorter than its
    /// data is looked at, the others are successes without touching the buffer.
    private func recordInline(_ command: NBDCommand, cost: UInt64, startedAt start: UInt64, replyStart: Int) {
        var failed = false
        if case .read(_, let length, _) = command, let outbox, outbox.writerIndex - replyStart < Int(length) {
            failed = NBDReplyEncoder.isErrorReply(outbox, at: replyStart)
        }
        requestMetrics?.completed(
            RequestKind(command), bytes: RequestKind.bytes(of: command, cost: cost), startedAt: start, failed: failed)
    }

    /// Runs `body` on the burst's outgoing buffer, creating it on first use.
    private func withOutbox<Result>(context: ChannelHandlerContext, _ body: (inout ByteBuffer) -> Result) -> Result {
        var buffer = outbox ?? context.channel.allocator.buffer(capacity: 64 * 1024)
        outbox = nil
        let result = body(&buffer)
        outbox = buffer
        flushPending = true
        return result
    }

    /// Updates the in-flight accounting once a reply has been queued.
    private func completed(cost: UInt64, transmission: Transmission, context: ChannelHandlerContext) {
        switch transmission.machine.completed(cost: cost) {
        case .none:
            if quiescing && transmission.machine.inFlight == 0 { close(context: context) }
        case .close:
            close(context: context)
        case .resumeReading:
            resumeReading(context: context)
        }
    }

    // MARK: - Flow control

    func read(context: ChannelHandlerContext) {
        if isHoldingInput(context: context) {
            readPending = true
            return
        }
        context.read()
    }

    /// True while the server, not the client, keeps the next request from coming in:
    /// too much in flight, replies not yet taken by the client, no payload budget, a stop.
    private func isHoldingInput(context: ChannelHandlerContext) -> Bool {
        guard case .transmission(let transmission) = phase else { return false }
        return transmission.machine.shouldPauseReading || quiescing || awaitingBudget
            || !channelWritable || offloadedReadBytes >= outputLimit
    }

    /// True when replies waiting for the client have reached the limit: the channel is
    /// above its high water mark, or the burst's buffer or the pool's reads are at
    /// `outputLimit`. A full burst buffer is handed to the channel first, so that the
    /// channel's writability (and with it the resumption) accounts for it.
    private func outputIsFull(context: ChannelHandlerContext) -> Bool {
        if (outbox?.readableBytes ?? 0) >= outputLimit {
            flushIfNeeded(context: context)
        }
        return !channelWritable || offloadedReadBytes >= outputLimit
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        channelWritable = context.channel.isWritable
        if channelWritable {
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
        if readPending, !isHoldingInput(context: context) {
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
            guard self.awaitingBudget, case .transmission = self.phase else { return }
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
        guard case .transmission = phase else { return }
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
        guard case .transmission = phase, let buffer = received, buffer.readableBytes > 0,
            (decoder.bytesMissing(in: buffer) ?? 1) > 0
        else { return }
        let now = NIODeadline.now()
        if isHoldingInput(context: context) { lastInput = now }
        if now - lastInput >= requestTimeout {
            let needed = decoder.bytesNeeded(in: buffer).map { " of \($0)" } ?? ""
            logger.warning(
                "closing connection: a request stalled for \(requestTimeout.nanoseconds / 1_000_000) ms with \(buffer.readableBytes)\(needed) bytes received (--request-timeout)")
            close(context: context)
            return
        }
        armStallTimer(at: lastInput + requestTimeout, context: context)
    }

    /// Gives back the payload budget and stops the timers; the connection is gone.
    private func releaseResources() {
        if chargedBytes > 0 {
            budget.release(chargedBytes)
            chargedBytes = 0
        }
        awaitingBudget = false
        budgetRetry?.cancel()
        budgetRetry = nil
        stallTimer?.cancel()
        stallTimer = nil
    }

    private func scheduleFlush(context: ChannelHandlerContext) {
        guard !flushScheduled else { return }
        flushScheduled = true
        context.eventLoop.assumeIsolated().execute { [weak self] in
            guard let self else { return }
            self.flushScheduled = false
            self.flushIfNeeded(context: context)
        }
    }

    private func flushIfNeeded(context: ChannelHandlerContext) {
        guard flushPending else { return }
        flushPending = false
        if let buffer = outbox {
            outbox = nil
            if buffer.readableBytes > 0 { context.write(wrapOutboundOut(buffer), promise: nil) }
        }
        context.flush()
    }

    private func close(context: ChannelHandlerContext) {
        if case .closed = phase { return }
        flushIfNeeded(context: context)
        phase = .closed
        received = nil
        timeoutTask?.cancel()
        timeoutTask = nil
        releaseResources()
        requestMetrics?.finish()
        context.close(promise: nil)
    }
}

@available(*, unavailable)
extension NBDConnectionHandler: Sendable {}
