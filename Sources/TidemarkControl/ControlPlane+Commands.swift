import QMPWire
import BlockStorage
import DirtyTracking
import Logging
import NIOCore
import TidemarkServer

#if canImport(Glibc)
import Glibc
#endif

extension ControlPlane {
    /// Every command, as `query-commands` lists them.
    static let commandNames: [String] = [
        "qmp_capabilities", "query-version", "query-commands", "quit",
        "block-dirty-bitmap-add", "block-dirty-bitmap-remove", "block-dirty-bitmap-clear",
        "block-dirty-bitmap-enable", "block-dirty-bitmap-disable", "block-dirty-bitmap-merge",
        "transaction", "query-block-exports", "query-named-block-nodes", "query-checkpoints",
        "block-export-add", "block-export-del",
        "checkpoint-create", "checkpoint-complete", "checkpoint-abort",
        "live-restore-start", "query-live-restore",
    ]

    /// Bitmap commands that may appear as transaction actions, with their parameters.
    static let bitmapCommandParameters: [String: Set<String>] = [
        "block-dirty-bitmap-add": ["node", "name", "granularity", "persistent", "disabled"],
        "block-dirty-bitmap-remove": ["node", "name"],
        "block-dirty-bitmap-clear": ["node", "name"],
        "block-dirty-bitmap-enable": ["node", "name"],
        "block-dirty-bitmap-disable": ["node", "name"],
        "block-dirty-bitmap-merge": ["node", "target", "bitmaps"],
    ]

    func execute(_ command: String, arguments: JSONValue?, session: UInt64) throws(QMPError) -> JSONValue {
        if let parameters = Self.bitmapCommandParameters[command] {
            let (export, operation) = try bitmapOperation(command, QMPArguments(arguments, allowed: parameters))
            try perform([(export, [operation])])
            return [:]
        }
        switch command {
        case "qmp_capabilities":
            throw QMPError(.commandNotFound, "Capabilities negotiation is already complete, command ignored")
        case "query-version":
            _ = try QMPArguments(arguments, allowed: [])
            return Self.versionInfo
        case "query-commands":
            _ = try QMPArguments(arguments, allowed: [])
            return .array(Self.commandNames.map { ["name": .string($0)] })
        case "quit":
            _ = try QMPArguments(arguments, allowed: [])
            quit()
            return [:]
        case "transaction":
            return try transaction(QMPArguments(arguments, allowed: ["actions", "properties"]))
        case "query-block-exports":
            _ = try QMPArguments(arguments, allowed: [])
            return .array(registry.all.map { export in
                ["id": .string(export.id), "type": "nbd", "node-name": .string(export.name), "shutting-down": false]
            })
        case "query-named-block-nodes":
            _ = try QMPArguments(arguments, allowed: ["flat"])
            return .array(registry.all.map(Self.describeNode))
        case "query-checkpoints":
            _ = try QMPArguments(arguments, allowed: [])
            return .array(registry.all.flatMap { export in
                export.isView ? [] : export.bitmaps.compactMap { bitmap -> JSONValue? in
                    guard let origin = bitmap.checkpointOf else { return nil }
                    var entry: [String: JSONValue] = [
                        "node": .string(export.name), "name": .string(bitmap.name), "bitmap": .string(origin),
                        "count": .int(Int64(bitmap.count)), "id": bitmap.checkpointID.map { .string($0) } ?? .null,
                        "abort-on-disconnect": .bool(bitmap.abortOnDisconnect),
                    ]
                    entry.merge(Self.describeLineage(bitmap.lineage)) { _, new in new }
                    if let open = export.view(ofCheckpoint: bitmap.name) {
                        entry["view"] = .string(open.exportNames[0])
                        entry["changes-view"] = .string(open.exportNames[1])
                        entry["view-preserved-bytes"] = .int(Int64(clamping: open.preservedBytes))
                        entry["view-sidecar-bytes"] = .int(Int64(clamping: open.sidecarBytes))
                        if let failure = open.failure { entry["view-error"] = .string(failure) }
                    }
                    return .object(entry)
                }
            })
        case "block-export-add":
            return try addExport(QMPArguments(
                arguments, allowed: ["type", "id", "filename", "name", "node-name", "writable", "description"]))
        case "block-export-del":
            return try deleteExport(QMPArguments(arguments, allowed: ["id", "mode"]))
        case "live-restore-start":
            return try startLiveRestore(QMPArguments(arguments, allowed: ["id", "source", "target", "rate", "name"]))
        case "query-live-restore":
            _ = try QMPArguments(arguments, allowed: [])
            return queryLiveRestores()
        case "checkpoint-create":
            return try createCheckpoint(
                QMPArguments(
                    arguments,
                    allowed: ["node", "bitmap", "name", "consume", "abort-on-disconnect", "timeout", "view"]),
                session: session)
        case "checkpoint-complete", "checkpoint-abort":
            return try finishCheckpoint(command, QMPArguments(arguments, allowed: ["node", "name"]))
        default:
            throw QMPError(.commandNotFound, "The command \(command) has not been found")
        }
    }

    // MARK: - Bitmaps

    func export(_ node: String) throws(QMPError) -> Export {
        guard let export = registry.export(named: node), !node.isEmpty else {
            throw QMPError(.genericError, "Cannot find device=\(node) nor node_name=\(node)")
        }
        return export
    }

    /// Turns one bitmap command into the operation it stands for.
    func bitmapOperation(_ command: String, _ arguments: QMPArguments) throws(QMPError) -> (Export, BitmapOperation) {
        let export = try export(arguments.string("node"))
        guard !export.isView else {
            throw QMPError(.genericError, "'\(export.name)' is a point-in-time view; its bitmaps belong to its export")
        }
        switch command {
        case "block-dirty-bitmap-add":
            let name = try arguments.string("name")
            let granularity = try arguments.optionalUInt("granularity") ?? BitmapLimits.defaultGranularity
            return (export, .add(
                name: name, granularity: granularity, persistent: try arguments.bool("persistent", default: false),
                recording: !(try arguments.bool("disabled", default: false))))
        case "block-dirty-bitmap-remove":
            return (export, .remove(name: try arguments.string("name")))
        case "block-dirty-bitmap-clear":
            return (export, .clear(name: try arguments.string("name")))
        case "block-dirty-bitmap-enable":
            return (export, .setRecording(name: try arguments.string("name"), true))
        case "block-dirty-bitmap-disable":
            return (export, .setRecording(name: try arguments.string("name"), false))
        case "block-dirty-bitmap-merge":
            let target = try arguments.string("target")
            var sources: [String] = []
            for source in try arguments.array("bitmaps") {
                switch source {
                case .string(let name):
                    sources.append(name)
                case .object(let pair):
                    guard case .string(let node)? = pair["node"], case .string(let name)? = pair["name"] else {
                        throw QMPError(.genericError, "Invalid parameter type for 'bitmaps', expected: string or {node, name}")
                    }
                    guard node == export.name else {
                        throw QMPError(.genericError, "Merging bitmaps of another node ('\(node)') is not supported")
                    }
                    sources.append(name)
                default:
                    throw QMPError(.genericError, "Invalid parameter type for 'bitmaps', expected: string or {node, name}")
                }
            }
            return (export, .merge(target: target, sources: sources))
        default:
            throw QMPError(.commandNotFound, "The command \(command) has not been found")
        }
    }

    /// Applies operations grouped by export, all or nothing (the registry checks every
    /// group first; commands run one at a time, so nothing changes in between).
    func perform(_ groups: [(Export, [BitmapOperation])]) throws(QMPError) {
        do throws(ServerError) {
            try registry.perform(groups)
        } catch {
            throw QMPError(.genericError, error.description)
        }
    }

    func transaction(_ arguments: QMPArguments) throws(QMPError) -> JSONValue {
        var groups: [(Export, [BitmapOperation])] = []
        for action in try arguments.array("actions") {
            guard case .string(let type)? = action["type"] else {
                throw QMPError(.genericError, "Parameter 'actions[].type' is missing")
            }
            if type == "abort" {
                throw QMPError(.genericError, "Transaction aborted using Abort action")
            }
            guard let parameters = Self.bitmapCommandParameters[type] else {
                throw QMPError(.genericError, "Invalid parameter 'type': '\(type)' is not a supported transaction action")
            }
            let (export, operation) = try bitmapOperation(type, QMPArguments(action["data"], allowed: parameters))
            groups.append((export, [operation]))
        }
        try perform(groups)
        return [:]
    }

    static func describeNode(_ export: Export) -> JSONValue {
        let offered = Set(export.offeredBitmaps)
        let bitmaps: [JSONValue] = export.bitmaps.filter { offered.contains($0.name) }.map { bitmap in
            var entry: [String: JSONValue] = [
                "name": .string(bitmap.name), "count": .int(Int64(bitmap.count)),
                "granularity": .int(Int64(bitmap.granularity)), "recording": .bool(bitmap.recording),
                "busy": .bool(bitmap.busy), "persistent": .bool(bitmap.persistent),
                "generation": .int(Int64(bitmap.generation)),
            ]
            if let origin = bitmap.checkpointOf { entry["checkpoint-of"] = .string(origin) }
            if let base = bitmap.lineage.base { entry["last-checkpoint"] = .string(base.name) }
            return .object(entry)
        }
        return [
            "node-name": .string(export.name), "drv": "raw", "file": .string(export.fileName),
            "ro": .bool(export.isReadOnly),
            "image": [
                "filename": .string(export.fileName), "format": "raw",
                "virtual-size": .int(Int64(clamping: export.size)),
            ],
            "dirty-bitmaps": .array(bitmaps),
        ]
    }

    // MARK: - Exports

    /// `block-export-add`: `id` is the export's identity for QMP (as in QEMU:
    /// `query-block-exports` reports it, `block-export-del` takes it); `name` is what NBD
    /// clients ask for and what bitmap commands take as `node` (default: `node-name`, else
    /// `id`). Both must be unused.
    func addExport(_ arguments: QMPArguments) throws(QMPError) -> JSONValue {
        if let type = try arguments.optionalString("type"), type != "nbd" {
            throw QMPError(.genericError, "Invalid parameter 'type': only 'nbd' exports exist")
        }
        let id = try arguments.string("id")
        guard let path = try arguments.optionalString("filename") else {
            throw QMPError(.genericError, "Parameter 'filename' is missing (the image to export)")
        }
        let nodeName = try arguments.optionalString("node-name")
        let name = try arguments.optionalString("name") ?? nodeName ?? id
        guard !id.isEmpty, id.utf8.count <= 4096 else {
            throw QMPError(.genericError, "export ids are 1 to 4096 bytes")
        }
        guard !name.isEmpty, name.utf8.count <= 4096 else {
            throw QMPError(.genericError, "export names are 1 to 4096 bytes")
        }
        guard registry.export(id: id) == nil else {
            throw QMPError(.genericError, ServerError.duplicateExportID(id).description)
        }
        guard registry.export(named: name) == nil else {
            throw QMPError(.genericError, "NBD server already has export named '\(name)'")
        }
        let readOnly = !(try arguments.bool("writable", default: false))
        let description = try arguments.optionalString("description") ?? ""
        let export: Export
        do {
            if ChainExportSpecification.isChain(path) {
                // A backup chain point: `writable` (or `:rw`) serves it through an overlay.
                var specification = try ChainExportSpecification(parsing: path)
                specification.writable = specification.writable || !readOnly
                export = try ExportOpener.openChain(
                    id: id, name: name, specification: specification, description: description, bitmaps: [],
                    stateDirectory: stateDirectory, logger: logger)
            } else {
                export = try ExportOpener.open(
                    id: id, name: name, path: path, readOnly: readOnly, description: description, bitmaps: [],
                    stateDirectory: stateDirectory, logger: logger)
            }
        } catch {
            throw QMPError(.genericError, "\(error)")
        }
        try register(export)
        adoptPendingCheckpoints(of: export)
        return [:]
    }

    /// `block-export-del`: by `id`, or by the name of a view's export (a view's id is its
    /// name). The removed export's bitmaps are saved as cleanly closed, so re-adding the
    /// image loads them at the same generation, and its store is unlocked as the tracker
    /// goes. NBD clients still attached keep the export (and may write) until they
    /// disconnect: the command waits up to `exportReleaseWait` for them; if some remain,
    /// the store is saved marked unclean, so the next open replays the journal and no
    /// dirty bit is lost.
    func deleteExport(_ arguments: QMPArguments) throws(QMPError) -> JSONValue {
        let id = try arguments.string("id")
        switch registry.deleteExport(id: id, releaseWait: Self.exportReleaseWait, loop: timerLoop) {
        case nil:
            throw QMPError(.genericError, "Export '\(id)' is not found")
        case .view(let closed):
            // A view's two exports share its sidecar: both go, the checkpoint stays pending.
            emitViewClosed(closed)
        case .export(let name, let closedViews, let released, let flushError, let saveError):
            emitViewClosed(closedViews)
            if let flushError { logger.error("flushing removed export '\(name)' failed: \(flushError)") }
            if !released {
                logger.warning(
                    "export '\(name)' removed while NBD clients still use it; its bitmaps stay marked unclean until the next open")
            }
            if let saveError { logger.error("saving bitmaps of removed export '\(name)' failed: \(saveError)") }
            emit("BLOCK_EXPORT_DELETED", ["id": .string(id)])
        }
        return [:]
    }

    /// How long `block-export-del` waits for connections to let go of the export: a client
    /// that just disconnected is released within milliseconds.
    static let exportReleaseWait: TimeAmount = .seconds(1)

    /// Tells every client a closed view's exports are gone.
    func emitViewClosed(_ exportNames: [String]) {
        for name in exportNames { emit("BLOCK_EXPORT_DELETED", ["id": .string(name)]) }
    }

    // MARK: - Checkpoints

    /// Creates a checkpoint of a bitmap, with a view if asked.
    ///
    /// A bitmap has at most one pending checkpoint. One whose creator is gone (it
    /// disconnected, exited like the CLI, or belonged to an earlier run of the server) is
    /// superseded: its increment is folded into the new one, which then holds everything
    /// since the bitmap's last completed checkpoint, and says so in `covers`. One whose
    /// creator is still connected makes this fail: two backups must not race.
    func createCheckpoint(_ arguments: QMPArguments, session: UInt64) throws(QMPError) -> JSONValue {
        let node = try arguments.string("node")
        let export = try export(node)
        let bitmap = try arguments.string("bitmap")
        let name = try arguments.optionalString("name") ?? export.nextCheckpointName
        // Every argument is checked before anything changes.
        let consume = try arguments.bool("consume", default: false)
        let timeout = try arguments.optionalUInt("timeout").map { TimeAmount.seconds(Int64(clamping: $0)) }
        let abortOnDisconnect = try arguments.bool("abort-on-disconnect", default: true)
        let withView = try arguments.bool("view", default: false)
        let superseded = export.bitmaps.filter { $0.checkpointOf == bitmap }.map(\.name).filter {
            !isOwnerConnected(CheckpointKey(node: node, name: $0))
        }
        let request = CheckpointRequest(
            bitmap: bitmap, increment: name, consume: consume, supersede: superseded,
            abortOnDisconnect: abortOnDisconnect)
        if withView && export.isView {
            throw QMPError(.genericError, "'\(node)' is a view; checkpoints are taken of live exports")
        }
        if withView && export.servesBackupChain {
            throw QMPError(
                .genericError, "'\(node)' serves a backup chain: its checkpoints take no point-in-time view (omit \"view\")")
        }
        let created: ExportRegistry.CreatedCheckpoint
        do throws(ServerError) {
            created = try registry.createCheckpoint(export: export, request: request, view: withView, loop: timerLoop)
        } catch {
            throw QMPError(.genericError, error.description)
        }
        let viewNames = created.viewNames
        recordOwner(
            CheckpointKey(node: node, name: name),
            CheckpointOwner(
                session: session, abortOnDisconnect: abortOnDisconnect, timeout: timeout ?? defaultCheckpointTimeout))
        for old in superseded {
            emitViewClosed(created.closedViews[old] ?? [])
            forgetOwner(CheckpointKey(node: node, name: old))
            recordSuperseded(CheckpointKey(node: node, name: old), by: name)
            logger.warning("checkpoint '\(old)' on '\(node)' was pending with its client gone: superseded by '\(name)', which holds its changes")
            emit(
                "CHECKPOINT_ABORTED",
                ["node": .string(node), "name": .string(old), "reason": "superseded", "superseded-by": .string(name)])
        }
        let info = export.bitmaps.first { $0.name == name }
        var event: [String: JSONValue] = [
            "node": .string(node), "name": .string(name), "bitmap": .string(bitmap), "consume": .bool(consume),
        ]
        var reply: [String: JSONValue] = [
            "name": .string(name), "bitmap": .string(bitmap), "count": .int(Int64(info?.count ?? 0)),
            "id": .string(request.id),
        ]
        if let info { reply.merge(Self.describeLineage(info.lineage)) { _, new in new } }
        if viewNames.count == 2 {
            event["view"] = .string(viewNames[0])
            reply["view"] = .string(viewNames[0])
            reply["changes-view"] = .string(viewNames[1])
        }
        emit("CHECKPOINT_CREATED", .object(event))
        return .object(reply)
    }

    /// `base` (name or null), `base-id` and `covers` (ids), as replies and queries show a
    /// lineage.
    static func describeLineage(_ lineage: CheckpointLineage) -> [String: JSONValue] {
        [
            "base": lineage.base.map { .string($0.name) } ?? .null,
            "base-id": lineage.base.map { .string($0.id) } ?? .null,
            "covers": .array(lineage.covers.map { .string($0) }),
        ]
    }

    func finishCheckpoint(_ command: String, _ arguments: QMPArguments) throws(QMPError) -> JSONValue {
        let node = try arguments.string("node")
        let export = try export(node)
        let name = try arguments.string("name")
        let completing = command == "checkpoint-complete"
        if let successor = supersededBy(CheckpointKey(node: node, name: name)) {
            throw QMPError(
                .genericError,
                "checkpoint '\(name)' was superseded by '\(successor)' after its client disconnected; its changes are in "
                    + "'\(successor)', so a backup of '\(name)' must not be recorded as complete")
        }
        do throws(ServerError) {
            emitViewClosed(try registry.finishCheckpoint(export: export, increment: name, completed: completing))
        } catch {
            throw QMPError(.genericError, error.description)
        }
        forgetOwner(CheckpointKey(node: node, name: name))
        emit(
            completing ? "CHECKPOINT_COMPLETED" : "CHECKPOINT_ABORTED",
            completing ? ["node": .string(node), "name": .string(name)]
                : ["node": .string(node), "name": .string(name), "reason": "requested"])
        return [:]
    }
}

extension ControlPlane {
    /// Serves a newly opened export; one that cannot be added (a name or id in use) is
    /// closed again before the error goes back to the client.
    func register(_ export: Export) throws(QMPError) {
        do {
            try registry.add(export)
        } catch {
            export.closeUnserved()
            throw QMPError(.genericError, error.description)
        }
    }
}
