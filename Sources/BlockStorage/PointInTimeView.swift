import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// An image exactly as it was at one instant, while writers go on changing it.
///
/// Copy-before-write: before the first change to a granule since the instant, the writer
/// calls `preserve`, which copies the granule's old content into a sparse sidecar file at
/// the same offset (holes stay holes, so the sidecar grows only with overwritten data).
/// Reads take preserved granules from the sidecar and the rest from the image.
///
/// A view's granule (its preservation unit) is a page, 4 KiB, not the bitmaps' 64 KiB: a
/// 4 KiB write copies the 4 KiB it overwrites, not 60 KiB more that nobody changed. A
/// backup window's first pass of 4 KiB writes into fresh 64 KiB granules ran at
/// 0.03–0.09× the IOPS with no view open when every write copied 64 KiB.
///
/// Readers never block writers: a read of a granule not yet preserved reads the image,
/// then checks that nobody claimed the granule meanwhile (a writer claims before it
/// copies, and writes only after the copy), and re-reads it from the sidecar otherwise.
public final class PointInTimeView: Sendable {
    /// The smallest copy-before-write unit: a page, what one small write changes.
    public static let minimumGranularity: UInt64 = 4096
    /// The most granules a view tracks: 2 bits each, so 16 MiB of bookkeeping at most.
    public static let maximumGranules: UInt64 = 1 << 26

    /// The preservation unit for an image of `size` bytes: 4 KiB, doubled only as far as
    /// the bookkeeping cap needs (4 KiB up to 256 GiB, 16 KiB for 1 TiB).
    public static func granularity(forImageSize size: UInt64) -> UInt64 {
        var granularity = minimumGranularity
        // Granules rounded up: a partial last granule counts.
        while size / granularity + (size % granularity == 0 ? 0 : 1) > maximumGranules { granularity <<= 1 }
        return granularity
    }

    struct State {
        /// Granules a writer has started copying (or finished).
        var claimed: GranuleSet
        /// Granules whose old content is in the sidecar.
        var preserved: GranuleSet
        var preservedCount = 0
        /// Copies in progress: the sidecar is deleted only when none is left.
        var copying = 0
        var active = false
        var closed = false
        var failure: StorageError?
        /// Threads sleeping until granules being copied are preserved.
        var sleepers = 0
        /// The sidecar's space was returned and the file deleted (after `close`, by
        /// whoever saw the last copy end).
        var sidecarReleased = false

        /// True when the sidecar may go now: closed, no copy left, not yet released. Marks
        /// it released, so exactly one caller deletes it.
        mutating func takeSidecarRelease() -> Bool {
            guard closed, copying == 0, !sidecarReleased else { return false }
            sidecarReleased = true
            return true
        }

        /// Why reads cannot be served, if they cannot.
        var unavailability: StorageError? {
            closed ? .viewUnavailable(reason: "it was closed") : failure
        }
    }

    /// The live image the view was taken of.
    public let image: RawImage
    public let granularity: UInt64
    /// The sidecar file; nil for a read-only image, which nothing here can change.
    public let sidecarPath: String?
    private let sidecar: RawImage?
    private let state: Mutex<State>
    /// Wakes threads waiting for another writer's copy.
    private let copied = PreservationSignal()

    public var size: UInt64 { image.size }

    /// Creates the view and its empty sidecar (replacing a stale file at `sidecarPath`).
    /// The view preserves nothing and serves nothing useful until `activate()`: the caller
    /// first lets writes from before the instant land.
    /// - Parameter granularity: the preservation unit, a power of two; nil for
    ///   `granularity(forImageSize:)`.
    public init(image: RawImage, sidecarPath: String?, granularity: UInt64? = nil) throws(StorageError) {
        let granularity = granularity ?? Self.granularity(forImageSize: image.size)
        precondition(granularity > 0 && granularity & (granularity - 1) == 0, "granularity must be a power of two")
        self.image = image
        self.granularity = granularity
        if image.isReadOnly {
            self.sidecarPath = nil
            self.sidecar = nil
        } else {
            guard let sidecarPath else {
                throw .viewUnavailable(reason: "a writable image needs a sidecar file for its views")
            }
            unlink(sidecarPath)
            try RawImage.createSparseFileIfMissing(path: sidecarPath, size: image.size)
            self.sidecarPath = sidecarPath
            self.sidecar = try RawImage(path: sidecarPath, readOnly: false)
        }
        let granules = Int((max(image.size, 1) + granularity - 1) / granularity)
        self.state = Mutex(State(claimed: GranuleSet(count: granules), preserved: GranuleSet(count: granules)))
    }

    deinit {
        if let sidecarPath { unlink(sidecarPath) }
    }

    // MARK: - Lifecycle

    /// The instant is now: writes from here on must `preserve` first.
    public func activate() {
        state.withLock { $0.active = true }
    }

    public var isActive: Bool { state.withLock { $0.active } }

    /// Ends the view: later reads fail, copies stop, and the sidecar's space is returned
    /// and the file deleted: at once when no copy is in progress, otherwise by the writer
    /// whose copy ends last. Never waits.
    public func close() {
        settle { $0.closed = true }
    }

    /// Applies a change that may end a wait or make the sidecar's deletion due (a copy
    /// ended, the view broke or closed), then wakes the sleepers and deletes the sidecar
    /// if so.
    private func settle(_ change: (inout State) -> Void) {
        let (release, wake) = state.withLock { state in
            change(&state)
            return (state.takeSidecarRelease(), state.sleepers > 0)
        }
        if wake { copied.wakeAll() }
        if release { releaseSidecar() }
    }

    /// Returns the sidecar's space and deletes the file (once, after `close`).
    private func releaseSidecar() {
        guard let sidecar, let sidecarPath else { return }
        try? sidecar.discard(at: 0, length: sidecar.size)
        unlink(sidecarPath)
    }

    public var isClosed: Bool { state.withLock { $0.closed } }

    /// Why the view cannot serve reads, if it cannot.
    public var failure: StorageError? {
        state.withLock { $0.unavailability }
    }

    /// Bytes of the image preserved so far (whole granules, holes included).
    public var preservedBytes: UInt64 { state.withLock { UInt64($0.preservedCount) } * granularity }

    /// Bytes the sidecar occupies on disk.
    public var sidecarAllocatedBytes: UInt64 { sidecar?.allocatedBytes ?? 0 }

    // MARK: - Copy-before-write

    private func granules(offset: UInt64, length: UInt64) -> ClosedRange<Int>? {
        let (sum, overflow) = offset.addingReportingOverflow(length)
        let end = overflow ? size : min(sum, size)
        guard length > 0, offset < end else { return nil }
        return Int(offset / granularity)...Int((end - 1) / granularity)
    }

    /// True when a write to the range must call `preserve` first (cheap; no I/O).
    public func needsPreservation(offset: UInt64, length: UInt64) -> Bool {
        guard sidecar != nil, let range = granules(offset: offset, length: length) else { return false }
        return state.withLock { state in
            state.unavailability == nil && !state.preserved.containsAll(range)
        }
    }

    /// Copies the old content of every granule of the range not yet preserved into the
    /// sidecar, and waits for copies other writers started. Blocking: call off the event
    /// loop, after `activate()`. A failed copy breaks the view, not the write: the error
    /// is kept for the view's readers and thrown, and the caller goes on writing.
    public func preserve(offset: UInt64, length: UInt64) throws(StorageError) {
        guard let sidecar, let range = granules(offset: offset, length: length) else { return }
        let (runs, othersCopying) = state.withLock { state -> ([ClosedRange<Int>], Bool) in
            guard state.active, state.unavailability == nil else { return ([], false) }
            var runs: [ClosedRange<Int>] = []
            var othersCopying = false
            for index in range {
                if !state.claimed.contains(index) {
                    state.claimed.insert(index)
                    if let last = runs.last, last.upperBound == index - 1 {
                        runs[runs.count - 1] = last.lowerBound...index
                    } else {
                        runs.append(index...index)
                    }
                } else if !state.preserved.contains(index) {
                    othersCopying = true
                }
            }
            if !runs.isEmpty { state.copying += 1 }
            return (runs, othersCopying)
        }
        if !runs.isEmpty {
            do throws(StorageError) {
                try copy(runs, into: sidecar)
            } catch {
                copyFailed(error)
                throw error
            }
            settle { state in
                for run in runs {
                    for index in run { state.preserved.insert(index) }
                    state.preservedCount += run.count
                }
                state.copying -= 1
            }
        }
        if othersCopying { waitUntilPreserved(range) }
    }

    /// The most old data `preserveIfNonBlocking` copies: two pages, what a small write
    /// straddling a page boundary changes. Larger copies go to the I/O pool.
    public static let nonBlockingCopyLimit = 8192

    /// Preserves the range at once when that cannot wait for the disk or for another
    /// writer: the old data is in the page cache and at most `nonBlockingCopyLimit` bytes
    /// of it are not preserved yet. For the event loop: a small first write after a view
    /// opens copies its page in place instead of hopping to the I/O pool and back.
    ///
    /// The old data is read before the granules are claimed, which is safe because no
    /// writer changes a granule before claiming it and claims are never undone: if the
    /// claim succeeds, nobody wrote the granule since the instant. A page of zeros stays a
    /// hole in the sidecar (it reads the same).
    /// - Returns: true when the write may go on (the range is preserved, or the view is
    ///   closed or broken and keeps nothing); false when the caller must `preserve` on the
    ///   pool (or wait for the view to become active).
    public func preserveIfNonBlocking(offset: UInt64, length: UInt64) -> Bool {
        guard let sidecar, let range = granules(offset: offset, length: length) else { return true }
        // A small write: one granule, or two where it straddles a boundary.
        guard range.count <= 2, UInt64(range.count) * granularity <= UInt64(Self.nonBlockingCopyLimit) else { return false }
        // 1. Which of its granules need a copy; none may be another writer's copy in progress.
        enum Plan { case done, pool, copy(low: Bool, high: Bool) }
        let plan = state.withLock { state -> Plan in
            guard state.active else { return .pool }
            guard state.unavailability == nil else { return .done }
            var need = (low: false, high: false)
            for index in range where !state.preserved.contains(index) {
                if state.claimed.contains(index) { return .pool }
                if index == range.lowerBound { need.low = true } else { need.high = true }
            }
            return need.low || need.high ? .copy(low: need.low, high: need.high) : .done
        }
        let low: Bool
        let high: Bool
        switch plan {
        case .done: return true
        case .pool: return false
        case .copy(let l, let h): (low, high) = (l, h)
        }
        let first = range.lowerBound
        let last = range.upperBound
        let needs = { (index: Int) -> Bool in index == first ? low : high }
        let start = UInt64(first) * granularity
        let end = min(UInt64(last + 1) * granularity, size)
        return withUnsafeTemporaryAllocation(byteCount: Self.nonBlockingCopyLimit, alignment: 4096) { buffer -> Bool in
            // 2. Read the old data of the granules from the page cache only.
            let old = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<Int(end - start)])
            guard image.readIfCached(into: old, at: start) else { return false }
            // 3. Claim; a writer that claimed meanwhile owns the copy, and the pool waits for it.
            enum Claim { case claimed, gone, taken }
            let claim = state.withLock { state -> Claim in
                guard state.unavailability == nil else { return .gone }
                for index in range where needs(index) && state.claimed.contains(index) { return .taken }
                for index in range where needs(index) { state.claimed.insert(index) }
                state.copying += 1
                return .claimed
            }
            switch claim {
            case .gone: return true
            case .taken: return false
            case .claimed: break
            }
            // 4. Keep the old data (pages of zeros stay holes), then mark it preserved.
            do throws(StorageError) {
                for index in range where needs(index) {
                    let from = UInt64(index) * granularity - start
                    let to = min(UInt64(index + 1) * granularity, size) - start
                    let part = UnsafeRawBufferPointer(rebasing: old[Int(from)..<Int(to)])
                    if !Self.isZero(part) { try sidecar.write(part, at: start + from) }
                }
            } catch {
                copyFailed(error)
                return true
            }
            settle { state in
                for index in range where needs(index) {
                    state.preserved.insert(index)
                    state.preservedCount += 1
                }
                state.copying -= 1
            }
            return true
        }
    }

    /// True when every byte is zero (8 bytes at a time).
    private static func isZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
        var index = 0
        while index + 8 <= bytes.count {
            if bytes.loadUnaligned(fromByteOffset: index, as: UInt64.self) != 0 { return false }
            index += 8
        }
        while index < bytes.count {
            if bytes[index] != 0 { return false }
            index += 1
        }
        return true
    }

    /// Copies the data runs of the granules (holes stay holes in the sidecar), in the
    /// kernel where it can.
    private func copy(_ runs: [ClosedRange<Int>], into sidecar: RawImage) throws(StorageError) {
        for run in runs {
            let start = UInt64(run.lowerBound) * granularity
            let end = min(UInt64(run.upperBound + 1) * granularity, size)
            var position = start
            while position < end {
                let extents = image.allocationExtents(at: position, length: end - position, maxExtents: 1024)
                guard !extents.isEmpty else { break }
                for extent in extents {
                    if !extent.isHole { try image.copyRange(at: position, length: extent.length, to: sidecar) }
                    position += extent.length
                }
            }
        }
    }

    /// A copy of old data into the sidecar failed: the view can no longer show its instant
    /// (readers get the failure), and this copy is no longer in progress.
    private func copyFailed(_ error: StorageError) {
        settle { state in
            state.failure = state.failure ?? .viewUnavailable(reason: "copy-before-write failed: \(error)")
            state.copying -= 1
        }
    }

    /// Sleeps until granules other writers are copying are preserved (copies take
    /// microseconds to milliseconds; a closed or broken view ends the wait). Pool threads
    /// only: the event loop's reads return "not cached" instead of waiting.
    private func waitUntilPreserved(_ range: ClosedRange<Int>) {
        var sleeping = false
        copied.sleep(
            until: {
                state.withLock { state in
                    if state.unavailability != nil || state.preserved.containsAll(range) { return true }
                    if !sleeping {
                        state.sleepers += 1
                        sleeping = true
                    }
                    return false
                }
            },
            leave: {
                if sleeping { state.withLock { $0.sleepers -= 1 } }
            })
    }

    // MARK: - Reads

    /// Where one granule's content at the instant is now.
    private enum Location {
        case image
        case sidecar
        /// A writer is copying it: wait, then read the sidecar.
        case copying
    }

    private func location(of index: Int, in state: State) -> Location {
        if state.preserved.contains(index) { return .sidecar }
        return state.claimed.contains(index) ? .copying : .image
    }

    /// The run of granules from the one holding `position` that share its location,
    /// ending at `end` at the latest: the location and where the run ends.
    private func run(from position: UInt64, to end: UInt64, in state: State) -> (Location, UInt64) {
        let first = Int(position / granularity)
        let here = location(of: first, in: state)
        var next = first + 1
        while UInt64(next) * granularity < end && location(of: next, in: state) == here { next += 1 }
        return (here, min(UInt64(next) * granularity, end))
    }

    /// Reads, blocking if needed; a closed or broken view throws `.viewUnavailable`.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(StorageError) {
        _ = try read(into: buffer, at: offset, blocking: true)
    }

    /// Reads only from the page cache; false when that would block or must wait for a copy.
    public func readIfCached(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Bool {
        (try? read(into: buffer, at: offset, blocking: false)) ?? false
    }

    private func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, blocking: Bool) throws(StorageError) -> Bool {
        guard buffer.count > 0 else { return true }
        let (sum, overflow) = offset.addingReportingOverflow(UInt64(buffer.count))
        guard !overflow, sum <= size else { throw .outOfRange(offset: offset, length: UInt64(buffer.count), size: size) }
        var position = offset
        while position < sum {
            let first = Int(position / granularity)
            // One run of granules in the same place.
            let (location, runEnd) = try state.withLock { (state: inout State) throws(StorageError) -> (Location, UInt64) in
                if let failure = state.unavailability { throw failure }
                return run(from: position, to: sum, in: state)
            }
            let slice = UnsafeMutableRawBufferPointer(
                rebasing: buffer[Int(position - offset)..<Int(runEnd - offset)])
            switch location {
            case .sidecar:
                guard try readPart(slice, at: position, from: sidecar ?? image, blocking: blocking) else { return false }
            case .copying:
                guard blocking else { return false }
                waitUntilPreserved(first...Int((runEnd - 1) / granularity))
                continue
            case .image:
                guard try readPart(slice, at: position, from: image, blocking: blocking) else { return false }
                // A writer that claimed a granule meanwhile may have changed it: take it
                // from the sidecar instead.
                let last = Int((runEnd - 1) / granularity)
                let raced = state.withLock { state in (first...last).filter { state.claimed.contains($0) } }
                for index in raced {
                    let start = max(UInt64(index) * granularity, position)
                    let end = min(UInt64(index + 1) * granularity, runEnd)
                    if blocking {
                        waitUntilPreserved(index...index)
                    } else if !state.withLock({ $0.preserved.contains(index) }) {
                        return false
                    }
                    let part = UnsafeMutableRawBufferPointer(
                        rebasing: buffer[Int(start - offset)..<Int(end - offset)])
                    guard try readPart(part, at: start, from: sidecar ?? image, blocking: blocking) else { return false }
                }
            }
            position = runEnd
        }
        // A view that broke during the read may have handed out changed data.
        if let failure = self.failure { throw failure }
        return true
    }

    private func readPart(
        _ buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, from file: RawImage, blocking: Bool
    ) throws(StorageError) -> Bool {
        if blocking {
            try file.read(into: buffer, at: offset)
            return true
        }
        return file.readIfCached(into: buffer, at: offset)
    }

    /// Starts reading a range of the live image into the page cache (advisory).
    public func prefetch(at offset: UInt64, length: UInt64) {
        image.prefetch(at: offset, length: length)
    }

    // MARK: - Allocation

    /// The allocation as it was at the instant: preserved granules from the sidecar (holes
    /// copied as holes), the rest from the image. Granules a writer claims during the
    /// lookup, and everything once the view is broken, are reported as data: the safe
    /// answer, since reading them returns the right bytes.
    public func allocationExtents(at offset: UInt64, length: UInt64, maxExtents: Int) -> [AllocationExtent] {
        let (sum, overflow) = offset.addingReportingOverflow(length)
        let end = overflow ? size : min(sum, size)
        guard offset < end, maxExtents > 0 else { return [] }
        var result: [AllocationExtent] = []
        func append(_ length: UInt64, hole: Bool) {
            guard length > 0 else { return }
            if let last = result.last, last.isHole == hole {
                result[result.count - 1].length += length
            } else {
                result.append(AllocationExtent(length: length, isHole: hole))
            }
        }
        var position = offset
        while position < end && result.count < maxExtents {
            let first = Int(position / granularity)
            let (location, runEnd, broken) = state.withLock { state -> (Location, UInt64, Bool) in
                let (location, runEnd) = run(from: position, to: end, in: state)
                return (location, runEnd, state.unavailability != nil)
            }
            if broken || location == .copying {
                append(runEnd - position, hole: false)
            } else {
                let file = location == .sidecar ? (sidecar ?? image) : image
                let extents = file.allocationExtents(at: position, length: runEnd - position, maxExtents: maxExtents)
                let last = Int((runEnd - 1) / granularity)
                let raced = location == .image && state.withLock { state in
                    (first...last).contains { state.claimed.contains($0) }
                }
                if raced {
                    append(runEnd - position, hole: false)
                } else {
                    var covered: UInt64 = 0
                    for extent in extents {
                        append(extent.length, hole: extent.isHole)
                        covered += extent.length
                    }
                    // A capped lookup: the rest of the run is reported on the next call.
                    if covered < runEnd - position { return Array(result.prefix(maxExtents)) }
                }
            }
            position = runEnd
        }
        return Array(result.prefix(maxExtents))
    }
}

extension PointInTimeView: ImageReader {}
