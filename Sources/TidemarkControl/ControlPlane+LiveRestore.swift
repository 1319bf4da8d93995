import QMPWire
import TidemarkServer

/// Live restores over QMP: `live-restore-start` opens the target as an export and starts
/// the copy, `query-live-restore` reports progress, `LIVE_RESTORE_COMPLETED` is sent when
/// the copy ends (with `error` when it stopped short).
extension ControlPlane {
    /// `live-restore-start {id, source: "DIR[@POINT]", target, rate?, name?}`.
    func startLiveRestore(_ arguments: QMPArguments) throws(QMPError) -> JSONValue {
        let id = try arguments.string("id")
        let sourceText = try arguments.string("source")
        let target = try arguments.string("target")
        let name = try arguments.optionalString("name") ?? id
        let rate = try arguments.optionalUInt("rate")
        guard !id.isEmpty, id.utf8.count <= 4096, !name.isEmpty, name.utf8.count <= 4096 else {
            throw QMPError(.genericError, "export ids and names are 1 to 4096 bytes")
        }
        guard registry.export(id: id) == nil, registry.export(named: name) == nil else {
            throw QMPError(.genericError, ServerError.duplicateExportID(id).description)
        }
        if let rate, rate == 0 { throw QMPError(.genericError, "Parameter 'rate' must be a positive number of bytes per second") }
        let export: Export
        let copier: LiveRestoreCopier
        do {
            let source = try ChainExportSpecification(parsing: ChainExportSpecification.prefix + sourceText)
            (export, copier) = try ExportOpener.openLiveRestore(
                id: id, name: name, source: source, target: target, bytesPerSecond: rate,
                showProgress: false, bitmaps: [], stateDirectory: stateDirectory, logger: logger)
        } catch {
            throw QMPError(.genericError, "\(error)")
        }
        try register(export)
        copier.start { [self] failure in
            var data: [String: JSONValue] = ["id": .string(id), "target": .string(target)]
            if let failure { data["error"] = .string(failure) }
            emit("LIVE_RESTORE_COMPLETED", .object(data))
        }
        return [:]
    }

    /// `query-live-restore`: one entry per live restore export.
    func queryLiveRestores() -> JSONValue {
        .array(registry.all.compactMap { export -> JSONValue? in
            guard let copier = export.liveRestore else { return nil }
            let total = Int64(clamping: export.size)
            let done = Int64(copier.fractionDone * Double(total))
            var entry: [String: JSONValue] = [
                "id": .string(export.id), "target": .string(copier.target), "total-bytes": .int(total),
                "done-bytes": .int(min(done, total)), "complete": .bool(copier.isComplete),
            ]
            if let failure = copier.failure { entry["error"] = .string(failure) }
            return .object(entry)
        })
    }
}
