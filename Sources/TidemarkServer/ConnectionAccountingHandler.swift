import Logging
import NIOCore

/// First in every connection's pipeline: logs the connection's opening and closing, with
/// its duration and the bytes it read and wrote.
///
/// Counting costs two additions per read burst and per write; nothing is allocated per
/// request and nothing is logged per request. Bytes written are counted when queued to the
/// socket, so a connection cut while replies were still queued reports slightly more than
/// the client received.
public final class ConnectionAccountingHandler: ChannelDuplexHandler {
    public typealias InboundIn = ByteBuffer
    public typealias InboundOut = ByteBuffer
    public typealias OutboundIn = ByteBuffer
    public typealias OutboundOut = ByteBuffer

    private let logger: Logger
    /// What kind of connection, in the log's words: "NBD" or "control".
    private let kind: String
    private var opened: NIODeadline?
    private var bytesRead: UInt64 = 0
    private var bytesWritten: UInt64 = 0
    private var exportName: String?

    /// - Parameter logger: already carrying the connection's `connection` and `peer` metadata.
    public init(logger: Logger, kind: String) {
        self.logger = logger
        self.kind = kind
    }

    /// The `peer` field for a remote address: `host:port` for TCP, nil for a Unix socket,
    /// whose clients have no address.
    public static func peerDescription(_ address: SocketAddress?) -> String? {
        guard let address, let ip = address.ipAddress, let port = address.port else { return nil }
        if case .v6 = address { return "[\(ip)]:\(port)" }
        return "\(ip):\(port)"
    }

    public func channelActive(context: ChannelHandlerContext) {
        opened = .now()
        logger.info("\(kind) connection opened", metadata: ["event": "connection.open"])
        context.fireChannelActive()
    }

    public func channelInactive(context: ChannelHandlerContext) {
        if let opened {
            let micros = (NIODeadline.now() - opened).nanoseconds / 1000
            var metadata: Logger.Metadata = [
                "event": "connection.close",
                "duration_ms": .stringConvertible(Double(micros) / 1000),
                "bytes_read": .stringConvertible(bytesRead),
                "bytes_written": .stringConvertible(bytesWritten),
            ]
            if let exportName { metadata["export"] = .string(exportName) }
            logger.info("\(kind) connection closed", metadata: metadata)
        }
        opened = nil
        context.fireChannelInactive()
    }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        bytesRead &+= UInt64(unwrapInboundIn(data).readableBytes)
        context.fireChannelRead(data)
    }

    public func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        bytesWritten &+= UInt64(unwrapOutboundIn(data).readableBytes)
        context.write(data, promise: promise)
    }

    public func triggerUserOutboundEvent(context: ChannelHandlerContext, event: Any, promise: EventLoopPromise<Void>?) {
        if let chosen = event as? ConnectionExportChosen {
            exportName = chosen.exportName
            promise?.succeed(())
            return
        }
        context.triggerUserOutboundEvent(event, promise: promise)
    }
}

@available(*, unavailable)
extension ConnectionAccountingHandler: Sendable {}
