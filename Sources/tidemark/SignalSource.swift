import Dispatch

/// Dispatch signal sources that are watching when they are returned.
///
/// `resume()` only asks libdispatch to register a signal source; on Linux the
/// registration (the handler that feeds the source) happens later on its manager thread:
/// 0.3–0.7 ms later on an idle machine, longer on a loaded one. A signal in between takes the
/// disposition in force: with SIG_IGN it was dropped, so a SIGTERM sent right after the
/// server started (nbdcopy stopping its captive `[ tidemark serve ]` after an 8 MiB copy)
/// was lost and the server never stopped. Waiting for the registration closes that gap.
enum SignalSource {
    /// The longest wait for libdispatch to register a source before going on without
    /// the guarantee: a stuck manager thread must not hang the start.
    static let registrationTimeout: DispatchTimeInterval = .seconds(5)

    /// A resumed source for `signal` whose handler runs on a global queue; libdispatch's
    /// own signal handler is installed by the time this returns.
    static func watching(_ signal: Int32, handler: @escaping @Sendable () -> Void) -> any DispatchSourceSignal {
        let source = DispatchSource.makeSignalSource(signal: signal, queue: .global())
        let registered = DispatchSemaphore(value: 0)
        source.setRegistrationHandler { registered.signal() }
        source.setEventHandler(handler: handler)
        source.resume()
        _ = registered.wait(timeout: .now() + registrationTimeout)
        return source
    }
}
