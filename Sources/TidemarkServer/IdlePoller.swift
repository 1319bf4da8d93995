import NIOCore
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Busy-polls, on one event loop, the sockets of its connections once all of them have
/// answered every request they were sent, for the loop's ``AdaptivePollWindow``, so that
/// the next request of a queue-depth-1 client is read as it arrives instead of after a
/// wake-up. Only a client that waits for each reply (``ClientPacing``) starts a poll; a
/// pipelining one's socket is watched with the others while it is idle too.
///
/// The poll runs as one task after the tick's I/O and tasks, over every connection of the
/// loop at once (one `poll(2)` with a zero timeout per turn): it ends as soon as any of
/// them has input, or when the window is over, and the loop goes back to `epoll_wait`,
/// which returns at once with that input. The loop polls only while every connection in
/// transmission on it is idle: one with a request on the I/O pool or replies the client
/// has not taken is waiting for a completion or writability the poll would not see, and
/// must not wait behind it. What else a poll can delay, by at most the window: a new
/// connection's handshake and the loop's timers. Everything here runs on the loop; only
/// the counters are read from elsewhere.
final class IdlePoller {
    /// Above this many connections on a loop it does not poll: one `poll(2)` over all of
    /// their sockets would cost more than the wake-up it saves.
    static let maximumPolledConnections = 64

    private let eventLoop: any EventLoop
    private var window: AdaptivePollWindow
    /// Sockets of the loop's connections in transmission.
    private var members: Set<CInt> = []
    /// Idle connections' sockets and since when they are idle (monotonic nanoseconds).
    private var idleSince: [CInt: UInt64] = [:]
    /// Idle connections whose clients wait for each reply (``ClientPacing``): a poll is
    /// for them; the others' sockets are only watched alongside.
    private var pollWanted: Set<CInt> = []
    private var descriptors: [pollfd] = []
    private var pollScheduled = false
    let statistics: IdlePollStatistics

    init(maximumNanoseconds: UInt64, eventLoop: any EventLoop, statistics: IdlePollStatistics) {
        self.eventLoop = eventLoop
        self.window = AdaptivePollWindow(maximum: maximumNanoseconds)
        self.statistics = statistics
    }

    /// The window the next poll would use (for tests).
    var currentWindow: UInt64 { window.current }

    /// A connection on `descriptor` entered transmission; it starts busy.
    func joined(_ descriptor: CInt) {
        members.insert(descriptor)
    }

    /// The connection on `descriptor` has sent every reply and holds no request.
    /// `wantsPoll`: its client waits for each reply, so its next request is worth a poll.
    func becameIdle(_ descriptor: CInt, wantsPoll: Bool = true) {
        guard members.contains(descriptor) else { return }
        idleSince[descriptor] = Self.now()
        if wantsPoll { pollWanted.insert(descriptor) } else { pollWanted.remove(descriptor) }
        guard !pollScheduled, shouldPoll else { return }
        pollScheduled = true
        eventLoop.assumeIsolated().execute { [self] in
            pollScheduled = false
            pollIdleConnections()
        }
    }

    /// Every connection is idle, one of them wants a poll, and polling is on.
    private var shouldPoll: Bool {
        window.current > 0 && !pollWanted.isEmpty && idleSince.count == members.count
            && members.count <= Self.maximumPolledConnections
    }

    /// Input arrived on an idle connection: the gap teaches the window.
    func inputArrived(_ descriptor: CInt) {
        pollWanted.remove(descriptor)
        guard let since = idleSince.removeValue(forKey: descriptor) else { return }
        let now = Self.now()
        window.record(idleNanoseconds: now > since ? now - since : 0)
    }

    /// The connection is closing: its socket must leave the set before it is closed.
    func removed(_ descriptor: CInt) {
        members.remove(descriptor)
        idleSince.removeValue(forKey: descriptor)
        pollWanted.remove(descriptor)
    }

    /// Polls the idle sockets until one is readable (or hung up) or the window is over.
    @discardableResult
    func pollIdleConnections() -> IdlePollOutcome {
        guard shouldPoll else { return .skipped }
        descriptors.removeAll(keepingCapacity: true)
        for descriptor in idleSince.keys {
            descriptors.append(pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0))
        }
        let deadline = Self.now() + window.current
        let count = nfds_t(descriptors.count)
        repeat {
            let ready = descriptors.withUnsafeMutableBufferPointer { poll($0.baseAddress, count, 0) }
            if ready != 0 {
                // Input (or an error: the loop's own read reports it).
                statistics.record(.caught)
                return .caught
            }
            // The client may share this core (nothing pins them apart): it must get to
            // run and send, not wait for the poll's time slice to end.
            sched_yield()
        } while Self.now() < deadline
        statistics.record(.expired)
        return .expired
    }

    private static func now() -> UInt64 {
        NIODeadline.now().uptimeNanoseconds
    }
}

/// How one idle poll ended.
enum IdlePollOutcome: Sendable, Equatable {
    /// A connection's next request (or its close) arrived within the window.
    case caught
    /// The window passed with no input; the loop went to sleep.
    case expired
    /// Polling is off or has backed off to a zero window, a connection was busy, or no
    /// idle client waits for each reply.
    case skipped
}

/// Counts idle polls by outcome, across a server's event loops, for `--metrics`.
public final class IdlePollStatistics: Sendable {
    private let caughtCount = Atomic<Int>(0)
    private let expiredCount = Atomic<Int>(0)

    public init() {}

    /// Polls that took a request as it arrived.
    public var caught: Int { caughtCount.load(ordering: .relaxed) }
    /// Polls that ran their whole window for nothing.
    public var expired: Int { expiredCount.load(ordering: .relaxed) }

    func record(_ outcome: IdlePollOutcome) {
        switch outcome {
        case .caught: caughtCount.add(1, ordering: .relaxed)
        case .expired: expiredCount.add(1, ordering: .relaxed)
        case .skipped: break
        }
    }
}
