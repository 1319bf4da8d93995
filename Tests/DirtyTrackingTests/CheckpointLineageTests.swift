import DirtyTracking
import Foundation
import Testing

/// The checkpoint lifecycle: one pending checkpoint per bitmap, bases that move only on
/// completion, superseded and aborted increments covered by the next one, and names that
/// never repeat in a store's life.
@Suite("Checkpoint lineage")
struct CheckpointLineageTests {
    static let size: UInt64 = 16 << 20
    static let granule: UInt64 = 65536

    func info(_ tracker: DirtyTracker, _ name: String) throws -> BitmapInfo {
        guard let info = tracker.query().first(where: { $0.name == name }) else {
            throw TestFailure("no bitmap \(name) in \(tracker.names)")
        }
        return info
    }

    func create(_ tracker: DirtyTracker, _ name: String, supersede: [String] = []) throws -> String {
        let request = CheckpointRequest(bitmap: "b0", increment: name, consume: false, supersede: supersede)
        try tracker.perform([.createCheckpoint(request)])
        return request.id
    }

    @Test("completing a checkpoint makes it the bitmap's base; the next increment starts there")
    func completeMovesBase() throws {
        let tracker = DirtyTracker(size: Self.size)
        try tracker.add(name: "b0", persistent: false)
        try tracker.recordModification(offset: 0, length: 4096)
        #expect(try info(tracker, "b0").lineage == CheckpointLineage())
        let first = try create(tracker, "c1")
        #expect(try info(tracker, "c1").checkpointID == first)
        #expect(try info(tracker, "c1").lineage.base == nil, "nothing was completed before c1")
        try tracker.perform([.completeCheckpoint(increment: "c1")])
        #expect(try info(tracker, "b0").lineage.base == .init(name: "c1", id: first))
        try tracker.recordModification(offset: Self.granule * 3, length: 4096)
        _ = try create(tracker, "c2")
        let second = try info(tracker, "c2")
        #expect(second.lineage.base?.id == first && second.lineage.holdsChanges(since: first))
        #expect(second.count == Self.granule)
    }

    @Test("a pending checkpoint blocks the next unless superseded; nothing changes on refusal")
    func pendingBlocks() throws {
        let tracker = DirtyTracker(size: Self.size)
        try tracker.add(name: "b0", persistent: false)
        try tracker.recordModification(offset: 0, length: 4096)
        _ = try create(tracker, "c1")
        try tracker.recordModification(offset: Self.granule * 5, length: 4096)
        let before = tracker.query()
        #expect(throws: BitmapError.checkpointPending(bitmap: "b0", checkpoint: "c1")) {
            _ = try create(tracker, "c2")
        }
        #expect(tracker.query() == before)
    }

    @Test("superseding folds the pending increment in: the new one holds both and covers the old id")
    func supersedeFolds() throws {
        let tracker = DirtyTracker(size: Self.size)
        try tracker.add(name: "b0", persistent: false)
        try tracker.recordModification(offset: 0, length: 4096)
        let first = try create(tracker, "c1")
        try tracker.perform([.completeCheckpoint(increment: "c1")])
        try tracker.recordModification(offset: Self.granule * 2, length: 4096)
        let orphan = try create(tracker, "c2")
        try tracker.recordModification(offset: Self.granule * 9, length: 4096)
        _ = try create(tracker, "c3", supersede: ["c2"])
        #expect(!tracker.names.contains("c2"))
        let third = try info(tracker, "c3")
        #expect(third.count == 2 * Self.granule, "c2's granule and the later one")
        #expect(third.lineage.base?.id == first && third.lineage.covers == [orphan])
        let dirty = try tracker.extents(name: "c3", offset: 0, length: Self.size, maximumExtents: .max).filter(\.dirty)
        #expect(dirty.map(\.offset) == [Self.granule * 2, Self.granule * 9])
        #expect(try info(tracker, "b0").count == 0)
    }

    @Test("an aborted checkpoint goes back into the bitmap and the next checkpoint covers it")
    func abortIsCovered() throws {
        let tracker = DirtyTracker(size: Self.size)
        try tracker.add(name: "b0", persistent: false)
        try tracker.recordModification(offset: Self.granule, length: 4096)
        let aborted = try create(tracker, "c1")
        try tracker.perform([.abortCheckpoint(increment: "c1")])
        #expect(try info(tracker, "b0").lineage.covers == [aborted])
        _ = try create(tracker, "c2")
        #expect(try info(tracker, "c2").lineage.covers == [aborted])
        #expect(try info(tracker, "c2").count == Self.granule)
        #expect(try info(tracker, "b0").lineage.covers == [], "moved into the increment")
    }

    @Test("clear and disable reset the base: nothing vouches for 'every change since' any more")
    func clearAndDisableReset() throws {
        let tracker = DirtyTracker(size: Self.size)
        try tracker.add(name: "b0", persistent: false)
        _ = try create(tracker, "c1")
        try tracker.perform([.completeCheckpoint(increment: "c1")])
        #expect(try info(tracker, "b0").lineage.base != nil)
        try tracker.clear(name: "b0")
        #expect(try info(tracker, "b0").lineage.base == nil)
        _ = try create(tracker, "c2")
        try tracker.perform([.completeCheckpoint(increment: "c2")])
        try tracker.setRecording(name: "b0", false)
        #expect(try info(tracker, "b0").lineage.base == nil)
    }

    @Test("default names never repeat in a store's life; ids, bases and flags survive a restart")
    func namesAndLineagePersist() throws {
        let directory = try TemporaryDirectory()
        let image = directory.file("disk.img")
        var completedID = ""
        do {
            let (store, contents) = try BitmapStore.open(imagePath: image, imageSize: Self.size)
            let tracker = try DirtyTracker(store: store, contents: contents)
            try tracker.add(name: "b0", persistent: true)
            #expect(tracker.nextCheckpointName() == "c1")
            completedID = try create(tracker, tracker.nextCheckpointName())
            try tracker.perform([.completeCheckpoint(increment: "c1")])
            let request = CheckpointRequest(
                bitmap: "b0", increment: tracker.nextCheckpointName(), consume: false, abortOnDisconnect: false)
            try tracker.perform([.createCheckpoint(request)])
            try tracker.save(cleanShutdown: true)
        }
        let (store, contents) = try BitmapStore.open(imagePath: image, imageSize: Self.size)
        let tracker = try DirtyTracker(store: store, contents: contents)
        #expect(try info(tracker, "b0").lineage.base == .init(name: "c1", id: completedID))
        let pending = try info(tracker, "c2")
        #expect(pending.checkpointOf == "b0" && !pending.abortOnDisconnect && pending.lineage.base?.id == completedID)
        try tracker.perform([.completeCheckpoint(increment: "c2")])
        #expect(tracker.nextCheckpointName() == "c3", "c1 and c2 were handed out before the restart")
        #expect(throws: BitmapError.checkpointNameUsed("c1")) { _ = try create(tracker, "c1") }
        #expect(throws: BitmapError.checkpointNameUsed("c2")) { _ = try create(tracker, "c2") }
    }
}
