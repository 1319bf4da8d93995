import BackupChain
import NBDProtocol
import NIOCore

/// What a backup chain export does differently in the executor: CACHE reads ahead from
/// the chain's files (or the overlay where it holds data), not from `image` (the overlay
/// file or the chain's top file). Reads and block status go through `Export.content`;
/// writes, zeroes, trims and flushes through `ExportWrites`, which lands them in the
/// overlay.
extension CommandExecutor {
    /// Executes the commands a chain export handles itself; nil for the rest.
    func executeOnChain(
        _ command: NBDCommand, overlay: ChainOverlay?, cookie: UInt64, outbox: inout ByteBuffer
    ) -> CommandResult? {
        guard case .cache(let offset, let length) = command, case .chain(let chain, _) = export.content else { return nil }
        if let overlay {
            overlay.prefetch(at: offset, length: UInt64(length))
        } else {
            chain.prefetch(at: offset, length: UInt64(length))
        }
        NBDReplyEncoder.writeSimpleReply(cookie: cookie, error: 0, into: &outbox)
        return .written
    }
}
