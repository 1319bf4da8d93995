import Foundation

/// Files of the repository under test (unit files, scripts), found from this source file.
enum RepositoryPaths {
    /// The package root: Tests/IntegrationTests/Support/RepositoryPaths.swift, four levels up.
    static var root: String {
        var url = URL(fileURLWithPath: #filePath)
        for _ in 0..<4 { url.deleteLastPathComponent() }
        return url.path
    }

    /// `relative` inside the repository.
    static func file(_ relative: String) -> String {
        root + "/" + relative
    }
}
