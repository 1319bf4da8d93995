#if canImport(Glibc)
import Glibc
#endif

/// The process's file descriptor limit, and how many client connections fit in it.
///
/// systemd starts services with a soft `RLIMIT_NOFILE` of 1024 (hard 524288). With the
/// default cap of 1024 connections the descriptors run out first: `accept` then fails
/// with EMFILE, the kernel keeps the client in the backlog, and it waits without a word.
/// So the server raises its soft limit to the hard one (always allowed), and lowers the
/// connection cap to what fits, keeping ``reserve`` descriptors (beyond those open when it
/// starts) for what the server opens later: point-in-time view sidecars, bitmap journals
/// and stores of exports added over QMP, control clients, the metrics endpoint, files of
/// the I/O pool. A refused client is then closed at once instead of hanging.
public struct DescriptorLimit: Sendable, Equatable {
    /// Descriptors kept free beyond those open at start (see the type's comment).
    public static let reserve = 32

    /// The soft limit after ``raiseSoftLimit()``.
    public let soft: UInt64
    /// The hard limit.
    public let hard: UInt64
    /// The soft limit found at start, before raising it.
    public let originalSoft: UInt64

    /// Raises the soft limit to the hard one (capped at `nr_open`, which `setrlimit`
    /// refuses to exceed) and reports both. Failure keeps the old limit.
    public static func raiseSoftLimit() -> DescriptorLimit {
        var limits = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limits) == 0 else {
            return DescriptorLimit(soft: 1024, hard: 1024, originalSoft: 1024)
        }
        let original = UInt64(limits.rlim_cur)
        var target = limits.rlim_max
        if target == rlim_t.max, let open = Self.kernelMaximum() { target = rlim_t(open) }
        if target > limits.rlim_cur {
            var raised = limits
            raised.rlim_cur = target
            if setrlimit(Int32(RLIMIT_NOFILE.rawValue), &raised) == 0 { limits = raised }
        }
        return DescriptorLimit(soft: UInt64(limits.rlim_cur), hard: UInt64(limits.rlim_max), originalSoft: original)
    }

    /// The limits as they are now.
    public static func current() -> DescriptorLimit {
        var limits = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limits) == 0 else {
            return DescriptorLimit(soft: 1024, hard: 1024, originalSoft: 1024)
        }
        return DescriptorLimit(
            soft: UInt64(limits.rlim_cur), hard: UInt64(limits.rlim_max), originalSoft: UInt64(limits.rlim_cur))
    }

    /// `/proc/sys/fs/nr_open`: the most any process may have open.
    private static func kernelMaximum() -> UInt64? {
        guard let file = fopen("/proc/sys/fs/nr_open", "r") else { return nil }
        defer { fclose(file) }
        var line = [CChar](repeating: 0, count: 32)
        guard fgets(&line, Int32(line.count), file) != nil else { return nil }
        let text = String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return UInt64(text.filter { $0 != "\n" && $0 != " " })
    }

    /// Descriptors open in this process now (entries of `/proc/self/fd`, less the one
    /// used to list them).
    public static func openCount() -> Int {
        guard let directory = opendir("/proc/self/fd") else { return 0 }
        defer { closedir(directory) }
        var count = 0
        while let entry = readdir(directory) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { bytes in bytes.first }
            if name != UInt8(ascii: ".") { count += 1 }
        }
        return max(0, count - 1)
    }

    /// The connection cap that fits: at most `requested`, and at most what is left of the
    /// soft limit after the `openNow` descriptors and ``reserve``; at least 1.
    public func connectionCap(requested: Int, openNow: Int) -> Int {
        let available = Int(clamping: soft) - openNow - Self.reserve
        return max(1, min(requested, available))
    }
}
