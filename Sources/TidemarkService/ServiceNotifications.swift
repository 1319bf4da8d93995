import Logging
import Synchronization

/// What `tidemark serve` tells the service manager, and when: `READY=1` once every
/// listener is bound, `STATUS=` lines, `WATCHDOG=1` at half the watchdog timeout, and
/// `STOPPING=1` when a graceful stop begins.
///
/// Everything is a no-op when `NOTIFY_SOCKET` is unset, so the server runs the same under
/// a terminal, nbdcopy or systemd. A failed send is logged once, never fatal: the service
/// manager's own timeouts are the judge of a server that cannot report.
public final class ServiceNotifications: Sendable {
    private let notifier: ServiceNotifier?
    public let watchdog: WatchdogSettings?
    private let logger: Logger
    private let sendFailed = Atomic<Bool>(false)
    private let lastStatus = Mutex<String?>(nil)

    public init(notifier: ServiceNotifier?, watchdog: WatchdogSettings?, logger: Logger) {
        self.notifier = notifier
        self.watchdog = notifier == nil ? nil : watchdog
        self.logger = logger
    }

    /// Reads (and clears) `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`.
    public static func fromEnvironment(logger: Logger) -> ServiceNotifications {
        let watchdog = WatchdogSettings.fromEnvironment()
        do {
            let notifier = try ServiceNotifier.fromEnvironment()
            return ServiceNotifications(notifier: notifier, watchdog: watchdog, logger: logger)
        } catch {
            logger.warning("not notifying the service manager: \(error)", metadata: ["event": "notify.failed"])
            return ServiceNotifications(notifier: nil, watchdog: nil, logger: logger)
        }
    }

    /// Whether a service manager listens.
    public var isEnabled: Bool { notifier != nil }

    /// The server accepts clients.
    public func ready(status: String) {
        lastStatus.withLock { $0 = status }
        send(["READY=1", "STATUS=" + status])
    }

    /// A graceful stop has begun.
    public func stopping(status: String) {
        lastStatus.withLock { $0 = status }
        send(["STOPPING=1", "STATUS=" + status])
    }

    /// Sends `WATCHDOG=1` (when the manager asked for a watchdog) and the status returned
    /// by `status` (when it changed) every half watchdog timeout, or every
    /// `statusInterval` without a watchdog, until the task is cancelled.
    public func keepReporting(statusInterval: Duration = .seconds(5), status: @Sendable () -> String?) async {
        guard notifier != nil else { return }
        let interval: Duration =
            watchdog.map { .nanoseconds(Int64(clamping: $0.pingIntervalNanoseconds)) } ?? statusInterval
        while !Task.isCancelled {
            do {
                try await Task.sleep(for: interval)
            } catch {
                return
            }
            var assignments: [String] = []
            if watchdog != nil { assignments.append("WATCHDOG=1") }
            if let current = status() {
                let changed = lastStatus.withLock { last in
                    defer { last = current }
                    return last != current
                }
                if changed { assignments.append("STATUS=" + current) }
            }
            if !assignments.isEmpty { send(assignments) }
        }
    }

    private func send(_ assignments: [String]) {
        guard let notifier else { return }
        do {
            try notifier.send(assignments)
            if sendFailed.exchange(false, ordering: .relaxed) {
                logger.info("notifying the service manager works again", metadata: ["event": "notify.recovered"])
            }
        } catch {
            if !sendFailed.exchange(true, ordering: .relaxed) {
                logger.warning(
                    "notifying the service manager at \(notifier.address) failed: \(error)",
                    metadata: ["event": "notify.failed"])
            }
        }
    }
}
