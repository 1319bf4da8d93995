import Foundation

/// A fresh, private temporary directory for one test, removed when the value is released.
///
/// Each test gets its own so images and Unix sockets never collide between tests that run
/// in parallel. The path is kept short (`/tmp/tm-XXXXXX`) because a Unix socket path must
/// fit in `sun_path` (108 bytes).
final class TestDirectory: @unchecked Sendable {
    let path: String

    init() throws {
        var template = Array("/tmp/tm-XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { buffer in
            mkdtemp(buffer.baseAddress!)
        }
        guard made != nil else {
            throw HarnessError("mkdtemp failed: errno \(errno)")
        }
        path = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    deinit {
        if ProcessInfo.processInfo.environment["TIDEMARK_KEEP_TEST_DIRS"] == nil {
            try? FileManager.default.removeItem(atPath: path)
        }
    }

    /// `name` inside this directory.
    func file(_ name: String) -> String {
        path + "/" + name
    }

    /// The conventional socket path for a test's server.
    var socketPath: String {
        file("nbd.sock")
    }
}
