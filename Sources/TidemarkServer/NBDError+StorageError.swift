import BlockStorage
import NBDProtocol

extension NBDError {
    /// The protocol error a client gets for a storage failure of `command`.
    init(storageError error: StorageError, command: NBDCommandType) {
        if case .notSupported = error {
            self = .unsupported(by: command)
        } else {
            self.init(errno: error.errno)
        }
    }
}
