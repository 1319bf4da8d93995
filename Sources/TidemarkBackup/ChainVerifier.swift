import FoundationEssentials

#if canImport(Glibc)
import Glibc
#endif

/// Re-reads a backup chain and checks it against its manifests: every data extent's
/// XXH64, every zero extent reads as zeroes, each at the chain point where it was
/// recorded; and `qemu-img check` on every file when `qemu-img` is installed.
///
/// Why at each point and not only at the end: a later backup legitimately overwrites
/// earlier data, so an extent is only expected to match through the chain as it stood
/// when that extent was written.
public struct ChainVerifier: Sendable {
    /// The verdict on a chain.
    public struct Report: Sendable, Codable, Equatable {
        public var backups: Int
        public var extentsChecked: Int
        public var bytesChecked: UInt64
        /// One line per mismatch or failed check; empty when the chain is good.
        public var problems: [String]
        /// Files `qemu-img check` passed.
        public var qemuImgChecked: [String]
        /// False when `qemu-img` is not installed (its check was skipped).
        public var qemuImgAvailable: Bool

        public var isGood: Bool { problems.isEmpty }
    }

    public let directory: String

    public init(directory: String) {
        self.directory = directory
    }

    /// Checkpoint links: an incremental backup taken through `--control` must start at
    /// the checkpoint of the backup before it, or the chain misses the changes between.
    public static func linkProblems(_ chain: [BackupManifest]) -> [String] {
        var problems: [String] = []
        for (previous, manifest) in zip(chain, chain.dropFirst()) where manifest.kind == .incremental {
            guard manifest.checkpointID != nil else { continue }
            guard let previousID = previous.checkpointID, manifest.startsAt(checkpointID: previousID) else {
                problems.append(
                    "\(manifest.file): its increment does not start at the checkpoint of \(previous.file) "
                        + "(\(previous.checkpoint ?? "none")): changes between them may be missing from the chain")
                continue
            }
        }
        return problems
    }

    public func run() throws(BackupError) -> Report {
        let backups = BackupDirectory(path: directory)
        let chain = try backups.chain()
        guard !chain.isEmpty else { throw BackupError.noChain(directory: directory) }
        var report = Report(
            backups: chain.count, extentsChecked: 0, bytesChecked: 0, problems: [], qemuImgChecked: [],
            qemuImgAvailable: false)
        report.problems += Self.linkProblems(chain)
        for manifest in chain {
            let reader: ChainReader
            do {
                reader = try ChainReader(directory: backups, chain: chain, point: manifest.index)
            } catch {
                report.problems.append("\(manifest.file): \(error)")
                continue
            }
            for extent in manifest.extents {
                guard extent.offset + extent.length <= reader.virtualSize, extent.length <= 1 << 30 else {
                    report.problems.append("\(manifest.file): extent \(extent.offset)+\(extent.length) is outside the disk")
                    continue
                }
                let bytes: [UInt8]
                do {
                    bytes = try reader.read(count: Int(extent.length), at: extent.offset)
                } catch {
                    report.problems.append("\(manifest.file): cannot read \(extent.offset)+\(extent.length): \(error)")
                    continue
                }
                report.extentsChecked += 1
                report.bytesChecked += extent.length
                switch extent.content {
                case .zero:
                    if bytes.contains(where: { $0 != 0 }) {
                        report.problems.append("\(manifest.file): zero extent \(extent.offset)+\(extent.length) holds data")
                    }
                case .data:
                    let actual = ContentHash.hex(ContentHash.xxh64(bytes))
                    if actual != extent.xxh64 {
                        report.problems.append(
                            "\(manifest.file): extent \(extent.offset)+\(extent.length) has xxh64 \(actual), "
                                + "the manifest says \(extent.xxh64 ?? "none")")
                    }
                }
            }
        }
        if let qemuImg = Self.locate("qemu-img") {
            report.qemuImgAvailable = true
            for manifest in chain {
                let path = backups.file(manifest.file)
                let (status, output) = Self.runTool(qemuImg, ["check", "-f", "qcow2", path])
                if status == 0 {
                    report.qemuImgChecked.append(manifest.file)
                } else {
                    report.problems.append("qemu-img check \(manifest.file) exited \(status): \(output)")
                }
            }
        }
        return report
    }

    /// `name` on PATH or in /usr/bin, if executable.
    static func locate(_ name: String) -> String? {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? ""
        for directory in path.split(separator: ":").map(String.init) + ["/usr/bin", "/bin"] {
            let candidate = directory + "/" + name
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        return nil
    }

    /// Runs a tool (stdin from /dev/null) and returns its exit status, or -1 when it could
    /// not run or was killed, and its combined output.
    static func runTool(_ executable: String, _ arguments: [String]) -> (Int32, String) {
        var pipeEnds: [Int32] = [0, 0]
        guard pipe(&pipeEnds) == 0 else { return (-1, "cannot create a pipe: \(String(cString: strerror(errno)))") }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_adddup2(&actions, pipeEnds[1], 1)
        posix_spawn_file_actions_adddup2(&actions, pipeEnds[1], 2)
        posix_spawn_file_actions_addclose(&actions, pipeEnds[0])
        posix_spawn_file_actions_addclose(&actions, pipeEnds[1])
        let argv: [UnsafeMutablePointer<CChar>?] = ([executable] + arguments).map { strdup($0) } + [nil]
        defer { for argument in argv { free(argument) } }
        var pid = pid_t()
        let spawned = posix_spawn(&pid, executable, &actions, nil, argv, environ)
        close(pipeEnds[1])
        guard spawned == 0 else {
            close(pipeEnds[0])
            return (-1, "cannot run \(executable): \(String(cString: strerror(spawned)))")
        }
        var output: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let count = chunk.withUnsafeMutableBytes { read(pipeEnds[0], $0.baseAddress, $0.count) }
            if count > 0 {
                output += chunk[0..<count]
            } else if count < 0 && errno == EINTR {
                continue
            } else {
                break
            }
        }
        close(pipeEnds[0])
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        // WIFEXITED / WEXITSTATUS, which Swift does not import.
        let exited = status & 0x7f == 0
        return (exited ? (status >> 8) & 0xff : -1, String(decoding: output, as: UTF8.self))
    }
}
