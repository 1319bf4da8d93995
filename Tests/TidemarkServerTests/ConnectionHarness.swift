import BlockStorage
import Dispatch
import Logging
import NBDProtocol
import NIOCore
import NIOEmbedded
import NIOPosix
@testable import TidemarkServer

#if canImport(Glibc)
import Glibc
#endif

/// The real ``NBDConnectionHandler`` on an in-memory channel whose clock the test moves,
/// serving a 1 MiB raw image, with a one-thread I/O pool the test can hold busy.
final class ConnectionHarness: Sendable {
    static let imageSize = 1 << 20
    static let handshakeTimeout: TimeAmount = .seconds(10)

    let channel: NIOAsyncTestingChannel
    let loop: NIOAsyncTestingEventLoop
    let pool: NIOThreadPool
    let imagePath: String

    init() async throws {
        imagePath = "/tmp/tidemark-handler-\(getpid())-\(UInt64.random(in: 0...UInt64.max)).img"
        let descriptor = open(imagePath, O_CREAT | O_RDWR | O_TRUNC, 0o600)
        guard descriptor >= 0 else { throw HarnessError.setup("cannot create \(imagePath)") }
        // A known pattern, so reads can be checked: byte i is i % 251.
        let pattern = (0..<Self.imageSize).map { UInt8($0 % 251) }
        let written = pattern.withUnsafeBytes { pwrite(descriptor, $0.baseAddress, $0.count, 0) }
        close(descriptor)
        guard written == Self.imageSize else { throw HarnessError.setup("short write to \(imagePath)") }

        let registry = ExportRegistry()
        try registry.add(Export(name: "disk", description: "", image: try RawImage(path: imagePath, readOnly: false), readOnly: false))
        pool = NIOThreadPool(numberOfThreads: 1)
        pool.start()
        loop = NIOAsyncTestingEventLoop()
        channel = NIOAsyncTestingChannel(loop: loop)
        let pool = self.pool
        try await loop.executeInContext { [channel] in
            let handler = NBDConnectionHandler(
                registry: registry, pool: pool, handshakeTimeout: Self.handshakeTimeout, offersStructuredReplies: true,
                requestTimeout: .seconds(30), budget: PayloadBudget(limit: 64 << 20), outputLimit: 1 << 20,
                logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() }))
            try channel.pipeline.syncOperations.addHandler(handler)
        }
        try await channel.register().get()
        try await channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 10809)).get()
        // The greeting: NBDMAGIC, IHAVEOPT, server flags.
        let greeting = try await outbound()
        guard greeting.count == 18 else { throw HarnessError.setup("greeting of \(greeting.count) bytes") }
    }

    func shutdown() async throws {
        _ = try? await channel.finish(acceptAlreadyClosed: true)
        try await pool.shutdownGracefully()
        unlink(imagePath)
    }

    /// Feeds `bytes` to the handler cut into pieces of the given sizes, cycling.
    func send(_ bytes: [UInt8], pieces: [Int] = [Int.max]) async throws {
        var start = 0
        var index = 0
        while start < bytes.count {
            let end = min(bytes.count, start + max(1, min(pieces[index % pieces.count], bytes.count - start)))
            try await channel.writeInbound(ByteBuffer(bytes: bytes[start..<end]))
            start = end
            index += 1
        }
    }

    /// Everything the handler has flushed to the client so far.
    func outbound() async throws -> [UInt8] {
        var result: [UInt8] = []
        while let buffer = try await channel.readOutbound(as: ByteBuffer.self) {
            result += buffer.readableBytesView
        }
        return result
    }

    /// Client flags and NBD_OPT_GO for the default export; returns once the GO is acknowledged.
    func negotiate() async throws {
        try await send(ClientBytes.handshake())
        let replies = try await outbound()
        guard OptionReplies.endsWithAck(replies, option: NBDOption.go) else {
            throw HarnessError.setup("GO not acknowledged (\(replies.count) bytes)")
        }
    }

    /// Fires the server's stop request at the handler, as ``NBDServer`` does on shutdown.
    func quiesce() async throws {
        try await loop.executeInContext { [channel] in
            channel.pipeline.fireUserInboundEventTriggered(ConnectionShouldQuiesceEvent())
        }
    }

    /// Tells the handler the socket's send buffer is full (false) or drained (true).
    func setWritable(_ writable: Bool) async throws {
        channel.isWritable = writable
        try await loop.executeInContext { [channel] in
            channel.pipeline.fireChannelWritabilityChanged()
        }
    }

    /// Occupies the pool's only thread until the returned gate is opened, so work the
    /// handler sends to the pool stays in flight.
    func holdPool() -> DispatchSemaphore {
        let gate = DispatchSemaphore(value: 0)
        pool.submit { _ in gate.wait() }
        return gate
    }

    /// Returns once everything queued on the pool before this call has run and its
    /// completion has reached the event loop, then runs the loop's pending tasks.
    func settlePool() async throws {
        try await pool.runIfActive(eventLoop: loop) {}.get()
        await loop.run()
    }

    var isActive: Bool { channel.isActive }
}

enum HarnessError: Error {
    case setup(String)
}
