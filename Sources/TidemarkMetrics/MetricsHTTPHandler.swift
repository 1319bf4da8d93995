import NIOCore
import NIOHTTP1

/// Answers one HTTP/1 request per connection: `GET /metrics` with the rendered registry,
/// 404 for other paths, 405 for other methods, 400 for what does not parse; then closes.
///
/// A client that has not completed its request within ``requestDeadline`` of connecting
/// (a slowloris trickling header bytes, an idle socket) is closed.
final class MetricsHTTPHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    /// Bytes a request may take, headers and body together (scrapers send a few hundred).
    static let maximumRequestBytes = 8 * 1024
    /// From accept to a complete request.
    static let requestDeadline: TimeAmount = .seconds(5)
    static let path = "/metrics"
    static let contentType = "text/plain; version=0.0.4; charset=utf-8"

    private let render: @Sendable () -> [UInt8]
    private var head: HTTPRequestHead?
    private var responded = false
    private var deadline: Scheduled<Void>?

    init(render: @escaping @Sendable () -> [UInt8]) {
        self.render = render
    }

    func handlerAdded(context: ChannelHandlerContext) {
        deadline = context.eventLoop.assumeIsolated().scheduleTask(in: Self.requestDeadline) { [weak self] in
            guard let self, !self.responded else { return }
            self.responded = true
            context.close(promise: nil)
        }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        deadline?.cancel()
        deadline = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let request):
            head = request
        case .body:
            break  // Bounded by HTTPRequestSizeLimit and ignored.
        case .end:
            guard let request = head else { return }
            respond(to: request, context: context)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // Parse errors (HTTPParserError) and the like: a 400 if nothing was sent yet.
        reply(status: .badRequest, body: "bad request\n", context: context)
    }

    private func respond(to request: HTTPRequestHead, context: ChannelHandlerContext) {
        guard request.method == .GET else {
            reply(status: .methodNotAllowed, body: "only GET\n", extraHeaders: [("Allow", "GET")], context: context)
            return
        }
        let path = request.uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first ?? ""
        guard path == Self.path else {
            reply(status: .notFound, body: "not found; metrics are at \(Self.path)\n", context: context)
            return
        }
        let bytes = render()
        var body = context.channel.allocator.buffer(capacity: bytes.count)
        body.writeBytes(bytes)
        reply(status: .ok, body: body, contentType: Self.contentType, context: context)
    }

    private func reply(
        status: HTTPResponseStatus, body text: String, extraHeaders: [(String, String)] = [],
        context: ChannelHandlerContext
    ) {
        var body = context.channel.allocator.buffer(capacity: text.utf8.count)
        body.writeString(text)
        reply(status: status, body: body, contentType: "text/plain; charset=utf-8", extraHeaders: extraHeaders, context: context)
    }

    private func reply(
        status: HTTPResponseStatus, body: ByteBuffer, contentType: String, extraHeaders: [(String, String)] = [],
        context: ChannelHandlerContext
    ) {
        guard !responded else { return }
        responded = true
        deadline?.cancel()
        var headers = HTTPHeaders([
            ("Content-Type", contentType), ("Content-Length", "\(body.readableBytes)"), ("Connection", "close"),
        ])
        headers.add(contentsOf: extraHeaders)
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: status, headers: headers))), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(body))), promise: nil)
        context.writeAndFlush(wrapOutboundOut(.end(nil))).assumeIsolated().whenComplete { _ in
            context.close(promise: nil)
        }
    }
}

@available(*, unavailable)
extension MetricsHTTPHandler: Sendable {}
