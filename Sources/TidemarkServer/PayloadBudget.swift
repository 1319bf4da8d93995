import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Bytes that all connections together may hold for WRITE requests that are still
/// arriving.
///
/// A large WRITE gets one buffer of its final size as soon as its header is in (so its
/// payload is not copied through ever larger buffers). Without a global cap, clients that
/// announce 32 MiB and then send almost nothing pin 32 MiB each, with no limit over the
/// connections. A connection must take its buffer's size from this budget first; one that
/// cannot stops reading until another request completes or a connection closes.
///
/// Lock-free (one atomic word), shared by every event loop; only requests above
/// ``NBDConnectionHandler/unbudgetedRequestSize`` touch it, so the 4 KiB path never does.
public final class PayloadBudget: Sendable {
    /// The most bytes that may be charged at once.
    public let limit: Int
    private let charged = Atomic<Int>(0)

    /// The default: 256 MiB, or an eighth of physical memory on a machine with less than 2 GiB.
    public static var defaultLimit: Int {
        let pages = sysconf(Int32(_SC_PHYS_PAGES))
        let pageSize = sysconf(Int32(_SC_PAGESIZE))
        let fixed = 256 << 20
        guard pages > 0, pageSize > 0 else { return fixed }
        let (memory, overflow) = pages.multipliedReportingOverflow(by: pageSize)
        return overflow ? fixed : min(fixed, max(32 << 20, memory / 8))
    }

    public init(limit: Int) {
        self.limit = max(0, limit)
    }

    /// Bytes charged now, over all connections.
    public var inUse: Int { charged.load(ordering: .relaxed) }

    /// Charges `bytes` if they fit under the limit.
    /// - Returns: false, charging nothing, when they do not.
    public func tryAcquire(_ bytes: Int) -> Bool {
        guard bytes > 0 else { return true }
        var current = charged.load(ordering: .relaxed)
        while true {
            let (next, overflow) = current.addingReportingOverflow(bytes)
            guard !overflow, next <= limit else { return false }
            let (exchanged, original) = charged.compareExchange(
                expected: current, desired: next, ordering: .acquiringAndReleasing)
            if exchanged { return true }
            current = original
        }
    }

    /// Gives back what an earlier successful ``tryAcquire(_:)`` charged.
    public func release(_ bytes: Int) {
        guard bytes > 0 else { return }
        charged.subtract(bytes, ordering: .acquiringAndReleasing)
    }
}
