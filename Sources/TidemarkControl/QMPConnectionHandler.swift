import Logging
import NIOCore
import QMPWire

/// One QMP client: greeting, capabilities negotiation, then commands in order.
/// It parses and frames; the control plane decides.
///
/// Output is bounded: commands are not read while the client leaves more than
/// `waterMark.high` of replies unread, and a client that lets events pile up past it is
/// disconnected (events do not wait for a client; queuing them would grow the server
/// without limit for a client that never reads).
final class QMPConnectionHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    /// The control channels' write buffer water marks: 1 MiB unread is far more than any
    /// client that reads needs (a reply or event is a few hundred bytes to a few KiB).
    static let waterMark = ChannelOptions.Types.WriteBufferWaterMark(low: 256 << 10, high: 1 << 20)

    private let control: ControlPlane
    private var splitter = QMPMessageSplitter()
    private var negotiated = false
    private var session: UInt64?
    private var readPending = false

    init(control: ControlPlane) {
        self.control = control
    }

    func channelActive(context: ChannelHandlerContext) {
        send(["QMP": ["version": ControlPlane.versionInfo, "capabilities": []]], context: context)
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        if let session { control.closeSession(session) }
        session = nil
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = unwrapInboundIn(data)
        for output in splitter.feed(buffer.readableBytesView) {
            switch output {
            case .message(let bytes):
                handle(bytes, context: context)
            case .oversized:
                reply(error: QMPError(.genericError, "JSON message too large (limit \(splitter.maximumMessageSize) bytes)"), id: nil, context: context)
            case .garbage:
                reply(error: QMPError(.genericError, "JSON parse error, expected an object"), id: nil, context: context)
            }
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }

    // MARK: - Flow control

    func read(context: ChannelHandlerContext) {
        guard context.channel.isWritable else {
            readPending = true
            return
        }
        context.read()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable && readPending {
            readPending = false
            context.read()
        }
        context.fireChannelWritabilityChanged()
    }

    /// Delivers an event on the channel's loop, or drops the client when it has left more
    /// than `waterMark.high` unread.
    private static func deliver(_ event: JSONValue, to channel: any Channel, logger: Logger) {
        channel.eventLoop.execute {
            guard channel.isActive else { return }
            guard channel.isWritable else {
                logger.warning(
                    "closing a QMP client that does not read: more than \(waterMark.high) bytes of replies and events unread")
                channel.close(promise: nil)
                return
            }
            channel.writeAndFlush(Self.frame(event, allocator: channel.allocator), promise: nil)
        }
    }

    private func handle(_ bytes: [UInt8], context: ChannelHandlerContext) {
        let message: JSONValue
        do {
            message = try JSONValue.parse(bytes)
        } catch {
            reply(error: QMPError(.genericError, "JSON parse error: \(error)"), id: nil, context: context)
            return
        }
        let id = message["id"]
        guard case .object = message else {
            reply(error: QMPError(.genericError, "QMP input must be a JSON object"), id: nil, context: context)
            return
        }
        guard case .string(let command)? = message["execute"] else {
            if message["exec-oob"] != nil {
                reply(error: QMPError(.genericError, "Out-of-band execution is not supported"), id: id, context: context)
            } else {
                reply(error: QMPError(.genericError, "QMP input lacks member 'execute'"), id: id, context: context)
            }
            return
        }
        if !negotiated {
            guard command == "qmp_capabilities" else {
                reply(
                    error: QMPError(.commandNotFound, "Expecting capabilities negotiation with 'qmp_capabilities'"),
                    id: id, context: context)
                return
            }
            negotiated = true
            reply(result: [:], id: id, context: context)
            // Events start only after negotiation, as in QEMU: a client still waiting for
            // its capabilities reply must not get an event instead.
            let channel = context.channel
            let logger = control.logger
            session = control.openSession { event in
                // Events may come from any thread; delivery hops to the channel's loop.
                Self.deliver(event, to: channel, logger: logger)
            }
            return
        }
        guard let session else { return }
        control.submit(command, arguments: message["arguments"], session: session, on: context.eventLoop)
            .assumeIsolated().whenComplete { [weak self] result in
                guard let self else { return }
                switch result {
                case .success(.success(let value)):
                    self.reply(result: value, id: id, context: context)
                    if command == "quit" { context.close(promise: nil) }
                case .success(.failure(let error)):
                    self.reply(error: error, id: id, context: context)
                case .failure:
                    self.reply(error: QMPError(.genericError, "the server is shutting down"), id: id, context: context)
                }
            }
    }

    private func reply(result: JSONValue, id: JSONValue?, context: ChannelHandlerContext) {
        var message: [String: JSONValue] = ["return": result]
        if let id { message["id"] = id }
        send(.object(message), context: context)
    }

    private func reply(error: QMPError, id: JSONValue?, context: ChannelHandlerContext) {
        var message: [String: JSONValue] = ["error": error.json]
        if let id { message["id"] = id }
        send(.object(message), context: context)
    }

    private func send(_ message: JSONValue, context: ChannelHandlerContext) {
        context.writeAndFlush(wrapOutboundOut(Self.frame(message, allocator: context.channel.allocator)), promise: nil)
    }

    /// One QMP message on the wire: compact JSON and CRLF, as QEMU sends it.
    private static func frame(_ message: JSONValue, allocator: ByteBufferAllocator) -> ByteBuffer {
        var buffer = allocator.buffer(capacity: 256)
        buffer.writeString(message.serialized() + "\r\n")
        return buffer
    }
}

@available(*, unavailable)
extension QMPConnectionHandler: Sendable {}
