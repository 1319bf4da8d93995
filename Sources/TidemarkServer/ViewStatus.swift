/// An open point-in-time view, as `query-checkpoints` reports it.
public struct ViewStatus: Sendable, Equatable {
    /// The view's export names: the instant, then its `.changes` variant.
    public var exportNames: [String]
    /// Bytes of the image preserved so far.
    public var preservedBytes: UInt64
    /// Bytes the view's sidecar occupies on disk.
    public var sidecarBytes: UInt64
    /// Why the view cannot serve reads, if it cannot.
    public var failure: String?
}
