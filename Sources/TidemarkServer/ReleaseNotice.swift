import NIOCore
import Synchronization

/// Tells waiters when an export's owner of writes is gone: no connection, view export or
/// modification in flight holds it any more, so its bitmaps can be saved as cleanly
/// closed.
///
/// The export fires it from its deinit; a waiter (removing the export) gets a future that
/// says whether that happened within its patience, without polling.
final class ReleaseNotice: Sendable {
    private struct State {
        var released = false
        var waiters: [EventLoopPromise<Bool>] = []
    }

    private let state = Mutex(State())

    /// The last reference went.
    func fire() {
        let waiters = state.withLock { state in
            state.released = true
            defer { state.waiters = [] }
            return state.waiters
        }
        for waiter in waiters { waiter.succeed(true) }
    }

    /// Succeeds with true once released, or with false when `patience` passes first.
    func released(within patience: TimeAmount, on loop: any EventLoop) -> EventLoopFuture<Bool> {
        let promise = loop.makePromise(of: Bool.self)
        let already = state.withLock { state in
            if !state.released { state.waiters.append(promise) }
            return state.released
        }
        if already {
            promise.succeed(true)
            return promise.futureResult
        }
        loop.scheduleTask(in: patience) { [self] in
            let expired = state.withLock { state in
                guard let index = state.waiters.firstIndex(where: { $0.futureResult === promise.futureResult }) else {
                    return false
                }
                state.waiters.remove(at: index)
                return true
            }
            if expired { promise.succeed(false) }
        }
        return promise.futureResult
    }
}
