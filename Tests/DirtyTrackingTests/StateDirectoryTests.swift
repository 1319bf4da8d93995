import DirtyTracking
import Foundation
import Testing

/// `StateDirectory` without devices: store naming by identity, `identity.json`, the path
/// records, and the refusals when a path or a store belongs to another disk.
@Suite("State directory")
struct StateDirectoryTests {
    static let size: UInt64 = 8 << 20

    static func identity(_ value: String, path: String = "/dev/loop7") -> StoreIdentity {
        StoreIdentity(identity: value, source: "test", path: path, size: size)
    }

    static func mismatch(_ body: () throws -> Void) -> BitmapError? {
        do {
            try body()
            return nil
        } catch let error as BitmapError {
            return error
        } catch {
            return nil
        }
    }

    @Test("a store is named after the identity, 0700 state dir, identity.json written, found again from another path")
    func namingAndReopen() throws {
        let temporary = try TemporaryDirectory()
        let state = StateDirectory(path: temporary.file("state"))
        let disk = Self.identity("wwid:naa.5000c500a1b2c3d4 / odd\u{e9}name")
        do {
            let (store, contents) = try state.open(identity: disk, imageSize: Self.size)
            let tracker = try DirtyTracker(store: store, contents: contents)
            try tracker.add(name: "b0", granularity: 65536, persistent: true)
            let modification = tracker.willModify(offset: 0, length: 4096)
            if let regions = modification.journalRegions { try tracker.makeDurable(regions) }
            tracker.didModify(modification)
            try tracker.save(cleanShutdown: true)
            #expect(store.directory == state.storeDirectory(identity: disk.identity))
        }
        let directory = state.storeDirectory(identity: disk.identity)
        let name = URL(fileURLWithPath: directory).lastPathComponent
        #expect(name.hasPrefix("wwid_naa.5000c500a1b2c3d4___odd_name-"), "\(name)")
        #expect(name.count == "wwid_naa.5000c500a1b2c3d4___odd_name-".count + 16)
        let attributes = try FileManager.default.attributesOfItem(atPath: state.path)
        #expect((attributes[.posixPermissions] as? Int) == 0o700)
        let recorded = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: directory + "/identity.json")))
        #expect((recorded as? [String: Any])?["identity"] as? String == disk.identity)

        // The same disk at another path: the same store, with its bitmap.
        let moved = Self.identity(disk.identity, path: "/dev/loop9")
        let (store, contents) = try state.open(identity: moved, imageSize: Self.size)
        #expect(store.directory == directory)
        #expect(contents.bitmaps.map(\.name) == ["b0"])
        #expect(contents.bitmaps.first?.bitmap.dirtyBytes == 65536)
    }

    @Test("another disk at a recorded path is refused before any store is made; removing the record accepts it")
    func otherDiskAtRecordedPath() throws {
        let temporary = try TemporaryDirectory()
        let state = StateDirectory(path: temporary.file("state"))
        _ = try state.open(identity: Self.identity("loop:/a.img,fs=dev-0:1,ino=1"), imageSize: Self.size)
        let other = Self.identity("loop:/b.img,fs=dev-0:1,ino=2")
        let error = Self.mismatch { _ = try state.open(identity: other, imageSize: Self.size) }
        guard case .storeIdentityMismatch(let path, let recorded, let found, _, let remedy)? = error else {
            Issue.record("expected an identity mismatch, got \(String(describing: error))")
            return
        }
        #expect(path == "/dev/loop7")
        #expect(recorded == "loop:/a.img,fs=dev-0:1,ino=1")
        #expect(found == "loop:/b.img,fs=dev-0:1,ino=2")
        #expect(remedy.contains(state.pathRecord(imagePath: "/dev/loop7")))
        #expect(!FileManager.default.fileExists(atPath: state.storeDirectory(identity: other.identity)))
        #expect(state.hasStore(imagePath: "/dev/loop7", identity: other.identity), "the record is something to check")

        try FileManager.default.removeItem(atPath: state.pathRecord(imagePath: "/dev/loop7"))
        let (store, contents) = try state.open(identity: other, imageSize: Self.size)
        #expect(store.directory == state.storeDirectory(identity: other.identity))
        #expect(contents.bitmaps.isEmpty)
    }

    @Test("a store whose identity.json names another disk is refused and unlocked")
    func storeOfAnotherDisk() throws {
        let temporary = try TemporaryDirectory()
        let directory = temporary.file("store")
        _ = try BitmapStore.open(directory: directory, imageSize: Self.size, identity: Self.identity("serial:X/1"))
        let error = Self.mismatch {
            _ = try BitmapStore.open(directory: directory, imageSize: Self.size, identity: Self.identity("serial:X/2"))
        }
        guard case .storeIdentityMismatch(_, let recorded, let found, let store, _)? = error else {
            Issue.record("expected an identity mismatch, got \(String(describing: error))")
            return
        }
        #expect(recorded == "serial:X/1" && found == "serial:X/2" && store == directory)
        #expect("\(error.map { "\($0)" } ?? "")".contains("identity mismatch"))
        // The refused open released the lock: the right disk opens it.
        _ = try BitmapStore.open(directory: directory, imageSize: Self.size, identity: Self.identity("serial:X/1"))
    }
}
