import BackupChain
import BlockStorage
import Dispatch
import Logging
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// The background half of a live restore: copies a chain point into the target while
/// the target is already served (``ChainOverlay`` with the target as its data file).
///
/// Why a thread of its own: the copy is one long sequence of blocking reads and writes
/// that must not take the I/O pool's threads from clients. Progress is made durable (the
/// target flushed, then the map saved) every ``flushInterval`` bytes and at the end, so
/// after a kill -9 a restart resumes from the last saved map; client writes mark their
/// granules and are never overwritten by the copy. `bytesPerSecond` leaves the disk's
/// bandwidth to the running machine.
public final class LiveRestoreCopier: Sendable {
    public let overlay: ChainOverlay
    public let target: String
    let bytesPerSecond: UInt64?
    let showProgress: Bool
    let logger: Logger
    private let finished = Atomic<Bool>(false)
    private let stopReason = Mutex<String?>(nil)

    /// Bytes copied between two saves of the progress, at most.
    static let flushInterval: UInt64 = 256 << 20
    /// Time between two saves of the progress, at most.
    static let flushPeriod: Duration = .seconds(1)
    /// Largest copy at once.
    static let chunk = 1 << 20

    public init(overlay: ChainOverlay, target: String, bytesPerSecond: UInt64?, showProgress: Bool, logger: Logger) {
        self.overlay = overlay
        self.target = target
        self.bytesPerSecond = bytesPerSecond
        self.showProgress = showProgress
        self.logger = logger
    }

    /// True once every granule of the target holds the chain's or a client's data.
    public var isComplete: Bool { finished.load(ordering: .acquiring) }

    /// Share of the disk already in the target, 0…1.
    public var fractionDone: Double {
        let total = overlay.granuleCount
        return total == 0 ? 1 : Double(overlay.writtenGranules) / Double(total)
    }

    /// Why the copy stopped before the end (an I/O error, a full disk), if it did.
    public var failure: String? { stopReason.withLock { $0 } }

    /// Starts the copy on a thread of its own; `onFinish` runs on it at the end, with the
    /// failure if the copy stopped short.
    public func start(onFinish: (@Sendable (String?) -> Void)? = nil) {
        DispatchQueue(label: "tidemark.live-restore").async {
            self.run()
            onFinish?(self.failure)
        }
    }

    private func fail(_ message: String) {
        stopReason.withLock { $0 = message }
        logger.error("\(message)")
    }

    private func run() {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Self.chunk, alignment: 4096)
        defer { buffer.deallocate() }
        let already = fractionDone
        logger.info("live restore into \(target): copying from the chain, \(Int(already * 100))% already there")
        var cursor = 0
        var copied: UInt64 = 0
        var sinceFlush: UInt64 = 0
        let started = ContinuousClock.now
        var lastReport = started
        var lastFlush = started
        while true {
            let done: UInt64
            do throws(StorageError) {
                done = try overlay.copyNext(cursor: &cursor, buffer: buffer)
            } catch {
                fail("live restore into \(target) stopped: \(error); reads of the rest still come from the chain, restart to resume")
                return
            }
            if done == 0 { break }
            copied += done
            sinceFlush += done
            let now = ContinuousClock.now
            if sinceFlush >= Self.flushInterval || now - lastFlush >= Self.flushPeriod {
                sinceFlush = 0
                lastFlush = now
                do throws(StorageError) { try overlay.flush() } catch { logger.error("saving live restore progress failed: \(error)") }
            }
            if showProgress && now - lastReport >= .milliseconds(500) {
                lastReport = now
                report(copied: copied, since: started, final: false)
            }
            if let bytesPerSecond, bytesPerSecond > 0 {
                let due = Duration.seconds(Double(copied) / Double(bytesPerSecond))
                let elapsed = now - started
                if due > elapsed {
                    let wait = due - elapsed
                    let (seconds, attoseconds) = wait.components
                    usleep(UInt32(min(Int64(seconds) * 1_000_000 + attoseconds / 1_000_000_000_000, 2_000_000)))
                }
            }
        }
        do throws(StorageError) {
            try overlay.flush()
        } catch {
            fail("saving live restore progress failed: \(error); a restart finishes it")
            return
        }
        finished.store(true, ordering: .releasing)
        if showProgress { report(copied: copied, since: started, final: true) }
        logger.info(
            "live restore into \(target) complete (\(copied >> 20) MiB copied): the target holds the backup and every write since; from now on it can be served directly (tidemark serve \(target))")
    }

    private func report(copied: UInt64, since started: ContinuousClock.Instant, final: Bool) {
        let fraction = fractionDone
        let width = 30
        let filled = Int(fraction * Double(width))
        let elapsed = ContinuousClock.now - started
        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        let rate = seconds > 0 ? Double(copied) / 1_048_576 / seconds : 0
        let bar = String(repeating: "#", count: filled) + String(repeating: "-", count: width - filled)
        var line = "\rlive restore [\(bar)] \(Int(fraction * 100))% \(Int(rate)) MiB/s" + (final ? "\n" : "")
        _ = line.withUTF8 { write(2, $0.baseAddress, $0.count) }
    }
}
