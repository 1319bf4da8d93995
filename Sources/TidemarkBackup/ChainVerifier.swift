import Foundation

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

    public func run() throws(BackupError) -> Report {
        let backups = BackupDirectory(path: directory)
        let chain = try backups.chain()
        guard !chain.isEmpty else { throw BackupError.noChain(directory: directory) }
        var report = Report(
            backups: chain.count, extentsChecked: 0, bytesChecked: 0, problems: [], qemuImgChecked: [],
            qemuImgAvailable: false)
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

    /// Runs a tool and returns its status and combined output.
    static func runTool(_ executable: String, _ arguments: [String]) -> (Int32, String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        process.standardInput = FileHandle.nullDevice
        do {
            try process.run()
        } catch {
            return (-1, "cannot run \(executable): \(error)")
        }
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return (process.terminationStatus, String(decoding: data, as: UTF8.self))
    }
}
