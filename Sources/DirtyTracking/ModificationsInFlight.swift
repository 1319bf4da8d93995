import CLinuxIO
import Synchronization

/// Counts the modifications in flight per write epoch, and lets a management operation
/// sleep until its epoch's modifications have finished.
///
/// Two counters suffice (even and odd epochs): operations are serialised and each drains
/// its epoch before the next begins, so at most two epochs have writes in flight. The
/// write path only adds to an atomic counter; it touches the condition variable only
/// when it finishes the last modification of an epoch someone is waiting for. The waiter
/// runs on a management thread (the control thread, startup), never on an event loop.
final class ModificationsInFlight: @unchecked Sendable {
    // @unchecked: the counters are atomics; the sleeper is used only through its own
    // (locking) C functions.
    private let even = Atomic<Int>(0)
    private let odd = Atomic<Int>(0)
    /// True while a management operation waits in `drain`.
    private let waiting = Atomic<Bool>(false)
    private let sleeper = clinuxio_sleeper_new()

    deinit { clinuxio_sleeper_free(sleeper) }

    /// A modification of `epoch` began (called under the tracker's state lock, so it is
    /// counted before any operation can end that epoch).
    func begin(epoch: UInt64) {
        if epoch & 1 == 0 {
            even.wrappingAdd(1, ordering: .sequentiallyConsistent)
        } else {
            odd.wrappingAdd(1, ordering: .sequentiallyConsistent)
        }
    }

    /// A modification of `epoch` is over. Wakes a waiting `drain` when it was the last.
    func end(epoch: UInt64) {
        let left =
            epoch & 1 == 0
            ? even.wrappingSubtract(1, ordering: .sequentiallyConsistent).newValue
            : odd.wrappingSubtract(1, ordering: .sequentiallyConsistent).newValue
        // Sequentially consistent on both sides: either this sees `waiting`, or the
        // waiter (which sets it before reading the count) sees zero.
        guard left == 0, waiting.load(ordering: .sequentiallyConsistent) else { return }
        clinuxio_sleeper_wake_all(sleeper)
    }

    /// Modifications of `epoch` (and of the other epoch of the same parity, of which
    /// there is none while operations are serialised) not yet over.
    func count(epoch: UInt64) -> Int {
        epoch & 1 == 0 ? even.load(ordering: .sequentiallyConsistent) : odd.load(ordering: .sequentiallyConsistent)
    }

    /// Sleeps until every modification of `epoch` is over. Blocking: call off the event
    /// loops (writes finish there), from the one thread performing an operation.
    func drain(epoch: UInt64) {
        guard count(epoch: epoch) > 0 else { return }
        waiting.store(true, ordering: .sequentiallyConsistent)
        clinuxio_sleeper_lock(sleeper)
        while count(epoch: epoch) > 0 { clinuxio_sleeper_wait(sleeper) }
        clinuxio_sleeper_unlock(sleeper)
        waiting.store(false, ordering: .sequentiallyConsistent)
    }
}
