import Dispatch
import FoundationEssentials
import NBDClient
import Synchronization

/// Copies the planned ranges from the server into a ``Qcow2Writer`` with many reads in
/// flight, over one or several connections, hashing each range for the manifest.
///
/// Why a window of asynchronous reads: one synchronous read at a time leaves the link idle
/// for a round trip per request and cannot approach `nbdcopy`'s throughput. Each
/// connection keeps `window` reads of up to `requestSize` bytes in flight (libnbd's
/// `nbd_aio_pread`), takes each as it completes, stores and hashes it, and submits the
/// next. With several connections, each runs that loop on its own thread, taking requests
/// from a shared counter; the writer is thread-safe.
///
/// On any failure the other connections stop submitting, and every buffer is kept until
/// its read has completed or its connection is dead, so libnbd never writes into freed
/// memory.
final class BackupPuller: Sendable {
    let requests: [(offset: UInt64, length: UInt64)]
    let writer: Qcow2Writer
    let window: Int
    let bytesToCopy: UInt64
    let bytesZeroed: UInt64
    let progress: BackupProgressHandler?

    private let nextRequest = Atomic<Int>(0)
    private let copied = Atomic<UInt64>(0)
    private let stopped = Atomic<Bool>(false)
    private let lastReport = Atomic<UInt64>(0)
    private let start = DispatchTime.now().uptimeNanoseconds
    private let results = Mutex<(extents: [BackupManifest.Extent], failure: BackupError?)>(([], nil))

    init(
        requests: [(offset: UInt64, length: UInt64)], writer: Qcow2Writer, window: Int, bytesZeroed: UInt64,
        progress: BackupProgressHandler?
    ) {
        self.requests = requests
        self.writer = writer
        self.window = max(1, window)
        self.bytesToCopy = requests.reduce(0) { $0 + $1.length }
        self.bytesZeroed = bytesZeroed
        self.progress = progress
    }

    /// Runs the copy on `connections` (one thread each) and returns the data extents with
    /// their hashes, sorted by offset.
    func run(connections: [NBDConnection]) throws(BackupError) -> [BackupManifest.Extent] {
        report(force: true)
        if connections.count == 1, let only = connections.first {
            pull(on: only)
        } else {
            // One blocking loop per connection, each on a thread of its own.
            DispatchQueue.concurrentPerform(iterations: connections.count) { index in
                pull(on: connections[index])
            }
        }
        let (extents, failure) = results.withLock { ($0.extents, $0.failure) }
        if let failure { throw failure }
        report(force: true)
        return extents.sorted { $0.offset < $1.offset }
    }

    /// The loop of one connection.
    private func pull(on connection: NBDConnection) {
        let requestSize = Int(requests.map(\.length).max() ?? 0)
        guard requestSize > 0 else { return }
        var buffers: [UnsafeMutableRawBufferPointer] = []
        var freeBuffers: [Int] = []
        var inFlight: [UInt64: (request: Int, buffer: Int)] = [:]
        var drained = true
        defer {
            // Only free buffers libnbd can no longer write into.
            if drained { buffers.forEach { $0.deallocate() } }
        }
        do throws(BackupError) {
            while true {
                while !stopped.load(ordering: .relaxed) {
                    if freeBuffers.isEmpty {
                        guard buffers.count < window else { break }
                        buffers.append(.allocate(byteCount: requestSize, alignment: 4096))
                        freeBuffers.append(buffers.count - 1)
                    }
                    let index = nextRequest.add(1, ordering: .relaxed).oldValue
                    guard index < requests.count else { break }
                    guard let bufferIndex = freeBuffers.popLast() else { break }
                    let request = requests[index]
                    let target = UnsafeMutableRawBufferPointer(rebasing: buffers[bufferIndex][0..<Int(request.length)])
                    do {
                        let cookie = try connection.submitRead(into: target, offset: request.offset)
                        inFlight[cookie] = (index, bufferIndex)
                    } catch {
                        freeBuffers.append(bufferIndex)
                        throw Self.classify(error, connection: connection, request: request)
                    }
                }
                if inFlight.isEmpty { break }
                var completedAny = false
                while let completed = connection.takeCompletedRead() {
                    completedAny = true
                    guard let slot = inFlight.removeValue(forKey: completed.cookie) else { continue }
                    freeBuffers.append(slot.buffer)
                    let request = requests[slot.request]
                    if let error = completed.error {
                        throw Self.classify(error, connection: connection, request: request)
                    }
                    let data = UnsafeRawBufferPointer(rebasing: buffers[slot.buffer][0..<Int(request.length)])
                    try store(data, request: request)
                }
                if !completedAny {
                    do {
                        try connection.pollOnce(timeoutMilliseconds: 1000)
                    } catch {
                        throw BackupError.connectionLost(detail: error.description)
                    }
                }
            }
        } catch {
            stopped.store(true, ordering: .relaxed)
            results.withLock { if $0.failure == nil { $0.failure = error } }
            drained = drain(connection, inFlight: &inFlight)
        }
    }

    /// Waits (bounded) for the reads still in flight after a failure. True when none is
    /// left or the connection is dead, so the buffers may be freed.
    private func drain(_ connection: NBDConnection, inFlight: inout [UInt64: (request: Int, buffer: Int)]) -> Bool {
        let deadline = DispatchTime.now().uptimeNanoseconds + 30_000_000_000
        while !inFlight.isEmpty && !connection.isDead && DispatchTime.now().uptimeNanoseconds < deadline {
            while let completed = connection.takeCompletedRead() { inFlight.removeValue(forKey: completed.cookie) }
            if inFlight.isEmpty { break }
            try? connection.pollOnce(timeoutMilliseconds: 200)
        }
        return inFlight.isEmpty || connection.isDead
    }

    /// Hashes and stores one completed read.
    private func store(_ data: UnsafeRawBufferPointer, request: (offset: UInt64, length: UInt64)) throws(BackupError) {
        let hash = ContentHash.xxh64(data)
        try writer.writeData(at: request.offset, bytes: data)
        let extent = BackupManifest.Extent(
            offset: request.offset, length: request.length, content: .data, xxh64: ContentHash.hex(hash))
        results.withLock { $0.extents.append(extent) }
        copied.add(request.length, ordering: .relaxed)
        report(force: false)
    }

    private static func classify(
        _ error: NBDClientError, connection: NBDConnection, request: (offset: UInt64, length: UInt64)
    ) -> BackupError {
        if connection.isDead || !connection.isReady {
            return .connectionLost(detail: error.description)
        }
        return .readFailed(offset: request.offset, length: request.length, detail: error.description)
    }

    /// Calls the progress handler at most every 100 ms (and when forced).
    private func report(force: Bool) {
        guard let progress else { return }
        let now = DispatchTime.now().uptimeNanoseconds
        let last = lastReport.load(ordering: .relaxed)
        guard force || now &- last >= 100_000_000 else { return }
        guard force || lastReport.compareExchange(expected: last, desired: now, ordering: .relaxed).exchanged else {
            return
        }
        progress(BackupProgress(
            bytesCopied: copied.load(ordering: .relaxed), bytesToCopy: bytesToCopy, bytesZeroed: bytesZeroed,
            elapsed: Double(now - start) / 1e9))
    }
}
