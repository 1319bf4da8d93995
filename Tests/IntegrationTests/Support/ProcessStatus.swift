import Foundation

/// What `/proc/PID/status` and `/proc/PID/limits` say about a process: the memory and
/// descriptor figures the resource-bound tests assert on.
enum ProcessStatus {
    /// Resident set size in bytes (`VmRSS`).
    static func residentBytes(of pid: Int32) throws -> Int {
        try statusBytes("VmRSS", of: pid)
    }

    /// The highest resident set size the process has had (`VmHWM`), in bytes: a peak no
    /// sampling can miss.
    static func peakResidentBytes(of pid: Int32) throws -> Int {
        try statusBytes("VmHWM", of: pid)
    }

    private static func statusBytes(_ field: String, of pid: Int32) throws -> Int {
        let status = try String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)
        guard let line = status.split(separator: "\n").first(where: { $0.hasPrefix(field + ":") }),
            let kib = line.split(separator: " ").compactMap({ Int($0) }).first
        else { throw HarnessError("no \(field) in /proc/\(pid)/status") }
        return kib * 1024
    }

    /// Whether the process has a handler installed for `signal` (`SigCgt`).
    static func catches(_ signal: Int32, pid: Int32) throws -> Bool {
        try signalMask("SigCgt", of: pid) & (UInt64(1) << UInt64(signal - 1)) != 0
    }

    /// Whether the process ignores `signal` (`SigIgn`): one sent now would be lost.
    static func ignores(_ signal: Int32, pid: Int32) throws -> Bool {
        try signalMask("SigIgn", of: pid) & (UInt64(1) << UInt64(signal - 1)) != 0
    }

    private static func signalMask(_ field: String, of pid: Int32) throws -> UInt64 {
        let status = try String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)
        guard let line = status.split(separator: "\n").first(where: { $0.hasPrefix(field + ":") }),
            let mask = UInt64(line.dropFirst(field.count + 1).trimmingCharacters(in: .whitespaces), radix: 16)
        else { throw HarnessError("no \(field) in /proc/\(pid)/status") }
        return mask
    }

    /// The processes whose parent is `pid` (from `/proc/*/stat`).
    static func children(of pid: Int32) -> [Int32] {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
        return entries.compactMap { entry -> Int32? in
            guard let child = Int32(entry),
                let stat = try? String(contentsOfFile: "/proc/\(entry)/stat", encoding: .utf8),
                // The command name may hold spaces and parentheses: fields follow the last ")".
                let close = stat.lastIndex(of: ")")
            else { return nil }
            let fields = stat[stat.index(after: close)...].split(separator: " ")
            guard fields.count > 1, Int32(fields[1]) == pid else { return nil }
            return child
        }
    }

    /// The soft and hard `Max open files` limits.
    static func openFileLimits(of pid: Int32) throws -> (soft: Int, hard: Int) {
        let limits = try String(contentsOfFile: "/proc/\(pid)/limits", encoding: .utf8)
        guard let line = limits.split(separator: "\n").first(where: { $0.hasPrefix("Max open files") }) else {
            throw HarnessError("no 'Max open files' in /proc/\(pid)/limits")
        }
        let numbers = line.split(separator: " ").compactMap { Int($0) }
        guard numbers.count >= 2 else { throw HarnessError("cannot parse '\(line)'") }
        return (numbers[0], numbers[1])
    }

    /// Samples the RSS every 20 ms on a thread of its own until ``stop()``; keeps the peak.
    final class PeakSampler: @unchecked Sendable {
        private let lock = NSLock()
        private var peak = 0
        private var running = true
        private let done = DispatchSemaphore(value: 0)

        init(pid: Int32) {
            Thread.detachNewThread { [self] in
                while true {
                    lock.lock()
                    let go = running
                    lock.unlock()
                    guard go else { break }
                    if let rss = try? ProcessStatus.residentBytes(of: pid) {
                        lock.lock()
                        peak = max(peak, rss)
                        lock.unlock()
                    }
                    usleep(20_000)
                }
                done.signal()
            }
        }

        /// The peak so far.
        var value: Int {
            lock.lock()
            defer { lock.unlock() }
            return peak
        }

        /// Stops sampling and returns the peak.
        func stop() -> Int {
            lock.lock()
            running = false
            lock.unlock()
            done.wait()
            return value
        }
    }
}

/// Bytes as MiB with one decimal, for messages.
func mib(_ bytes: Int) -> String {
    String(format: "%.1f MiB", Double(bytes) / 1_048_576)
}
