import Logging
import NIOCore
import NIOSSL
import TidemarkTLS

/// Puts TLS in front of a connection whose `NBD_OPT_STARTTLS` was just acknowledged, and
/// judges the client once its TLS handshake is done.
///
/// Why a separate step: the TLS handler is absent from every pipeline until a client
/// negotiates it, so plaintext connections pay nothing for TLS support. The caller must
/// have flushed the plaintext ACK before `start`: writes queued in the channel already
/// passed the pipeline and leave unencrypted, everything written after goes through TLS.
enum TLSUpgrade {
    /// Adds the TLS handler at the head of the pipeline and hands it `leftover`, the bytes
    /// the client sent after STARTTLS in the same segment (the start of its ClientHello),
    /// which must never be read as NBD options. `logger` (the connection's) logs what the
    /// handshake itself refuses (a PSK identity).
    static func start(
        credentials: TLSServerCredentials, pipeline: ChannelPipeline.SynchronousOperations, leftover: ByteBuffer?,
        logger: Logger
    ) throws {
        let handler = credentials.makeServerHandler()
        try pipeline.addHandler(handler, position: .first)
        try pipeline.addHandler(TLSHandshakeLogScope(logger: logger), position: .first)
        if let leftover, leftover.readableBytes > 0 {
            // Enters at the head, so the TLS handler sees it first; until the handshake is
            // done it yields no application data, so nothing re-enters the NBD handler.
            pipeline.fireChannelRead(NIOAny(leftover))
            pipeline.fireChannelReadComplete()
        }
    }

    /// After `TLSUserEvent.handshakeCompleted`: whether the client may go on, by the
    /// certificate it presented (PSK identities were checked during the handshake).
    static func authorize(
        credentials: TLSServerCredentials, pipeline: ChannelPipeline.SynchronousOperations
    ) -> TLSClientAuthorization {
        // The handshake is over: TLS data reads no longer pass through the log scope.
        if let scope = try? pipeline.handler(type: TLSHandshakeLogScope.self) {
            pipeline.removeHandler(scope, promise: nil)
        }
        let certificate = (try? pipeline.handler(type: NIOSSLServerHandler.self))?.peerCertificate
        return credentials.authorize(peerCertificate: certificate)
    }

    /// Whether `error` is a client closing its TLS connection without close_notify, which
    /// libnbd always does: an ordinary disconnect, not worth a warning.
    static func isUncleanShutdown(_ error: any Error) -> Bool {
        if case .uncleanShutdown = error as? NIOSSLError { return true }
        return false
    }
}
