import QMPWire
import Logging
import NIOCore
import NIOPosix
import TidemarkServer

#if canImport(Glibc)
import Glibc
#endif

/// The QMP-compatible management socket: a Unix socket only the owner may use.
public final class ControlServer: Sendable {
    public let path: String
    private let channel: any Channel

    private init(path: String, channel: any Channel) {
        self.path = path
        self.channel = channel
    }

    /// Binds `path` (replacing a stale socket file) with mode 0600 and starts serving.
    /// Each connection's opening and closing is logged to `logger`, numbered in the same
    /// sequence as NBD connections.
    public static func start(
        path: String, control: ControlPlane, group: any EventLoopGroup,
        logger: Logger = Logger(label: "tidemark", factory: { _ in SwiftLogNoOpLogHandler() })
    ) async throws -> ControlServer {
        // Create the socket already private: no window in which others could connect.
        let previous = umask(0o177)
        let bound: any Channel
        do {
            bound = try await ServerBootstrap(group: group)
                .serverChannelOption(.backlog, value: 64)
                .childChannelOption(.writeBufferWaterMark, value: QMPConnectionHandler.waterMark)
                .childChannelInitializer { channel in
                    var connectionLogger = logger
                    connectionLogger[metadataKey: "connection"] = .stringConvertible(ConnectionIdentifier.next())
                    connectionLogger[metadataKey: "socket"] = "control"
                    return channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(
                            ConnectionAccountingHandler(logger: connectionLogger, kind: "control"))
                        try channel.pipeline.syncOperations.addHandler(QMPConnectionHandler(control: control))
                    }
                }
                .bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true)
                .get()
        } catch {
            umask(previous)
            throw error
        }
        umask(previous)
        chmod(path, 0o600)
        return ControlServer(path: path, channel: bound)
    }

    public func close() async {
        try? await channel.close().get()
        unlink(path)
    }
}
