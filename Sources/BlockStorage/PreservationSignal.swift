import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Lets threads that need granules another writer is copying sleep until the copy is
/// done, instead of polling.
///
/// The view's state stays behind its own lock; this only wakes sleepers. A sleeper holds
/// `mutex` from its last look at the state until `pthread_cond_wait` releases it, and a
/// copier broadcasts (taking `mutex`) after changing the state whenever the state says
/// someone sleeps, so no wake-up is lost. Used only by pool threads (writers waiting for
/// another writer's copy, blocking reads): the event loop's reads never wait.
final class PreservationSignal: @unchecked Sendable {
    // @unchecked: pthread objects at fixed addresses, used only through pthread calls.
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let condition: UnsafeMutablePointer<pthread_cond_t>

    init() {
        mutex = .allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        pthread_mutex_init(mutex, nil)
        condition = .allocate(capacity: 1)
        condition.initialize(to: pthread_cond_t())
        pthread_cond_init(condition, nil)
    }

    deinit {
        pthread_cond_destroy(condition)
        condition.deallocate()
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    /// Sleeps until `isDone` returns true. `isDone` reads the state under its lock and,
    /// the first time it returns false, registers the caller as a sleeper there; `leave`
    /// unregisters it once done.
    func sleep(until isDone: () -> Bool, leave: () -> Void) {
        pthread_mutex_lock(mutex)
        while !isDone() { pthread_cond_wait(condition, mutex) }
        pthread_mutex_unlock(mutex)
        leave()
    }

    /// Wakes every sleeper; call after changing the state, when it says someone sleeps.
    func wakeAll() {
        pthread_mutex_lock(mutex)
        pthread_cond_broadcast(condition)
        pthread_mutex_unlock(mutex)
    }
}
