import NBDProtocol
import Synchronization

/// The exports a server offers, in the order they were added; the first is the default.
///
/// Connections look exports up during their handshake from any event loop, and exports
/// may be added or removed while the server runs, so the list sits behind a lock.
public final class ExportRegistry: Sendable {
    private let exports = Mutex<[Export]>([])

    public init() {}

    /// Adds an export. Names (what clients ask for) and ids (what management uses) are
    /// each unique, as in QEMU, where they are separate namespaces.
    /// - Throws: `ServerError.duplicateExportID` when the id is taken,
    ///   `ServerError.duplicateExport` when the name is.
    public func add(_ export: Export) throws(ServerError) {
        try exports.withLock { (list: inout [Export]) throws(ServerError) in
            guard !list.contains(where: { $0.id == export.id }) else { throw .duplicateExportID(export.id) }
            guard !list.contains(where: { $0.name == export.name }) else { throw .duplicateExport(export.name) }
            list.append(export)
        }
    }

    /// Removes an export by name; connections already using it keep it until they close.
    @discardableResult
    public func remove(named name: String) -> Export? {
        exports.withLock { list in
            guard let index = list.firstIndex(where: { $0.name == name }) else { return nil }
            return list.remove(at: index)
        }
    }

    /// Removes an export by management id; connections already using it keep it until
    /// they close.
    @discardableResult
    public func remove(id: String) -> Export? {
        exports.withLock { list in
            guard let index = list.firstIndex(where: { $0.id == id }) else { return nil }
            return list.remove(at: index)
        }
    }

    /// The export with this management id (never a default: ids are exact).
    public func export(id: String) -> Export? {
        exports.withLock { list in list.first { $0.id == id } }
    }

    /// Every export, the default first.
    public var all: [Export] { exports.withLock { $0 } }

    /// The export with this name; the empty name selects the first export.
    public func export(named name: String) -> Export? {
        exports.withLock { list in
            name.isEmpty ? list.first : list.first(where: { $0.name == name })
        }
    }
}

extension ExportRegistry: NBDExportCatalog {
    public func exportSummaries() -> [NBDExportSummary] { all.map(\.summary) }
    public func exportSummary(named name: String) -> NBDExportSummary? { export(named: name)?.summary }
}
