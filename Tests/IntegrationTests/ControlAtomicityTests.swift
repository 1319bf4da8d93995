import Foundation
import NBDClient
import Synchronization
import Testing
import QMPWire

/// Checkpoints and transactions are atomic with respect to writes from every connection:
/// writers on several libnbd connections write random granules while the test runs
/// checkpoints and transactions in a loop, timing everything; afterwards every write must
/// be accounted for exactly where its timing allows, and nowhere its timing forbids.
@Suite("Control: atomicity under load", .serialized)
struct ControlAtomicityTests {
    static let granularity: UInt64 = 4096
    static let size = 64 << 20
    static let granules = size / Int(granularity)
    static let writers = 4
    static let runDuration: TimeInterval = 8

    /// One acknowledged write: the granules it touched and when it was in flight.
    struct Write {
        var first: Int
        var last: Int
        var start: UInt64
        var end: UInt64
    }

    /// One checkpoint: when checkpoint-create was sent and returned, the increment read
    /// through NBD before finishing it, and how it finished.
    struct Checkpoint {
        var name: String
        var sent: UInt64
        var returned: UInt64
        var dirty: Set<Int>
        var completed: Bool
        var count: Int64
    }

    /// One rolling bitmap: recording from the transaction that added it to the one that
    /// disabled it (nil: still recording at the end).
    struct Window {
        var name: String
        var addSent: UInt64
        var addReturned: UInt64
        var freezeSent: UInt64?
        var freezeReturned: UInt64?
        var dirty: Set<Int> = []
    }

    final class WriteLog: @unchecked Sendable {
        private let lock = NSLock()
        private var writes: [Write] = []
        func append(_ batch: [Write]) {
            lock.lock()
            writes += batch
            lock.unlock()
        }
        var all: [Write] {
            lock.lock()
            defer { lock.unlock() }
            return writes
        }
    }

    final class StopFlag: Sendable {
        private let value = Atomic<Bool>(false)
        func set() { value.store(true, ordering: .relaxed) }
        var isSet: Bool { value.load(ordering: .relaxed) }
    }

    static func granuleSet(_ map: [BitmapExtent]) -> Set<Int> {
        var result = Set<Int>()
        for extent in map where extent.flags & BitmapMaps.dirty != 0 {
            let first = Int(extent.offset / granularity)
            let last = Int((extent.end - 1) / granularity)
            result.formUnion(first...last)
        }
        return result
    }

    static func action(_ type: String, _ data: QMPJSON) -> QMPJSON { ["type": .string(type), "data": data] }

    @Test("writers on 4 connections while checkpoints and transactions loop: every write where its timing says")
    func atomicityUnderLoad() throws {
        let fixture = try ControlFixture(size: Self.size)
        let client = try fixture.qmp()
        try client.run("block-dirty-bitmap-add", ["node": "disk", "name": "live", "granularity": .int(Int64(Self.granularity))])
        var windows = [Window(name: "roll0", addSent: 0, addReturned: 0)]
        try client.run("block-dirty-bitmap-add", ["node": "disk", "name": "roll0", "granularity": .int(Int64(Self.granularity))])

        // Writers: random single granules, and writes straddling two granules.
        let log = WriteLog()
        let failures = Failures()
        let stop = StopFlag()
        let group = DispatchGroup()
        let connections = try (0..<Self.writers).map { _ in try fixture.connect() }
        for (index, connection) in connections.enumerated() {
            group.enter()
            Thread {
                defer { group.leave() }
                var batch: [Write] = []
                let payload = ImageFile.constant(UInt8(index + 1), count: Int(Self.granularity))
                var generator = SystemRandomNumberGenerator()
                while !stop.isSet {
                    let granule = Int.random(in: 0..<(Self.granules - 1), using: &generator)
                    let straddle = Bool.random(using: &generator)
                    let offset = UInt64(granule) * Self.granularity + (straddle ? Self.granularity / 2 : 0)
                    let start = monotonicNanoseconds()
                    do {
                        try connection.pwrite(payload, offset: offset)
                    } catch {
                        failures.add("writer \(index): \(error)")
                        return
                    }
                    let end = monotonicNanoseconds()
                    batch.append(Write(first: granule, last: straddle ? granule + 1 : granule, start: start, end: end))
                }
                log.append(batch)
            }.start()
        }

        // The loop: checkpoints (completed or aborted) and rolling-bitmap transactions.
        var checkpoints: [Checkpoint] = []
        var iteration = 0
        let deadline = Date().addingTimeInterval(Self.runDuration)
        do {
            while Date() < deadline {
                iteration += 1
                if iteration % 2 == 1 {
                    let name = "ck\(iteration)"
                    let sent = monotonicNanoseconds()
                    let reply = try client.run("checkpoint-create", ["node": "disk", "bitmap": "live", "name": .string(name)])
                    let returned = monotonicNanoseconds()
                    let dirty = Self.granuleSet(try fixture.bitmapMap(name))
                    let complete = iteration % 3 != 0
                    try client.run(complete ? "checkpoint-complete" : "checkpoint-abort", ["node": "disk", "name": .string(name)])
                    checkpoints.append(Checkpoint(
                        name: name, sent: sent, returned: returned, dirty: dirty, completed: complete,
                        count: reply["count"]?.intValue ?? -1))
                } else {
                    let previous = windows[windows.count - 1].name
                    let next = "roll\(iteration)"
                    let sent = monotonicNanoseconds()
                    try client.run("transaction", ["actions": [
                        Self.action("block-dirty-bitmap-add", ["node": "disk", "name": .string(next), "granularity": .int(Int64(Self.granularity))]),
                        Self.action("block-dirty-bitmap-disable", ["node": "disk", "name": .string(previous)]),
                    ]])
                    let returned = monotonicNanoseconds()
                    windows[windows.count - 1].freezeSent = sent
                    windows[windows.count - 1].freezeReturned = returned
                    windows[windows.count - 1].dirty = Self.granuleSet(try fixture.bitmapMap(previous))
                    try client.run("block-dirty-bitmap-remove", ["node": "disk", "name": .string(previous)])
                    windows.append(Window(name: next, addSent: sent, addReturned: returned))
                }
                client.events.removeAll()
                usleep(UInt32.random(in: 5_000...30_000))
            }
        } catch {
            stop.set()
            _ = group.wait(timeout: .now() + 30)
            throw error
        }
        stop.set()
        #expect(group.wait(timeout: .now() + 30) == .success, "writers did not stop")
        #expect(failures.all.isEmpty, "\(failures.all)")
        for connection in connections { try? connection.shutdown() }

        let live = Self.granuleSet(try fixture.bitmapMap("live"))
        windows[windows.count - 1].dirty = Self.granuleSet(try fixture.bitmapMap(windows[windows.count - 1].name))
        let writes = log.all
        #expect(writes.count > 1000, "too few writes to mean anything: \(writes.count)")
        #expect(checkpoints.count >= 10, "too few checkpoints: \(checkpoints.count)")
        #expect(windows.count >= 10, "too few transactions: \(windows.count)")

        var problems: [String] = []
        func problem(_ text: String) { if problems.count < 20 { problems.append(text) } }

        // The count each checkpoint-create returned is the increment read through NBD.
        for checkpoint in checkpoints where checkpoint.count != Int64(checkpoint.dirty.count) * Int64(Self.granularity) {
            problem("\(checkpoint.name): count \(checkpoint.count) but \(checkpoint.dirty.count) dirty granules through NBD")
        }

        var writesByGranule = [[Int]](repeating: [], count: Self.granules)
        for (index, write) in writes.enumerated() {
            for granule in write.first...write.last { writesByGranule[granule].append(index) }
        }

        // Checkpoints. A write's bits are set at one instant inside [start, end]; the first
        // checkpoint taken after that instant holds them (and, if it was aborted, the next
        // ones too); with no checkpoint after it, the live bitmap does.
        for write in writes {
            let firstAfter = checkpoints.firstIndex { $0.sent > write.end }
            for granule in write.first...write.last {
                let candidates = checkpoints.indices.filter { index in
                    checkpoints[index].returned > write.start && (firstAfter.map { index <= $0 } ?? true)
                }
                let held = candidates.contains { checkpoints[$0].dirty.contains(granule) }
                    || (firstAfter == nil && live.contains(granule))
                if !held {
                    problem(
                        "granule \(granule) written in [\(write.start), \(write.end)] is in no checkpoint increment "
                            + "it could belong to (\(candidates.map { checkpoints[$0].name })) nor in the live bitmap after them")
                }
            }
        }
        // Nothing spurious: a granule in an increment was written before the checkpoint
        // returned, and after the last completed checkpoint before it was sent.
        var lastCompleted: Checkpoint?
        for checkpoint in checkpoints {
            for granule in checkpoint.dirty {
                let explained = writesByGranule[granule].contains { index in
                    writes[index].start < checkpoint.returned && writes[index].end > (lastCompleted?.sent ?? 0)
                }
                if !explained {
                    problem("granule \(granule) is in \(checkpoint.name) but no write to it can be: all started after it returned or were released before")
                }
            }
            if checkpoint.completed { lastCompleted = checkpoint }
        }
        for granule in live {
            if !writesByGranule[granule].contains(where: { writes[$0].end > (lastCompleted?.sent ?? 0) }) {
                problem("granule \(granule) is in the final live bitmap, but every write to it was in a completed increment")
            }
        }

        // Rolling bitmaps: each write is in the window recording when it landed.
        for write in writes {
            for granule in write.first...write.last {
                var possible = false
                for window in windows where window.addSent < write.end && write.start < (window.freezeReturned ?? .max) {
                    if window.dirty.contains(granule) { possible = true }
                    if window.addReturned < write.start && write.end < (window.freezeSent ?? .max) && !window.dirty.contains(granule) {
                        problem("granule \(granule) written wholly inside \(window.name)'s window is not in it")
                    }
                }
                if !possible { problem("granule \(granule) written in [\(write.start), \(write.end)] is in no rolling bitmap") }
            }
        }
        for window in windows {
            for granule in window.dirty {
                let explained = writesByGranule[granule].contains { index in
                    writes[index].start < (window.freezeReturned ?? .max) && writes[index].end > window.addSent
                }
                if !explained { problem("granule \(granule) is in \(window.name) but no write to it overlaps its window") }
            }
        }

        // A write touching two granules lands in the same bitmaps for both (checked where
        // that write is the only one to both granules).
        for (index, write) in writes.enumerated() where write.last > write.first {
            guard writesByGranule[write.first] == [index], writesByGranule[write.last] == [index] else { continue }
            let inCheckpoints = checkpoints.map { ($0.dirty.contains(write.first), $0.dirty.contains(write.last)) }
            let inWindows = windows.map { ($0.dirty.contains(write.first), $0.dirty.contains(write.last)) }
            if inCheckpoints.contains(where: { $0.0 != $0.1 }) || inWindows.contains(where: { $0.0 != $0.1 })
                || live.contains(write.first) != live.contains(write.last)
            {
                problem("the write to granules \(write.first)-\(write.last) was split across bitmaps")
            }
        }
        #expect(problems.isEmpty, "\(problems.count) problem(s), first ones:\n\(problems.joined(separator: "\n"))")
        print("atomicity: \(writes.count) writes, \(checkpoints.count) checkpoints, \(windows.count - 1) transactions")
    }
}
