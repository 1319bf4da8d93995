import Foundation
import NBDClient

/// One test's world: a private directory, an image file in it and a Tidemark serving it.
///
/// Most tests need exactly this; the few that need several exports or TCP build their own
/// ``TidemarkProcess``. The server is killed (if still running) before the directory goes.
final class ServerFixture: @unchecked Sendable {
    static let defaultSize = 16 << 20

    let directory: TestDirectory
    let image: String
    let server: TidemarkProcess
    let exportName: String

    /// Creates `image.raw` (`size` bytes; sparse, or filled with ``ImageFile/pattern``)
    /// and starts `tidemark serve image.raw --name NAME --unix SOCK EXTRA...`.
    init(
        size: Int = ServerFixture.defaultSize, filled: Bool = false, name: String = "disk",
        extraArguments: [String] = []
    ) throws {
        directory = try TestDirectory()
        image = directory.file("image.raw")
        exportName = name
        if filled {
            try ImageFile.createFilled(image, size: size)
        } else {
            try ImageFile.createSparse(image, size: size)
        }
        server = try TidemarkProcess.serve(image: image, name: name, in: directory, extraArguments: extraArguments)
    }

    deinit {
        if server.isRunning {
            _ = try? server.stop(signal: SIGKILL, timeout: 10)
        }
    }

    /// A libnbd connection to this fixture's export (`base:allocation` requested).
    func connect(_ configure: (inout NBDConnectionConfiguration) -> Void = { _ in }) throws -> NBDConnection {
        try server.connect(export: exportName) { configuration in
            configuration.metaContexts = [NBDAllocationFlags.contextName]
            configure(&configuration)
        }
    }

    /// The export's URI on the Unix socket.
    var uri: String { server.uri }
}
