import DirtyTracking
import Foundation
import Testing

/// The store owns its folder: view sidecars are named there and removed when a new owner
/// opens it.
@Suite("Bitmap store: view sidecars")
struct ViewSidecarTests {
    @Test("sidecars of an earlier run are removed at open and reported; other files stay")
    func staleSidecarsRemoved() throws {
        let directory = try TemporaryDirectory()
        let image = directory.file("disk.img")
        let store = BitmapStore.directory(forImage: image)
        try FileManager.default.createDirectory(atPath: store, withIntermediateDirectories: true)
        let stale = store + "/" + BitmapStore.viewSidecarName(checkpoint: "c1")
        let unrelated = store + "/notes.cbw"
        #expect(FileManager.default.createFile(atPath: stale, contents: Data([1])))
        #expect(FileManager.default.createFile(atPath: unrelated, contents: Data([2])))

        let (opened, contents) = try BitmapStore.open(imagePath: image, imageSize: 1 << 20)
        #expect(contents.removedViewSidecars == [stale])
        #expect(!FileManager.default.fileExists(atPath: stale))
        #expect(FileManager.default.fileExists(atPath: unrelated))

        let fresh = opened.viewSidecarPath(checkpoint: "nightly/../x")
        #expect(fresh.hasPrefix(store + "/" + BitmapStore.viewSidecarPrefix) && fresh.hasSuffix("-nightly____x.cbw"))
        #expect(fresh != opened.viewSidecarPath(checkpoint: "nightly/../x"), "each view gets its own file")
    }
}
