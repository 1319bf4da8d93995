import Foundation
import NBDClient
import Synchronization
import Testing
import QMPWire

/// The promise `ExportWrites` keeps: a write lands wholly before or wholly after a
/// checkpoint. Writers on several connections each write every granule of their share
/// exactly once while a checkpoint with a view is taken; afterwards each write must be in
/// exactly one of the two increments (the checkpoint's, or the live bitmap's after it),
/// where its timing says, and the view must show exactly the writes of the checkpoint's
/// increment over the image as it was before (zeroes).
@Suite("Writes and checkpoints: each write wholly before or wholly after", .serialized)
struct WriteCheckpointOrderTests {
    static let granularity = 4096
    static let size = 32 << 20
    static let granules = size / granularity
    static let writers = 4

    struct Write {
        var granule: Int
        var writer: Int
        var start: UInt64
        var end: UInt64
    }

    final class Log: @unchecked Sendable {
        private let lock = NSLock()
        private var writes: [Write] = []
        let count = Atomic<Int>(0)

        func append(_ write: Write) {
            lock.lock()
            writes.append(write)
            lock.unlock()
            count.add(1, ordering: .relaxed)
        }

        var all: [Write] {
            lock.lock()
            defer { lock.unlock() }
            return writes
        }
    }

    static func granuleSet(_ map: [BitmapExtent]) -> Set<Int> {
        var result = Set<Int>()
        for extent in map where extent.flags & BitmapMaps.dirty != 0 {
            result.formUnion(Int(extent.offset) / granularity...Int(extent.end - 1) / granularity)
        }
        return result
    }

    static func byte(of writer: Int) -> UInt8 { UInt8(0xA0 + writer) }

    @Test("4 writers, a checkpoint with a view in the middle: every write in exactly one increment; the view is the instant")
    func everyWriteOnOneSide() throws {
        let fixture = try ControlFixture(size: Self.size)
        let client = try fixture.qmp()
        try client.run(
            "block-dirty-bitmap-add", ["node": "disk", "name": "b0", "granularity": .int(Int64(Self.granularity))])

        let log = Log()
        let failures = Failures()
        let group = DispatchGroup()
        let connections = try (0..<Self.writers).map { _ in try fixture.connect() }
        for (writer, connection) in connections.enumerated() {
            group.enter()
            Thread {
                defer { group.leave() }
                let payload = ImageFile.constant(Self.byte(of: writer), count: Self.granularity)
                var share = Array(stride(from: writer, to: Self.granules, by: Self.writers))
                share.shuffle()
                for granule in share {
                    let start = monotonicNanoseconds()
                    do {
                        try connection.pwrite(payload, offset: UInt64(granule * Self.granularity))
                    } catch {
                        failures.add("writer \(writer): \(error)")
                        return
                    }
                    log.append(Write(granule: granule, writer: writer, start: start, end: monotonicNanoseconds()))
                }
            }.start()
        }

        // The checkpoint, once about a sixth of the writes are acknowledged.
        while log.count.load(ordering: .relaxed) < Self.granules / 6 && failures.all.isEmpty { usleep(200) }
        let sent = monotonicNanoseconds()
        let created = try Views.create(client, bitmap: "b0", name: "ck")
        let returned = monotonicNanoseconds()
        #expect(group.wait(timeout: .now() + 60) == .success, "writers did not finish")
        #expect(failures.all.isEmpty, "\(failures.all)")
        for connection in connections { try? connection.shutdown() }

        let writes = log.all
        #expect(writes.count == Self.granules)
        let increment = Self.granuleSet(try fixture.bitmapMap("ck"))
        let after = Self.granuleSet(try fixture.bitmapMap("b0"))
        #expect(created.count == UInt64(increment.count * Self.granularity), "the reply's count is the increment read through NBD")
        // Both sides have writes, or the test proved nothing.
        #expect(writes.contains { $0.end < sent } && writes.contains { $0.start > returned })

        var problems: [String] = []
        func problem(_ text: String) { if problems.count < 20 { problems.append(text) } }
        for write in writes {
            let before = increment.contains(write.granule)
            let later = after.contains(write.granule)
            if before == later {
                problem("granule \(write.granule) is in \(before ? "both increments" : "neither increment")")
            }
            if write.end < sent && !before { problem("granule \(write.granule), acknowledged before the checkpoint, is not in it") }
            if write.start > returned && before { problem("granule \(write.granule), sent after the checkpoint, is in it") }
        }
        #expect(increment.union(after).count == Self.granules, "every granule was written once")

        // The view: the checkpoint's writes on the image as it was (zeroes), nothing later.
        let view = try Views.readAll(fixture.connect(export: created.view))
        let zero = [UInt8](repeating: 0, count: Self.granularity)
        for write in writes {
            let offset = write.granule * Self.granularity
            let expected = increment.contains(write.granule) ? ImageFile.constant(Self.byte(of: write.writer), count: Self.granularity) : zero
            if view[offset..<(offset + Self.granularity)].elementsEqual(expected) == false {
                problem("the view's granule \(write.granule) is not \(increment.contains(write.granule) ? "the checkpoint's write" : "the old (zero) data")")
            }
        }
        #expect(problems.isEmpty, "\(problems)")
        try client.run("checkpoint-complete", ["node": "disk", "name": "ck"])
    }
}
