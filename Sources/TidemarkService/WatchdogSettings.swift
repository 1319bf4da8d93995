#if canImport(Glibc)
import Glibc
#endif

/// The service manager's watchdog, as `WATCHDOG_USEC` and `WATCHDOG_PID` describe it
/// (sd_watchdog_enabled(3)): the process must send `WATCHDOG=1` more often than every
/// `WATCHDOG_USEC` microseconds, or it is considered hung and restarted.
public struct WatchdogSettings: Sendable, Equatable {
    /// The manager's timeout, in microseconds.
    public let timeoutMicroseconds: UInt64

    public init(timeoutMicroseconds: UInt64) {
        self.timeoutMicroseconds = timeoutMicroseconds
    }

    /// Half the timeout, as sd_watchdog_enabled(3) recommends: one late ping is not yet fatal.
    public var pingIntervalNanoseconds: UInt64 { timeoutMicroseconds * 1000 / 2 }

    /// The watchdog asked of this process, or nil: unset, zero, unparsable, or meant for
    /// another process (`WATCHDOG_PID` names a different pid; unset means this one).
    public static func parse(usec: String?, pid: String?, ownPID: Int32) -> WatchdogSettings? {
        guard let usec, let timeout = UInt64(usec), timeout > 0 else { return nil }
        if let pid, !pid.isEmpty {
            guard let target = Int32(pid), target == ownPID else { return nil }
        }
        return WatchdogSettings(timeoutMicroseconds: timeout)
    }

    /// Reads and clears `WATCHDOG_USEC` / `WATCHDOG_PID` (children must not inherit them).
    public static func fromEnvironment() -> WatchdogSettings? {
        let usec = getenv("WATCHDOG_USEC").map { String(cString: $0) }
        let pid = getenv("WATCHDOG_PID").map { String(cString: $0) }
        unsetenv("WATCHDOG_USEC")
        unsetenv("WATCHDOG_PID")
        return parse(usec: usec, pid: pid, ownPID: getpid())
    }
}
