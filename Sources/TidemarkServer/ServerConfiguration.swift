import NIOCore
import TidemarkTLS

/// Where and how a server listens.
public struct ServerConfiguration: Sendable {
    /// One listening socket.
    public enum Listener: Sendable, Equatable {
        /// TCP on `host:port`.
        case tcp(host: String, port: Int)
        /// A Unix domain socket at `path` (an existing socket file is replaced).
        case unix(path: String)
        /// An already-listening socket inherited from systemd socket activation.
        case inherited(descriptor: Int32)
    }

    public var listeners: [Listener]
    /// Connections beyond this are closed at once.
    public var maximumConnections: Int
    /// A client that has not chosen an export by then is disconnected.
    public var handshakeTimeout: TimeAmount
    /// Event loops (one per core by default).
    public var eventLoopCount: Int
    /// Threads for cache misses, syncs and allocation changes.
    public var ioThreadCount: Int
    /// Whether clients may negotiate structured replies (and with them block status).
    /// Off only to behave like a server that predates them.
    public var offersStructuredReplies: Bool
    /// Whether clients may negotiate NBD extended headers (64-bit lengths). Off only to
    /// test clients against a server without them.
    public var offersExtendedHeaders: Bool
    /// Bytes all connections together may hold for partly received WRITE requests
    /// (see ``PayloadBudget``).
    public var payloadBudget: Int
    /// A connection whose partly received request makes no progress for this long is
    /// closed, releasing its buffer. Time spent waiting for the payload budget or for the
    /// client to read replies does not count.
    public var requestTimeout: TimeAmount
    /// TLS credentials and policy (`serve --tls`); nil serves plaintext only and refuses
    /// STARTTLS. The TLS handler joins a connection's pipeline only after its STARTTLS.
    public var tls: TLSServerCredentials?
    /// The longest an event loop busy-polls idle connections for their next request before
    /// it sleeps (`--poll-max-ns`, as QEMU's iothread property), in nanoseconds; 0 never
    /// polls. The window adapts below it (``AdaptivePollWindow``).
    public var pollMaximumNanoseconds: UInt64
    /// 128 µs: four times QEMU's iothread default. On the 2-core VMs it was measured on, a
    /// QD1 client's next request came 35–60 µs after its reply, so QEMU's 32 µs never
    /// opened the window (QD1 reads stayed at 66 µs against 33 µs with 64–128 µs).
    public static let defaultPollMaximumNanoseconds: UInt64 = 131_072

    public init(
        listeners: [Listener],
        maximumConnections: Int = 1024,
        handshakeTimeout: TimeAmount = .seconds(10),
        eventLoopCount: Int = System.coreCount,
        ioThreadCount: Int = 4,
        offersStructuredReplies: Bool = true,
        offersExtendedHeaders: Bool = true,
        payloadBudget: Int = PayloadBudget.defaultLimit,
        requestTimeout: TimeAmount = .seconds(30),
        tls: TLSServerCredentials? = nil,
        pollMaximumNanoseconds: UInt64 = ServerConfiguration.defaultPollMaximumNanoseconds
    ) {
        self.pollMaximumNanoseconds = pollMaximumNanoseconds
        self.listeners = listeners
        self.maximumConnections = maximumConnections
        self.handshakeTimeout = handshakeTimeout
        self.eventLoopCount = eventLoopCount
        self.ioThreadCount = ioThreadCount
        self.offersStructuredReplies = offersStructuredReplies
        self.offersExtendedHeaders = offersExtendedHeaders
        self.payloadBudget = payloadBudget
        self.requestTimeout = requestTimeout
        self.tls = tls
    }
}
