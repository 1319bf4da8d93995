import NBDProtocol

extension HandshakeFailure {
    /// The `reason` label of `tidemark_handshake_failures_total`: a fixed word per case,
    /// never the client's data (an export name asked for is not a label value).
    var metricReason: String {
        switch self {
        case .unknownClientFlags: return "unknown_client_flags"
        case .badOptionMagic: return "bad_option_magic"
        case .optionTooLong: return "option_too_long"
        case .tooManyOptions: return "too_many_options"
        case .optionNotAllowedWithoutFixedNewstyle: return "needs_fixed_newstyle"
        case .unknownExport: return "unknown_export"
        case .invalidExportName: return "invalid_export_name"
        case .exportNameBeforeTLS: return "tls_required"
        case .exportNameAfterExtendedHeaders: return "export_name_after_extended_headers"
        }
    }
}
