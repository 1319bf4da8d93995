import CLibNBD

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Option mode: driving the handshake one option at a time.
///
/// With ``NBDConnectionConfiguration/optMode`` set, `connect` stops in the negotiation
/// phase (after structured replies). These calls then send single options, so tests can
/// check the server's answers to `NBD_OPT_LIST`, `NBD_OPT_INFO`,
/// `NBD_OPT_LIST_META_CONTEXT`, `NBD_OPT_GO` and `NBD_OPT_ABORT` directly instead of
/// through a tool's output. All of them exist in libnbd 1.14.
extension NBDConnection {
    /// Selects the export that later `optInfo`, `optGo` and `optListMetaContexts` refer to.
    public func setExportName(_ name: String) throws(NBDClientError) {
        try call("nbd_set_export_name") { nbd_set_export_name($0, name) }
    }

    /// The export name currently set on the handle.
    public var exportName: String {
        get throws(NBDClientError) {
            try ownedString("nbd_get_export_name") { nbd_get_export_name($0) }
        }
    }

    /// `NBD_OPT_LIST`: every export the server announces, with its description.
    public func optList() throws(NBDClientError) -> [NBDExportListing] {
        let collector = ListingCollector()
        let callback = nbd_list_callback(
            callback: { userData, name, description in
                guard let userData, let name else { return 0 }
                let collector = Unmanaged<ListingCollector>.fromOpaque(userData).takeUnretainedValue()
                collector.exports.append(
                    NBDExportListing(
                        name: String(cString: name),
                        description: description.map { String(cString: $0) } ?? ""
                    )
                )
                return 0
            },
            user_data: Unmanaged.passUnretained(collector).toOpaque(),
            free: nil
        )
        let result = withExtendedLifetime(collector) { nbd_opt_list(handle, callback) }
        if result == -1 { throw NBDClientError.last("nbd_opt_list") }
        return collector.exports
    }

    /// `NBD_OPT_INFO` for `exportName` (or the name already set): afterwards `size`, the
    /// flag properties and `blockSizes` describe that export, and the handle stays in
    /// negotiation.
    public func optInfo(exportName: String? = nil) throws(NBDClientError) {
        if let exportName { try setExportName(exportName) }
        try call("nbd_opt_info") { nbd_opt_info($0) }
    }

    /// `NBD_OPT_GO` for `exportName` (or the name already set). On failure the handle stays
    /// in negotiation, so another name can be tried.
    public func optGo(exportName: String? = nil) throws(NBDClientError) {
        if let exportName { try setExportName(exportName) }
        try call("nbd_opt_go") { nbd_opt_go($0) }
    }

    /// `NBD_OPT_ABORT`: ends negotiation without entering transmission.
    public func optAbort() throws(NBDClientError) {
        try call("nbd_opt_abort") { nbd_opt_abort($0) }
    }

    /// `NBD_OPT_LIST_META_CONTEXT` with `queries` (empty: "everything you have") for
    /// `exportName` (or the name already set). Returns the context names in the order the
    /// server sent them.
    ///
    /// libnbd sends the handle's requested-context list as the queries, so this swaps
    /// `queries` in for the call and restores the configured list afterwards; a later
    /// `optGo` still selects the contexts from the configuration.
    public func optListMetaContexts(
        _ queries: [String] = [], exportName: String? = nil
    ) throws(NBDClientError) -> [String] {
        if let exportName { try setExportName(exportName) }
        let saved = try requestedMetaContexts()
        try replaceRequestedMetaContexts(with: queries)
        let collector = ContextCollector()
        let callback = nbd_context_callback(
            callback: { userData, name in
                guard let userData, let name else { return 0 }
                let collector = Unmanaged<ContextCollector>.fromOpaque(userData).takeUnretainedValue()
                collector.names.append(String(cString: name))
                return 0
            },
            user_data: Unmanaged.passUnretained(collector).toOpaque(),
            free: nil
        )
        let result = withExtendedLifetime(collector) { nbd_opt_list_meta_context(handle, callback) }
        let failure = result == -1 ? NBDClientError.last("nbd_opt_list_meta_context") : nil
        try replaceRequestedMetaContexts(with: saved)
        if let failure { throw failure }
        return collector.names
    }

    /// The metadata contexts the handle will ask for in `NBD_OPT_SET_META_CONTEXT`.
    public func requestedMetaContexts() throws(NBDClientError) -> [String] {
        let count = nbd_get_nr_meta_contexts(handle)
        if count < 0 { throw NBDClientError.last("nbd_get_nr_meta_contexts") }
        var names: [String] = []
        for index in 0..<count {
            names.append(try ownedString("nbd_get_meta_context") { nbd_get_meta_context($0, index) })
        }
        return names
    }

    /// Replaces the contexts the handle will ask for (before connecting or while
    /// negotiating).
    public func replaceRequestedMetaContexts(with names: [String]) throws(NBDClientError) {
        try call("nbd_clear_meta_contexts") { nbd_clear_meta_contexts($0) }
        for name in names {
            try call("nbd_add_meta_context") { nbd_add_meta_context($0, name) }
        }
    }
}
