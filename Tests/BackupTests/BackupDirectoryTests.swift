import Foundation
import Testing
@testable import TidemarkBackup

/// Manifests and the backup directory: encoding, the chain, debris cleanup, `--at`.
@Suite("Backup: manifest and directory")
struct BackupDirectoryTests {
    static func manifest(_ index: Int, checkpoint: String? = nil) -> BackupManifest {
        BackupManifest(
            index: index, file: BackupDirectory.imageName(index: index), kind: index == 0 ? .full : .incremental,
            bitmap: "b0", checkpoint: checkpoint, created: BackupManifest.timestamp(), virtualSize: 1 << 20,
            source: "nbd+unix:///disk?socket=/tmp/s", backingFile: index == 0 ? nil : BackupDirectory.imageName(index: index - 1),
            bytesCopied: 65536, bytesZeroed: 0,
            extents: [.init(offset: 0, length: 65536, content: .data, xxh64: "0123456789abcdef"), .init(offset: 65536, length: 65536, content: .zero)])
    }

    static func write(_ manifest: BackupManifest, in directory: BackupDirectory) throws {
        try Data(try manifest.encoded()).write(
            to: URL(fileURLWithPath: directory.file(BackupDirectory.manifestName(index: manifest.index))))
    }

    @Test("a manifest survives encoding and decoding")
    func manifestRoundTrip() throws {
        let temporary = try TemporaryDirectory()
        let directory = BackupDirectory(path: temporary.path)
        let original = Self.manifest(1, checkpoint: "c1")
        try Self.write(original, in: directory)
        #expect(try BackupManifest.load(path: directory.file("backup-0001.json")) == original)
        let text = try String(contentsOfFile: directory.file("backup-0001.json"), encoding: .utf8)
        #expect(text.contains("\"backingFile\" : \"backup-0000.qcow2\""))
    }

    @Test("the chain is the run of manifests from 0000; debris past it is removed; --at resolves")
    func chainAndDebris() throws {
        let temporary = try TemporaryDirectory()
        let directory = BackupDirectory(path: temporary.path)
        try Self.write(Self.manifest(0), in: directory)
        try Self.write(Self.manifest(1, checkpoint: "c1"), in: directory)
        for name in ["backup-0002.qcow2.partial", "backup-0002.json.partial", "backup-0002.qcow2", "backup-0001.qcow2", "notes.txt"] {
            FileManager.default.createFile(atPath: directory.file(name), contents: Data())
        }
        let chain = try directory.chain()
        #expect(chain.map(\.index) == [0, 1])
        let removed = try directory.removeDebris(chainLength: chain.count)
        #expect(removed == ["backup-0002.json.partial", "backup-0002.qcow2", "backup-0002.qcow2.partial"])
        #expect(FileManager.default.fileExists(atPath: directory.file("backup-0001.qcow2")))
        #expect(FileManager.default.fileExists(atPath: directory.file("notes.txt")))
        #expect(try directory.point(nil, in: chain) == 1)
        #expect(try directory.point("0", in: chain) == 0)
        #expect(try directory.point("c1", in: chain) == 1)
        #expect(try directory.point("backup-0000.qcow2", in: chain) == 0)
        #expect(throws: BackupError.self) { try directory.point("c9", in: chain) }
    }

    @Test("a manifest whose backing file breaks the chain is refused")
    func brokenChain() throws {
        let temporary = try TemporaryDirectory()
        let directory = BackupDirectory(path: temporary.path)
        try Self.write(Self.manifest(0), in: directory)
        var broken = Self.manifest(1)
        broken.backingFile = "elsewhere.qcow2"
        try Self.write(broken, in: directory)
        #expect(throws: BackupError.self) { try directory.chain() }
    }
}
