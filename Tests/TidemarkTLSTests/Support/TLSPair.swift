import NIOCore
import NIOEmbedded
import NIOSSL
import NIOTLS

/// A TLS client and a server handler in two EmbeddedChannels, bytes carried between them
/// by hand, so handshakes run in memory and deterministically.
final class TLSPair {
    let client = EmbeddedChannel()
    let server = EmbeddedChannel()
    let serverHandler: NIOSSLServerHandler
    let serverEvents = EventRecorder()
    let clientEvents = EventRecorder()

    init(server serverHandler: NIOSSLServerHandler, client configuration: TLSConfiguration) throws {
        self.serverHandler = serverHandler
        let context = try NIOSSLContext(configuration: configuration)
        let clientHandler = try NIOSSLClientHandler(context: context, serverHostname: nil)
        try client.pipeline.syncOperations.addHandlers([clientHandler, clientEvents])
        try server.pipeline.syncOperations.addHandlers([serverHandler, serverEvents])
    }

    /// Connects both ends and shuttles bytes until neither has anything to send.
    /// Returns whether both ends finished their handshake.
    func handshake() -> Bool {
        let address = try? SocketAddress(ipAddress: "127.0.0.1", port: 1)
        if let address {
            _ = server.connect(to: address)
            _ = client.connect(to: address)
        }
        shuttle()
        return serverEvents.handshakeCompleted && clientEvents.handshakeCompleted
    }

    /// Moves bytes both ways, `chunkSize` bytes at a time, until both ends are quiet.
    func shuttle(chunkSize: Int = Int.max) {
        var rounds = 0
        while rounds < 1000 {
            rounds += 1
            let moved = move(from: client, to: server, chunkSize: chunkSize) + move(from: server, to: client, chunkSize: chunkSize)
            if moved == 0 { return }
        }
    }

    private func move(from source: EmbeddedChannel, to destination: EmbeddedChannel, chunkSize: Int) -> Int {
        var moved = 0
        while let buffer = try? source.readOutbound(as: ByteBuffer.self) {
            var remaining = buffer
            while remaining.readableBytes > 0 {
                let slice = remaining.readSlice(length: min(chunkSize, remaining.readableBytes)) ?? ByteBuffer()
                moved += slice.readableBytes
                do {
                    try destination.writeInbound(slice)
                } catch {
                    (destination === server ? serverEvents : clientEvents).errors.append(error)
                }
            }
        }
        return moved
    }

    /// Closes both ends without waiting: a TLS close waits for the peer's close_notify,
    /// so the bytes are shuttled and the shutdown timer run out instead.
    func finish() {
        client.close(promise: nil)
        shuttle()
        server.close(promise: nil)
        shuttle()
        client.embeddedEventLoop.advanceTime(by: .seconds(60))
        server.embeddedEventLoop.advanceTime(by: .seconds(60))
    }
}

/// Records TLS events and errors at the end of a pipeline.
final class EventRecorder: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    var handshakeCompleted = false
    var negotiatedProtocol: String?
    var errors: [any Error] = []
    var received = ByteBuffer()

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case .handshakeCompleted = event as? TLSUserEvent { handshakeCompleted = true }
        context.fireUserInboundEventTriggered(event)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var buffer = unwrapInboundIn(data)
        received.writeBuffer(&buffer)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        errors.append(error)
    }
}
