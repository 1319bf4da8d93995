/// How long an event loop busy-polls the sockets of idle connections before it sleeps in
/// `epoll_wait`, adapted the way QEMU's iothreads adapt theirs (`poll-max-ns`).
///
/// A client at queue depth 1 sends its next request some tens of microseconds after it got
/// the last reply. A loop asleep by then pays a wake-up on the request's path (an
/// interrupt, a halted vCPU brought back, the scheduler): on a 2-core VM that is most of
/// the gap between Tidemark's QD1 latency and a thread-per-connection server's. Polling
/// for a little longer than that gap takes the request as it lands.
///
/// The window follows what the gaps turn out to be: one that a longer window would have
/// caught (at most `maximum`) doubles it, starting at ``initial``; one longer than
/// `maximum` halves it, so a client that went quiet costs a few short spins, not a core.
public struct AdaptivePollWindow: Sendable, Equatable {
    /// The first window after polling paid off.
    public static let initial: UInt64 = 4_000

    /// The longest window, in nanoseconds; 0 turns polling off.
    public let maximum: UInt64
    /// The window the next idle period polls for, in nanoseconds.
    public private(set) var current: UInt64 = 0

    public init(maximum: UInt64) {
        self.maximum = maximum
    }

    /// Takes the time from a connection's last reply to its next request.
    public mutating func record(idleNanoseconds gap: UInt64) {
        guard maximum > 0, gap > current else { return }
        if gap > maximum {
            current /= 2
            if current < Self.initial { current = 0 }
        } else {
            current = current == 0 ? min(Self.initial, maximum) : min(current * 2, maximum)
        }
    }
}
