/// What `backup:PATH[@POINT][:rw]` asks for, in `serve --export NAME=…` and in
/// `block-export-add`'s `filename`: a backup directory or qcow2 file, the chain point
/// (index, checkpoint or file name; the newest when absent) and whether writes go to an
/// overlay.
public struct ChainExportSpecification: Equatable, Sendable {
    /// The prefix that marks a chain export.
    public static let prefix = "backup:"

    public var path: String
    public var point: String?
    public var writable: Bool

    public init(path: String, point: String?, writable: Bool) {
        self.path = path
        self.point = point
        self.writable = writable
    }

    /// True when `text` names a chain (`backup:…`).
    public static func isChain(_ text: String) -> Bool {
        text.hasPrefix(prefix)
    }

    /// Parses `backup:PATH[@POINT][:rw|:ro]`. The point is what follows the last `@`
    /// when it holds no `/` (so a directory named `a@b/c` is still a path).
    public init(parsing text: String) throws(ServerError) {
        guard Self.isChain(text) else { throw ServerError.invalidChainSpecification(text, reason: "it does not start with backup:") }
        var rest = Substring(text.dropFirst(Self.prefix.count))
        writable = false
        if rest.hasSuffix(":rw") {
            writable = true
            rest = rest.dropLast(3)
        } else if rest.hasSuffix(":ro") {
            rest = rest.dropLast(3)
        }
        point = nil
        if let at = rest.lastIndex(of: "@") {
            let candidate = rest[rest.index(after: at)...]
            if !candidate.contains("/") {
                guard !candidate.isEmpty else {
                    throw ServerError.invalidChainSpecification(text, reason: "nothing follows @ (give an index, checkpoint or file name)")
                }
                point = String(candidate)
                rest = rest[..<at]
            }
        }
        guard !rest.isEmpty else { throw ServerError.invalidChainSpecification(text, reason: "no directory or file is named") }
        path = String(rest)
    }
}
