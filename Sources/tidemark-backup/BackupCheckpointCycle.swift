import TidemarkBackup
import QMPWire

/// The `--control` cycle of a backup from a Tidemark server: create a checkpoint with a
/// point-in-time view, pull from the view, complete the checkpoint on success, abort it on
/// failure (its changes are merged back into the bitmap, so nothing is lost).
///
/// The QMP connection stays open for the whole pull: if this process dies, the server
/// sees the disconnect and aborts the checkpoint itself (`abort-on-disconnect`, on by
/// default).
///
/// QMP used: `checkpoint-create {node, bitmap, view: true}` → `{name, bitmap, count, view,
/// changes-view}`; `checkpoint-complete {node, name}`; `checkpoint-abort {node, name}`.
struct BackupCheckpointCycle {
    let controlSocket: String
    /// The export (QMP node) name.
    let node: String
    let bitmap: String

    /// What the server created.
    struct Checkpoint {
        var name: String
        /// The export name of the read-only point-in-time view.
        var view: String
        /// Unique id; the next incremental backup must start from it.
        var id: String
        /// The bitmap's last completed checkpoint (name and id): the increment holds every
        /// change since it, and since each checkpoint id in `covers`.
        var baseName: String?
        var baseID: String?
        var covers: [String]
    }

    /// Runs `pull` against the checkpoint and finishes it according to the outcome.
    func run<T>(_ pull: (Checkpoint) throws -> T) throws -> T {
        let client: QMPClient
        let reply: JSONValue
        do {
            client = try QMPClient(socketPath: controlSocket)
            reply = try client.execute(
                "checkpoint-create", .object(["node": .string(node), "bitmap": .string(bitmap), "view": .bool(true)]))
        } catch {
            throw BackupError.control("checkpoint-create of bitmap '\(bitmap)' on '\(node)' failed: \(error)")
        }
        guard case .string(let name)? = reply["name"] else {
            throw BackupError.control("checkpoint-create returned no name: \(reply.serialized())")
        }
        guard case .string(let view)? = reply["view"] else {
            _ = try? client.execute("checkpoint-abort", .object(["node": .string(node), "name": .string(name)]))
            throw BackupError.control(
                "checkpoint-create returned no point-in-time view (does this server support \"view\": true?): "
                    + reply.serialized())
        }
        guard case .string(let id)? = reply["id"] else {
            _ = try? client.execute("checkpoint-abort", .object(["node": .string(node), "name": .string(name)]))
            throw BackupError.control(
                "checkpoint-create returned no checkpoint id, so nothing proves where its changes start (is the "
                    + "server older than this client?): " + reply.serialized())
        }
        var covers: [String] = []
        if case .array(let ids)? = reply["covers"] {
            for case .string(let covered) in ids { covers.append(covered) }
        }
        var baseName: String?
        var baseID: String?
        if case .string(let value)? = reply["base"] { baseName = value }
        if case .string(let value)? = reply["base-id"] { baseID = value }
        let result: T
        do {
            result = try pull(
                Checkpoint(name: name, view: view, id: id, baseName: baseName, baseID: baseID, covers: covers))
        } catch {
            do {
                _ = try client.execute("checkpoint-abort", .object(["node": .string(node), "name": .string(name)]))
            } catch let abortError {
                throw BackupError.control("the backup failed (\(error)) and checkpoint-abort of \(name) failed too: \(abortError)")
            }
            throw error
        }
        do {
            _ = try client.execute("checkpoint-complete", .object(["node": .string(node), "name": .string(name)]))
        } catch {
            throw BackupError.control(
                "the backup is complete but checkpoint-complete of \(name) failed: \(error); the changes stay recorded, "
                    + "the next incremental backup will copy them again")
        }
        return result
    }
}
