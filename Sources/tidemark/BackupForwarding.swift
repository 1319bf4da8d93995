import ArgumentParser
import CLinuxIO

#if canImport(Glibc)
import Glibc
#endif

/// `tidemark backup|restore|verify` run the `tidemark-backup` executable installed beside
/// this one (or found on PATH). The backup client links libnbd and the server does not, so
/// a captive `tidemark serve` (nbdcopy's `[ CMD ]`) starts without loading it.
enum BackupForwarding {
    static let executableName = "tidemark-backup"
    static let commands: Set<String> = ["backup", "restore", "verify"]

    /// Replaces this process with `tidemark-backup` when `arguments` name one of its
    /// commands (or ask for help on one); returns otherwise.
    static func execIfRequested(_ arguments: [String]) {
        let operands = Array(arguments.dropFirst())
        guard let first = operands.first else { return }
        let forwarded = commands.contains(first) || (first == "help" && operands.count > 1 && commands.contains(operands[1]))
        guard forwarded else { return }
        let argv = ([executableName] + operands).map { strdup($0) } + [nil]
        if let sibling = siblingPath() { execv(sibling, argv) }
        execvp(executableName, argv)
        let reason = String(cString: strerror(errno))
        var message = "tidemark: cannot run \(executableName) (install it beside tidemark or on PATH): \(reason)\n"
        _ = message.withUTF8 { clinuxio_write_all(2, $0.baseAddress, $0.count) }
        exit(127)
    }

    /// `tidemark-backup` in the directory of the running executable.
    private static func siblingPath() -> String? {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let length = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        guard length > 0 else { return nil }
        let path = String(decoding: buffer[..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        guard let slash = path.lastIndex(of: "/") else { return nil }
        return String(path[...slash]) + executableName
    }
}

/// `tidemark backup`, listed in `tidemark --help`; it runs in `tidemark-backup`.
struct BackupCommandListing: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "backup", abstract: "Pull a full or incremental backup from an NBD server into a qcow2 chain.")
}

/// `tidemark restore`, listed in `tidemark --help`; it runs in `tidemark-backup`.
struct RestoreCommandListing: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "restore", abstract: "Write the disk as a backup chain holds it at one point to a raw image or an NBD export.")
}

/// `tidemark verify`, listed in `tidemark --help`; it runs in `tidemark-backup`.
struct VerifyCommandListing: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify", abstract: "Check every backup of a chain against its manifest (and with qemu-img check when installed).")
}
