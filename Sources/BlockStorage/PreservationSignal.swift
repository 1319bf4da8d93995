import CLinuxIO

/// Lets threads that need granules another writer is copying sleep until the copy is
/// done, instead of polling.
///
/// The view's state stays behind its own lock; this only wakes sleepers. A sleeper holds
/// the sleeper lock from its last look at the state until the wait releases it, and a
/// copier wakes everyone (taking that lock) after changing the state whenever the state
/// says someone sleeps, so no wake-up is lost. Used only by pool threads (writers waiting
/// for another writer's copy, blocking reads): the event loop's reads never wait.
final class PreservationSignal: @unchecked Sendable {
    // @unchecked: the sleeper is used only through its own (locking) C functions.
    private let sleeper = clinuxio_sleeper_new()

    deinit { clinuxio_sleeper_free(sleeper) }

    /// Sleeps until `isDone` returns true. `isDone` reads the state under its lock and,
    /// the first time it returns false, registers the caller as a sleeper there; `leave`
    /// unregisters it once done.
    func sleep(until isDone: () -> Bool, leave: () -> Void) {
        clinuxio_sleeper_lock(sleeper)
        while !isDone() { clinuxio_sleeper_wait(sleeper) }
        clinuxio_sleeper_unlock(sleeper)
        leave()
    }

    /// Wakes every sleeper; call after changing the state, when it says someone sleeps.
    func wakeAll() { clinuxio_sleeper_wake_all(sleeper) }
}
