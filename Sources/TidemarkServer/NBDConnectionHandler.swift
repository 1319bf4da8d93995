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

    private let registry: ExportRegistry
    private let pool: NIOThreadPool
    private let handshakeTimeout: TimeAmount
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

    init(
        registry: ExportRegistry, pool: NIOThreadPool, handshakeTimeout: TimeAmount, offersStructuredReplies: Bool,
        logger: Logger
    ) {
        self.phase = .handshake(HandshakeStateMachine(offersStructuredReplies: offersStructuredReplies))
        self.registry = registry
        self.pool = pool
        self.handshakeTimeout = handshakeTimeout
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
            self.close(context: context)
        }
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        timeoutTask?.cancel()
        timeoutTask = nil
        phase = .closed
        received = nil
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
        var incoming = unwrapInboundIn(data)
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
    /// growing it through repeated appends.
    private func reserveForNextRequest(_ buffer: inout ByteBuffer, context: ChannelHandlerContext) {
        guard let needed = decoder.bytesNeeded(in: buffer), buffer.capacity - buffer.readerIndex < needed else { return }
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
                    close(context: context)
                case .enterTransmission(let session):
                    enterTransmission(session, context: context)
                }
            case .transmission(let transmission):
                guard !transmission.machine.shouldPauseReading else { return }
                switch decoder.decode(&buffer) {
                case .needMoreData:
                    return
                case .protocolViolation(let error):
                    logger.warning(
                        "closing connection: \(error)", metadata: ["event": "protocol.violation", "reason": "\(error)"])
                    close(context: context)
                case .request(let request):
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
    }

    // MARK: - Requests

    private func handle(_ disposition: RequestDisposition, transmission: Transmission, context: ChannelHandlerContext) {
        let cost = TransmissionStateMachine.cost(of: disposition)
        switch disposition {
        case .disconnect:
            logger.debug("client disconnected")
            if transmission.machine.canCloseNow { close(context: context) }
        case .reject(let cookie, let command, let error, let message):
            logger.debug("request refused: \(message)")
            withOutbox(context: context) { outbox in
                NBDReplyEncoder.writeError(
                    cookie: cookie, command: command, error: error, message: message,
                    structured: transmission.executor.session.structuredReplies, into: &outbox)
            }
            completed(cost: cost, transmission: transmission, context: context)
        case .execute(let cookie, let command):
            let result = withOutbox(context: context) { outbox in
                transmission.executor.execute(command, cookie: cookie, outbox: &outbox)
            }
            switch result {
            case .written:
                completed(cost: cost, transmission: transmission, context: context)
            case .reply(let reply):
                context.write(wrapOutboundOut(reply), promise: nil)
                flushPending = true
                completed(cost: cost, transmission: transmission, context: context)
            case .pending(let future):
                future.assumeIsolated().whenComplete { [weak self] result in
                    guard let self, case .transmission = self.phase else { return }
                    switch result {
                    case .success(let reply):
                        context.write(self.wrapOutboundOut(reply), promise: nil)
                        self.flushPending = true
                        self.completed(cost: cost, transmission: transmission, context: context)
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
        if case .transmission(let transmission) = phase,
            transmission.machine.shouldPauseReading || quiescing || !context.channel.isWritable
        {
            readPending = true
            return
        }
        context.read()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable {
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
        if readPending, case .transmission(let transmission) = phase, !transmission.machine.shouldPauseReading,
            context.channel.isWritable, !quiescing
        {
            readPending = false
            context.read()
        }
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
        context.close(promise: nil)
    }
}

@available(*, unavailable)
extension NBDConnectionHandler: Sendable {}
