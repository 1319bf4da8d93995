/// Spec names of option and command codes, for log lines and error messages a person
/// reads next to the NBD spec or a packet capture.
public enum NBDNames {
    /// `NBD_OPT_GO` for 7; `option 42` for a code the spec does not name.
    public static func option(_ code: UInt32) -> String {
        switch code {
        case NBDOption.exportName: return "NBD_OPT_EXPORT_NAME"
        case NBDOption.abort: return "NBD_OPT_ABORT"
        case NBDOption.list: return "NBD_OPT_LIST"
        case NBDOption.peekExport: return "NBD_OPT_PEEK_EXPORT"
        case NBDOption.startTLS: return "NBD_OPT_STARTTLS"
        case NBDOption.info: return "NBD_OPT_INFO"
        case NBDOption.go: return "NBD_OPT_GO"
        case NBDOption.structuredReply: return "NBD_OPT_STRUCTURED_REPLY"
        case NBDOption.listMetaContext: return "NBD_OPT_LIST_META_CONTEXT"
        case NBDOption.setMetaContext: return "NBD_OPT_SET_META_CONTEXT"
        case NBDOption.extendedHeaders: return "NBD_OPT_EXTENDED_HEADERS"
        default: return "option \(code)"
        }
    }

    /// `NBD_CMD_READ` for 0; `command 42` for a code the spec does not name.
    public static func command(_ code: UInt16) -> String {
        guard let type = NBDCommandType(rawValue: code) else { return "command \(code)" }
        switch type {
        case .read: return "NBD_CMD_READ"
        case .write: return "NBD_CMD_WRITE"
        case .disconnect: return "NBD_CMD_DISC"
        case .flush: return "NBD_CMD_FLUSH"
        case .trim: return "NBD_CMD_TRIM"
        case .cache: return "NBD_CMD_CACHE"
        case .writeZeroes: return "NBD_CMD_WRITE_ZEROES"
        case .blockStatus: return "NBD_CMD_BLOCK_STATUS"
        }
    }
}
