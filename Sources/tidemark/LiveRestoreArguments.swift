import ArgumentParser

#if canImport(Glibc)
import Glibc
#endif

/// `tidemark restore --live SOURCE TARGET [--rate BYTES/S] [serve options]`: a live
/// restore is a server (it serves TARGET at once while the copy runs), so it runs as
/// `tidemark serve` with the live-restore options instead of being forwarded to the backup
/// client like an offline restore.
enum LiveRestoreArguments {
    static let usage = "usage: tidemark restore --live DIR[@POINT] TARGET [--rate BYTES_PER_SECOND] [--state-dir DIR (a block device's progress and bitmaps; default /var/lib/tidemark)] [serve options: --unix, --name, --control, …]"

    /// The `serve` arguments for `arguments` (argv without the program) when they ask for
    /// a live restore; nil otherwise.
    static func serveArguments(_ arguments: [String]) throws -> [String]? {
        guard arguments.first == "restore", arguments.contains("--live") else { return nil }
        var operands = Array(arguments.dropFirst())
        operands.removeAll { $0 == "--live" }
        guard operands.count >= 2, !operands[0].hasPrefix("-"), !operands[1].hasPrefix("-") else {
            throw ValidationError(usage)
        }
        var serve = ["serve", "--live-restore", operands[0], "--live-restore-target", operands[1]]
        if isatty(2) != 0 && !operands.contains("--progress") { serve.append("--progress") }
        return serve + operands.dropFirst(2)
    }

    /// `200M`, `1G`, `4096`: bytes per second (K, M, G, T: powers of 1024).
    static func parseRate(_ text: String) -> UInt64? {
        guard let last = text.last else { return nil }
        let shifts: [Character: UInt64] = ["K": 10, "M": 20, "G": 30, "T": 40, "k": 10, "m": 20, "g": 30, "t": 40]
        let (digits, shift) = shifts[last].map { (String(text.dropLast()), $0) } ?? (text, 0)
        guard let value = UInt64(digits), value > 0, value <= UInt64.max >> shift else { return nil }
        return value << shift
    }
}
