import Foundation
import Testing
import TestSupport
@testable import TidemarkBackup

/// Tidemark's qcow2 writer and reader against each other and against qemu-img: random
/// layouts of data, zero and unallocated clusters over a backing chain.
@Suite("Backup: qcow2 writer and reader")
struct Qcow2RoundTripTests {
    static let cluster = Int(Qcow2Format.clusterSize)

    /// What one layer does to one cluster.
    enum Layer: Equatable {
        case unallocated
        case zero
        case data([UInt8])
    }

    /// Writes `layers` (per cluster) as a chain in `directory`, in a shuffled order with
    /// multi-cluster writes, and returns the expected raw content at each point.
    static func writeChain(
        _ layers: [[Layer]], size: Int, in directory: BackupDirectory, generator: inout some RandomNumberGenerator
    ) throws -> [[UInt8]] {
        var current = [UInt8](repeating: 0, count: size)
        var expected: [[UInt8]] = []
        for (index, layer) in layers.enumerated() {
            let name = BackupDirectory.imageName(index: index)
            let writer = try Qcow2Writer(
                path: directory.file(name), virtualSize: UInt64(size),
                backingFile: index == 0 ? nil : BackupDirectory.imageName(index: index - 1))
            // Consecutive data clusters are written together, runs in random order.
            var runs: [(start: Int, end: Int)] = []
            var clusterIndex = 0
            while clusterIndex < layer.count {
                guard case .data = layer[clusterIndex] else { clusterIndex += 1; continue }
                var end = clusterIndex + 1
                while end < layer.count, case .data = layer[end], end - clusterIndex < Int.random(in: 1...4, using: &generator) {
                    end += 1
                }
                runs.append((clusterIndex, end))
                clusterIndex = end
            }
            for run in runs.shuffled(using: &generator) {
                var bytes: [UInt8] = []
                for cluster in run.start..<run.end {
                    if case .data(let data) = layer[cluster] { bytes += data }
                }
                try bytes.withUnsafeBytes { try writer.writeData(at: UInt64(run.start * cluster), bytes: $0) }
            }
            for (clusterIndex, state) in layer.enumerated() {
                let start = clusterIndex * cluster
                let end = min(start + cluster, size)
                switch state {
                case .unallocated: break
                case .zero:
                    try writer.markZero(at: UInt64(start), length: UInt64(end - start))
                    current.replaceSubrange(start..<end, with: repeatElement(0, count: end - start))
                case .data(let data):
                    current.replaceSubrange(start..<end, with: data)
                }
            }
            try writer.finish()
            let manifest = BackupManifest(
                index: index, file: name, kind: index == 0 ? .full : .incremental, bitmap: nil, checkpoint: nil,
                created: BackupManifest.timestamp(), virtualSize: UInt64(size), source: "test",
                backingFile: index == 0 ? nil : BackupDirectory.imageName(index: index - 1), bytesCopied: 0,
                bytesZeroed: 0, extents: [])
            try Data(try manifest.encoded()).write(to: URL(fileURLWithPath: directory.file(BackupDirectory.manifestName(index: index))))
            expected.append(current)
        }
        return expected
    }

    /// A random layout: about half unallocated, a sixth zero, a third data (some of it zeroes).
    static func randomLayer(clusters: Int, size: Int, full: Bool, generator: inout some RandomNumberGenerator) -> [Layer] {
        (0..<clusters).map { index in
            let length = min(cluster, size - index * cluster)
            switch Int.random(in: 0..<12, using: &generator) {
            case 0..<6: return full ? .data((0..<length).map { _ in UInt8.random(in: 1...255, using: &generator) }) : .unallocated
            case 6..<8: return .zero
            case 8: return .data([UInt8](repeating: 0, count: length))
            default:
                var data = [UInt8](repeating: 0, count: length)
                for position in stride(from: 0, to: length, by: 512) { data[position] = UInt8.random(in: 1...255, using: &generator) }
                return .data(data)
            }
        }
    }

    @Test("random layouts over a chain of four read back exactly; qemu-img check and compare agree", arguments: [1, 2, 3])
    func randomChains(seed: UInt64) throws {
        var generator = SeededGenerator(seed: seed)
        let size = 40 * Self.cluster + 4608  // a short last cluster (qemu needs whole 512-byte sectors)
        let clusters = (size + Self.cluster - 1) / Self.cluster
        let temporary = try TemporaryDirectory()
        let directory = BackupDirectory(path: temporary.path)
        let layers = (0..<4).map { Self.randomLayer(clusters: clusters, size: size, full: $0 == 0, generator: &generator) }
        let expected = try Self.writeChain(layers, size: size, in: directory, generator: &generator)
        let chain = try directory.chain()
        #expect(chain.count == 4)
        for point in 0..<4 {
            let reader = try ChainReader(directory: directory, chain: chain, point: point)
            #expect(reader.virtualSize == UInt64(size))
            #expect(try reader.read(count: size, at: 0) == expected[point], "point \(point)")
            // Unaligned reads too.
            #expect(try reader.read(count: 70_000, at: 12_345) == Array(expected[point][12_345..<82_345]))
            let image = try Qcow2Image(path: directory.file(chain[point].file))
            for (clusterIndex, state) in layers[point].enumerated() {
                let actual = try image.clusterState(UInt64(clusterIndex))
                switch state {
                case .unallocated: #expect(actual == .unallocated, "cluster \(clusterIndex)")
                case .zero: #expect(actual == .zero, "cluster \(clusterIndex)")
                case .data(let data) where data.allSatisfy({ $0 == 0 }): #expect(actual == .zero, "cluster \(clusterIndex)")
                case .data: if case .data = actual {} else { Issue.record("cluster \(clusterIndex) is \(actual)") }
                }
            }
            let raw = temporary.path + "/expected-\(point).raw"
            try Data(expected[point]).write(to: URL(fileURLWithPath: raw))
            let imagePath = directory.file(chain[point].file)
            try Tools.check("qemu-img", ["check", "-f", "qcow2", imagePath])
            try Tools.check("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", imagePath, raw])
        }
        let info = try Tools.check("qemu-img", ["info", "--output=json", directory.file(chain[3].file)])
        #expect(info.contains("\"backing-filename\": \"backup-0002.qcow2\""), "\(info)")
        #expect(info.contains("\"backing-filename-format\": \"qcow2\""), "\(info)")
    }

    @Test("a disk larger than one L2 table (512 MiB): data in three tables, qemu-img agrees")
    func severalL2Tables() throws {
        let temporary = try TemporaryDirectory()
        let size: UInt64 = 1536 << 20
        let path = temporary.path + "/big.qcow2"
        let writer = try Qcow2Writer(path: path, virtualSize: size, backingFile: nil)
        let offsets: [UInt64] = [0, 600 << 20, size - Qcow2Format.clusterSize]
        for (index, offset) in offsets.enumerated() {
            let data = [UInt8](repeating: UInt8(index + 1), count: Self.cluster)
            try data.withUnsafeBytes { try writer.writeData(at: offset, bytes: $0) }
        }
        try writer.markZero(at: 1 << 30, length: 1 << 20)
        try writer.finish()
        try Tools.check("qemu-img", ["check", "-f", "qcow2", path])
        let image = try Qcow2Image(path: path)
        for (index, offset) in offsets.enumerated() {
            guard case .data(let host) = try image.clusterState(offset / Qcow2Format.clusterSize) else {
                Issue.record("cluster at \(offset) not data")
                continue
            }
            var byte: UInt8 = 0
            try withUnsafeMutableBytes(of: &byte) { try image.readHost(into: $0, at: host + 100) }
            #expect(byte == UInt8(index + 1))
            let read = try Tools.check("qemu-io", ["-f", "qcow2", "-c", "read -P \(index + 1) \(offset) 64k", path])
            #expect(!read.contains("Pattern verification failed"), "\(read)")
        }
        #expect(try image.clusterState((1 << 30) / Qcow2Format.clusterSize) == .zero)
        #expect(try image.clusterState(5) == .unallocated)
    }

    @Test("the reader refuses compressed clusters and encryption with a clear error")
    func refusesUnsupportedFeatures() throws {
        let temporary = try TemporaryDirectory()
        let path = temporary.path + "/one.qcow2"
        let writer = try Qcow2Writer(path: path, virtualSize: 1 << 20, backingFile: nil)
        try [UInt8](repeating: 7, count: Self.cluster).withUnsafeBytes { try writer.writeData(at: 0, bytes: $0) }
        try writer.finish()
        let file = try BackupFile(path: path, flags: O_RDWR)
        let header = try file.read(count: 104, at: 0)
        let l1Offset = BigEndian.get64(header, at: 40)
        let l2Offset = BigEndian.get64(try file.read(count: 8, at: l1Offset), at: 0) & Qcow2Format.offsetMask
        var entry = try file.read(count: 8, at: l2Offset)
        entry[0] |= 0x40  // bit 62: compressed
        try file.write(entry, at: l2Offset)
        #expect(throws: BackupError.unsupportedImageFeature(path: path, feature: "compressed clusters")) {
            try Qcow2Image(path: path).clusterState(0)
        }
        try file.write([0, 0, 0, 1], at: 32)  // crypt_method = AES
        #expect(throws: BackupError.unsupportedImageFeature(path: path, feature: "encryption")) {
            try Qcow2Image(path: path)
        }
        try file.write([0, 0, 0, 0], at: 0)
        #expect(throws: BackupError.self) { try Qcow2Image(path: path) }
    }
}
