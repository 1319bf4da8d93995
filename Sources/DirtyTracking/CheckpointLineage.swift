/// Where a bitmap stands in the sequence of checkpoints taken of it, so a backup client
/// can prove that an increment holds every change since the last point of its chain.
///
/// A live bitmap's lineage names the last *completed* checkpoint taken of it (its base):
/// the bitmap holds every change since that checkpoint's instant. Checkpoints taken after
/// the base whose changes went back into the bitmap (aborted ones) are listed in
/// `covers`. A checkpoint's increment inherits the lineage of the bitmap it was taken
/// from, plus the pending checkpoints it superseded: it holds every change since `base`,
/// so it also holds every change since any checkpoint listed in `covers`.
///
/// Anything that makes a bitmap miss changes (clear, disable) resets its lineage: no
/// base, so no client can take it for "everything since".
public struct CheckpointLineage: Sendable, Equatable, Codable {
    /// A checkpoint by name (for people) and id (unique, for machines).
    public struct Point: Sendable, Equatable, Codable {
        public var name: String
        public var id: String

        public init(name: String, id: String) {
            self.name = name
            self.id = id
        }
    }

    /// The last completed checkpoint whose instant the bitmap's changes start from; nil
    /// when nothing proves where they start.
    public var base: Point?
    /// Ids of later checkpoints whose changes the bitmap also holds (aborted or
    /// superseded ones), oldest first.
    public var covers: [String]

    /// At most this many ids are kept in `covers`; dropping the oldest can only make a
    /// client refuse an incremental backup, never accept a wrong one.
    public static let maximumCovers = 64

    public init(base: Point? = nil, covers: [String] = []) {
        self.base = base
        self.covers = covers
    }

    /// True when the bitmap holds every change since checkpoint `id`.
    public func holdsChanges(since id: String) -> Bool {
        base?.id == id || covers.contains(id)
    }

    mutating func cover(_ ids: [String]) {
        for id in ids where !covers.contains(id) { covers.append(id) }
        if covers.count > Self.maximumCovers { covers.removeFirst(covers.count - Self.maximumCovers) }
    }

    /// A fresh checkpoint id: 128 random bits as 32 hex digits.
    public static func newID() -> String {
        var generator = SystemRandomNumberGenerator()
        let high = generator.next() as UInt64
        let low = generator.next() as UInt64
        return hex(high) + hex(low)
    }

    private static func hex(_ value: UInt64) -> String {
        let digits = String(value, radix: 16)
        return String(repeating: "0", count: 16 - digits.count) + digits
    }
}
