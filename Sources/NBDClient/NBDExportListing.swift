/// One export as the server announced it in reply to `NBD_OPT_LIST`.
///
/// A struct rather than a tuple so listings can be compared and searched in tests.
public struct NBDExportListing: Sendable, Hashable {
    /// The export name a client passes to `NBD_OPT_GO`.
    public var name: String
    /// The human-readable description; empty when the server sent none.
    public var description: String

    public init(name: String, description: String) {
        self.name = name
        self.description = description
    }
}
