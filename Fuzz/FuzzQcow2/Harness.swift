// libFuzzer harness: qcow2 files as restore and verify read them (Qcow2Image, ChainReader)
// and as the server serves them (ChainImage), checked against each other.
//
// Input: [config byte][4-byte salt][4-byte length N][N bytes: backup-0000.qcow2][rest: backup-0001.qcow2].
// With config bit 0 set and a second file, the two form a chain (the second backed by the
// first). Whatever the header, L1/L2 tables, flags or backing names say: no trap, no
// allocation beyond what the file's size can justify (run with -malloc_limit_mb), cluster
// lookups and reads within the disk either succeed or throw, reads outside it throw.
import FuzzSupport

import TidemarkBackup

#if canImport(Glibc)
import Glibc
#endif

let directory: String = {
    var template = Array("/tmp/tidemark-fuzz-qcow2-XXXXXX".utf8CString)
    guard let path = mkdtemp(&template) else { fail("mkdtemp") }
    return String(cString: path)
}()

func write(_ bytes: [UInt8], to name: String) {
    let fd = open(directory + "/" + name, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
    require(fd >= 0, "cannot create \(name)")
    bytes.withUnsafeBytes { raw in _ = Glibc.write(fd, raw.baseAddress, raw.count) }
    close(fd)
}

func manifest(_ index: Int, _ image: Qcow2Image) -> BackupManifest {
    BackupManifest(
        index: index, file: BackupDirectory.imageName(index: index), kind: index == 0 ? .full : .incremental,
        bitmap: nil, checkpoint: nil, created: "", virtualSize: image.virtualSize, source: "fuzz",
        backingFile: image.backingFile, bytesCopied: 0, bytesZeroed: 0, extents: [])
}

/// Offsets worth reading: the start, cluster edges, the middle and the end of the disk.
func probes(_ size: UInt64, _ cluster: UInt64, _ salt: UInt64) -> [UInt64] {
    guard size > 0 else { return [] }
    let candidates = [0, cluster - 1, cluster, size / 2, size - 1, salt % size, (salt >> 17) % size]
    return candidates.filter { $0 < size }
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ start: UnsafeRawPointer, _ count: Int) -> CInt {
    fuzz(UnsafeRawBufferPointer(start: start, count: count))
    return 0
}

func fuzz(_ buffer: UnsafeRawBufferPointer) {
    var input = FuzzInput(buffer)
    let config = input.byte()
    let salt = UInt64(input.u32())
    let first = input.take(Int(input.u32()))
    let second = input.rest()
    let layered = config & 1 != 0 && !second.isEmpty
    write(first, to: BackupDirectory.imageName(index: 0))
    if layered { write(second, to: BackupDirectory.imageName(index: 1)) }

    var images: [Qcow2Image] = []
    for index in 0...(layered ? 1 : 0) {
        guard let image = try? Qcow2Image(path: directory + "/" + BackupDirectory.imageName(index: index)) else { return }
        require(image.clusterSize >= 512 && image.clusterSize <= 2 << 20 && image.clusterSize & (image.clusterSize - 1) == 0,
                "cluster size \(image.clusterSize)")
        require((image.backingFile?.utf8.count ?? 0) <= 1023, "backing name too long")
        let clusters = image.virtualSize / image.clusterSize + 1
        for probe in probes(image.virtualSize, image.clusterSize, salt) {
            _ = try? image.clusterState(probe / image.clusterSize)
        }
        _ = try? image.clusterState(clusters + 1)
        _ = try? image.clusterState(UInt64.max / image.clusterSize)
        images.append(image)
    }

    let chain = images.indices.map { manifest($0, images[$0]) }
    guard let reader = try? ChainReader(directory: BackupDirectory(path: directory), chain: chain, point: chain.count - 1)
    else { return }
    let size = reader.virtualSize
    for offset in probes(size, reader.clusterSize, salt) {
        let count = Int(min(UInt64(4096 + 512), size - offset))
        _ = try? reader.read(count: count, at: offset)
    }
    let clusters = reader.clusterCount
    if clusters > 0 {
        for cluster in [0, clusters - 1, salt % clusters] { _ = try? reader.source(ofCluster: cluster) }
    }
    // Reads past the end must be refused, not wrap around.
    require((try? reader.read(count: 1, at: size)) == nil, "read at the end succeeded")
    require((try? reader.read(count: 16, at: UInt64.max - 8)) == nil, "read past UInt64.max succeeded")

    // The server's reader of the same files (merged tables, bounds-checked lazily): where
    // both read, they agree; its map never overruns the range; no trap either way.
    guard let served = try? ChainImage(layers: images) else { return }
    require(served.size == size, "ChainImage size \(served.size), ChainReader \(size)")
    for offset in probes(size, served.clusterSize, salt) {
        let count = Int(min(UInt64(4096 + 512), size - offset))
        var bytes = [UInt8](repeating: 0, count: count)
        let read = (try? bytes.withUnsafeMutableBytes { try served.read(into: $0, at: offset) }) != nil
        if read, let expected = try? reader.read(count: count, at: offset) {
            require(bytes == expected, "ChainImage and ChainReader disagree at \(offset)")
        }
        let extents = served.allocationExtents(at: offset, length: UInt64(count), maxExtents: 8)
        require(extents.count <= 8 && extents.reduce(0) { $0 + $1.length } <= UInt64(count), "map overruns \(offset)+\(count)")
    }
    var byte: UInt8 = 0
    require((try? withUnsafeMutableBytes(of: &byte) { try served.read(into: $0, at: size) }) == nil, "served read at the end")
}
