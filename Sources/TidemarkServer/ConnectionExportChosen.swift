/// Sent outbound (towards the socket) by the NBD handler when a client enters
/// transmission, so `ConnectionAccountingHandler`, which sits at the head of the pipeline,
/// can name the export in the connection's close line.
public struct ConnectionExportChosen: Sendable {
    public let exportName: String

    public init(exportName: String) {
        self.exportName = exportName
    }
}
