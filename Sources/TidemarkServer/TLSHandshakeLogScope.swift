import Logging
import NIOCore
import TidemarkTLS

/// Sits in front of the TLS handler while its handshake runs and binds the connection's
/// logger (`TLSServerCredentials.handshakeLogger`) around each read it passes on.
///
/// Why: swift-nio-ssl asks for a PSK key in a callback shared by every connection of the
/// context, synchronously inside the TLS handler's `channelRead`. Bound here, a refused PSK
/// identity is logged with the connection's id and peer like every other line about it.
/// Removed once the handshake is over, so TLS data reads do not pay for it.
final class TLSHandshakeLogScope: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer

    private let logger: Logger

    init(logger: Logger) {
        self.logger = logger
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        TLSServerCredentials.$handshakeLogger.withValue(logger) {
            context.fireChannelRead(data)
        }
    }
}
