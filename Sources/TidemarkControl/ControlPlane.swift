import QMPWire
import DirtyTracking
import Logging
import NIOCore
import NIOPosix
import Synchronization
import TidemarkServer

#if canImport(Glibc)
import Glibc
#endif

/// The management side of a running server: QMP commands over the export registry.
///
/// Commands from every client run one at a time on a dedicated thread, in arrival
/// order: they may block (saving bitmaps fsyncs), must not stall the data path's event
/// loops, and serialising them makes a transaction's dry run and its application see the
/// same state. Asynchronous events go to every connected client.
public final class ControlPlane: Sendable {
    /// A pending checkpoint's owner, for abort-on-disconnect.
    struct CheckpointOwner {
        var session: UInt64
        var abortOnDisconnect: Bool
        var timeout: TimeAmount
    }

    struct CheckpointKey: Hashable {
        var node: String
        var name: String
    }

    struct State {
        var subscribers: [UInt64: @Sendable (JSONValue) -> Void] = [:]
        var owners: [CheckpointKey: CheckpointOwner] = [:]
        var nextSession: UInt64 = 1
        /// Checkpoints folded into a later one, so completing or aborting them gets an
        /// error that says where their changes went (the newest few hundred).
        var superseded: [CheckpointKey: String] = [:]
        var supersededOrder: [CheckpointKey] = []
    }

    /// Session id of checkpoints whose creator is unknown: pending ones found in a store at
    /// start, or on an export added later. No client ever has it.
    static let noSession: UInt64 = 0

    public static let version = (major: 0, minor: 1, micro: 0)

    /// The version as QMP reports it, in the greeting and in `query-version`.
    public static var versionInfo: JSONValue {
        [
            "qemu": [
                "major": .int(Int64(version.major)), "minor": .int(Int64(version.minor)),
                "micro": .int(Int64(version.micro)),
            ],
            "package": "tidemark",
        ]
    }

    let registry: ExportRegistry
    let logger: Logger
    /// How long a checkpoint whose client disconnected stays pending before it is aborted.
    let defaultCheckpointTimeout: TimeAmount
    /// The server's `--state-dir`: `block-export-add` opens stores where the command line
    /// would (nil: beside files, the default state directory for block devices).
    let stateDirectory: String?
    private let worker: NIOThreadPool
    let timerLoop: any EventLoop
    private let state = Mutex(State())
    private let quitHandler: @Sendable () -> Void

    /// - Parameters:
    ///   - timerLoop: runs the checkpoint timeouts.
    ///   - onQuit: called after `quit` has been answered.
    ///   - stateDirectory: the server's `--state-dir`, for exports added later.
    public init(
        registry: ExportRegistry, logger: Logger, checkpointTimeout: TimeAmount = .seconds(60),
        timerLoop: any EventLoop, stateDirectory: String? = nil, onQuit: @escaping @Sendable () -> Void
    ) {
        self.registry = registry
        self.logger = logger
        self.defaultCheckpointTimeout = checkpointTimeout
        self.stateDirectory = stateDirectory
        self.worker = NIOThreadPool(numberOfThreads: 1)
        self.timerLoop = timerLoop
        self.quitHandler = onQuit
        worker.start()
        for export in registry.all { adoptPendingCheckpoints(of: export) }
    }

    public func shutdown() async {
        try? await worker.shutdownGracefully()
    }

    // MARK: - Sessions

    /// Registers a client; `send` delivers events to it (from any thread).
    public func openSession(send: @escaping @Sendable (JSONValue) -> Void) -> UInt64 {
        state.withLock { state in
            let id = state.nextSession
            state.nextSession += 1
            state.subscribers[id] = send
            return id
        }
    }

    /// Forgets a client and starts the abort timer of every checkpoint it owns that
    /// asked to be aborted on disconnect.
    public func closeSession(_ id: UInt64) {
        let orphaned = state.withLock { state -> [(CheckpointKey, TimeAmount)] in
            state.subscribers[id] = nil
            return state.owners.filter { $0.value.session == id && $0.value.abortOnDisconnect }
                .map { ($0.key, $0.value.timeout) }
        }
        for (key, timeout) in orphaned { scheduleOrphanAbort(key, session: id, after: timeout) }
    }

    private func abortOrphaned(_ key: CheckpointKey, session: UInt64) {
        let stillOrphaned = state.withLock { state in
            guard let owner = state.owners[key], owner.session == session else { return false }
            return state.subscribers[session] == nil
        }
        guard stillOrphaned, let export = registry.export(named: key.node) else { return }
        do {
            emitViewClosed(try registry.finishCheckpoint(export: export, increment: key.name, completed: false))
            forgetOwner(key)
            logger.warning("checkpoint '\(key.name)' on '\(key.node)' aborted: its client disconnected")
            emit("CHECKPOINT_ABORTED", ["node": .string(key.node), "name": .string(key.name), "reason": "client-disconnected"])
        } catch {
            logger.error("aborting orphaned checkpoint '\(key.name)' failed: \(error)")
        }
    }

    func recordOwner(_ key: CheckpointKey, _ owner: CheckpointOwner) {
        state.withLock { $0.owners[key] = owner }
    }

    /// Re-arms abort-on-disconnect for checkpoints that were pending when the export's
    /// store was opened (an earlier run of the server, killed or stopped mid-backup): their
    /// creator is gone, so they are aborted (changes merged back into their bitmap) after
    /// the default timeout unless completed first, and the next checkpoint of their bitmap
    /// supersedes them at once.
    func adoptPendingCheckpoints(of export: Export) {
        let pending = export.bitmaps.filter { $0.checkpointOf != nil }
        for increment in pending {
            let key = CheckpointKey(node: export.name, name: increment.name)
            let adopted = state.withLock { state -> Bool in
                guard state.owners[key] == nil else { return false }
                state.owners[key] = CheckpointOwner(
                    session: Self.noSession, abortOnDisconnect: increment.abortOnDisconnect,
                    timeout: defaultCheckpointTimeout)
                return true
            }
            guard adopted else { continue }
            if increment.abortOnDisconnect {
                logger.warning(
                    "checkpoint '\(increment.name)' on '\(export.name)' is pending from an earlier run: it is aborted in \(defaultCheckpointTimeout.nanoseconds / 1_000_000_000) s unless completed, and the next checkpoint of '\(increment.checkpointOf ?? "")' supersedes it")
                scheduleOrphanAbort(key, session: Self.noSession, after: defaultCheckpointTimeout)
            } else {
                logger.info("checkpoint '\(increment.name)' on '\(export.name)' is pending from an earlier run")
            }
        }
    }

    private func scheduleOrphanAbort(_ key: CheckpointKey, session: UInt64, after timeout: TimeAmount) {
        timerLoop.scheduleTask(in: timeout) { [weak self] in
            guard let self else { return }
            self.worker.submit { _ in self.abortOrphaned(key, session: session) }
        }
    }

    /// True when the checkpoint's creator is a client still connected.
    func isOwnerConnected(_ key: CheckpointKey) -> Bool {
        state.withLock { state in
            guard let owner = state.owners[key] else { return false }
            return state.subscribers[owner.session] != nil
        }
    }

    func recordSuperseded(_ key: CheckpointKey, by successor: String) {
        state.withLock { state in
            if state.superseded.updateValue(successor, forKey: key) == nil { state.supersededOrder.append(key) }
            if state.supersededOrder.count > 512 {
                state.superseded[state.supersededOrder.removeFirst()] = nil
            }
        }
    }

    func supersededBy(_ key: CheckpointKey) -> String? {
        state.withLock { $0.superseded[key] }
    }

    func forgetOwner(_ key: CheckpointKey) {
        _ = state.withLock { $0.owners.removeValue(forKey: key) }
    }

    /// Sends an event to every client.
    func emit(_ event: String, _ data: JSONValue) {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        let message: JSONValue = [
            "event": .string(event), "data": data,
            "timestamp": ["seconds": .int(Int64(now.tv_sec)), "microseconds": .int(Int64(now.tv_nsec / 1000))],
        ]
        let subscribers = state.withLock { Array($0.subscribers.values) }
        for send in subscribers { send(message) }
    }

    // MARK: - Commands

    /// Runs a command on the control thread and completes on `eventLoop` with the
    /// `return` value or the error to send.
    public func submit(
        _ command: String, arguments: JSONValue?, session: UInt64, on eventLoop: any EventLoop
    ) -> EventLoopFuture<Result<JSONValue, QMPError>> {
        worker.runIfActive(eventLoop: eventLoop) { [self] in
            do throws(QMPError) {
                return .success(try execute(command, arguments: arguments, session: session))
            } catch {
                return .failure(error)
            }
        }
    }

    /// Called after the reply to `quit` went out.
    func quit() { quitHandler() }
}
