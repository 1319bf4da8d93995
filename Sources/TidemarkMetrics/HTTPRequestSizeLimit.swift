import NIOCore

/// Closes a scrape connection that sends more than `limit` bytes, before the HTTP parser
/// sees them, with a bare 431 reply: a huge header or body never makes the endpoint hold
/// more than this (the endpoint serves one small GET per connection).
final class HTTPRequestSizeLimit: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundOut = ByteBuffer

    static let refusal = "HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

    private let limit: Int
    private var received = 0
    private var refused = false

    init(limit: Int) {
        self.limit = limit
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !refused else { return }
        let buffer = unwrapInboundIn(data)
        received += buffer.readableBytes
        guard received <= limit else {
            refused = true
            var reply = context.channel.allocator.buffer(capacity: Self.refusal.utf8.count)
            reply.writeString(Self.refusal)
            context.writeAndFlush(wrapOutboundOut(reply)).assumeIsolated().whenComplete { _ in
                context.close(promise: nil)
            }
            return
        }
        context.fireChannelRead(data)
    }
}

@available(*, unavailable)
extension HTTPRequestSizeLimit: Sendable {}
