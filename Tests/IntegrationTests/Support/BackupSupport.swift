import Foundation
import NBDClient
import Testing
import TidemarkBackup

/// Helpers for the backup tests: random changes through libnbd, snapshots of an export,
/// and the checks every chain must pass (restore byte-identical, qemu-img check, qemu-img
/// compare against qemu-img convert, tidemark verify).
enum BackupChecks {
    /// Random writes, write-zeroes and trims through libnbd; returns what was done, for
    /// failure messages. Offsets and lengths are 512-byte aligned, some of them not
    /// cluster aligned, so partly changed clusters are exercised.
    @discardableResult
    static func mutate(
        _ connection: NBDConnection, size: UInt64, operations: Int, generator: inout some RandomNumberGenerator
    ) throws -> [String] {
        var log: [String] = []
        for _ in 0..<operations {
            let length = UInt64(Int.random(in: 1...512, using: &generator) * 512)
            let offset = UInt64.random(in: 0..<(size - length) / 512, using: &generator) * 512
            switch Int.random(in: 0..<6, using: &generator) {
            case 0..<4:
                let seed = UInt8.random(in: 0...254, using: &generator)
                try connection.pwrite(ImageFile.pattern(count: Int(length), offset: Int(offset), seed: seed), offset: offset)
                log.append("write \(offset)+\(length)")
            case 4:
                try connection.zero(count: length, offset: offset)
                log.append("zero \(offset)+\(length)")
            default:
                try connection.trim(count: length, offset: offset)
                log.append("trim \(offset)+\(length)")
            }
        }
        try connection.flush()
        return log
    }

    /// The whole export as a file `path` (read through NBD, as the backup sees it).
    static func snapshot(_ connection: NBDConnection, to path: String) throws {
        let size = try connection.size
        guard FileManager.default.createFile(atPath: path, contents: nil), let handle = FileHandle(forWritingAtPath: path) else {
            throw HarnessError("cannot create \(path)")
        }
        defer { try? handle.close() }
        var offset: UInt64 = 0
        while offset < size {
            let count = Int(min(4 << 20, size - offset))
            handle.write(Data(try connection.pread(count: count, offset: offset)))
            offset += UInt64(count)
        }
    }

    /// Every point of the chain in `directory` against `expected[i]`: `tidemark restore`
    /// byte-identical, `qemu-img check` clean, `qemu-img compare` of the restore with
    /// `qemu-img convert` of the same chain point; then `tidemark verify` passes.
    static func checkChain(_ directory: String, expected: [String], scratch: TestDirectory) throws {
        let chain = try BackupDirectory(path: directory).chain()
        #expect(chain.count == expected.count, "chain length")
        for (index, manifest) in chain.enumerated() where index < expected.count {
            let restored = scratch.file("restored-\(index).raw")
            try ControlPrograms.tidemark(["restore", directory, "--at", String(index), restored]).requireSuccess()
            let differing = try BitmapImages.differingGranules(restored, expected[index], granule: 65536)
            #expect(differing.isEmpty, "point \(index): restore differs from the source in 64 KiB blocks \(differing.prefix(10))")
            #expect(try ImageFile.size(restored) == ImageFile.size(expected[index]))
            let image = directory + "/" + manifest.file
            try ExternalTool.check("qemu-img", ["check", "-f", "qcow2", image])
            let converted = scratch.file("converted-\(index).raw")
            try ExternalTool.check("qemu-img", ["convert", "-f", "qcow2", "-O", "raw", image, converted])
            try ExternalTool.check("qemu-img", ["compare", "-f", "raw", "-F", "raw", restored, converted])
        }
        let verify = try ControlPrograms.tidemark(["verify", directory])
        #expect(verify.succeeded, "tidemark verify: \(verify)")
    }

    /// Runs `tidemark backup …` with `--json` and returns the summary.
    static func backup(_ arguments: [String]) throws -> [String: Any] {
        let result = try ControlPrograms.tidemark(["backup"] + arguments + ["--json"], timeout: 300)
        try result.requireSuccess()
        guard let object = try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any] else {
            throw HarnessError("backup --json printed no object: \(result)")
        }
        return object
    }
}

extension ToolResult {
    /// Throws with the output when the program failed.
    func requireSuccess() throws {
        guard succeeded else { throw HarnessError(description) }
    }
}

