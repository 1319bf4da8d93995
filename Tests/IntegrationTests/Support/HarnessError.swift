/// Why a test's scaffolding (not the server under test) could not do its job.
///
/// Thrown errors fail a Swift Testing test, so a missing external tool or a server that
/// never became ready shows up as a failure with this message rather than as a skip.
struct HarnessError: Error, CustomStringConvertible {
    let description: String

    init(_ description: String) {
        self.description = description
    }
}
