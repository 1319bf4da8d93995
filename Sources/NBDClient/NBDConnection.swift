import CLibNBD

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A base:allocation-style extent as libnbd reports it: a length and the context's flags.
public typealias NBDExtent = (length: UInt32, flags: UInt32)

/// One libnbd handle: a synchronous NBD client connection.
///
/// Why a wrapper at all: the integration tests, the backup client and the benchmarks all
/// need to drive a server through the same C library the standard tools (nbdinfo,
/// nbdcopy, fio's nbd engine) use, so that the server is tested against real client
/// behaviour rather than against our own reading of the spec. The wrapper turns libnbd's
/// `-1` + thread-local error convention into typed Swift errors and hides the C callback
/// plumbing of block status and option-mode listings.
///
/// Lifecycle: configure (``init(_:)``), connect (``connect(uri:)``,
/// ``connect(unixSocket:)`` or ``connect(host:port:)``), issue commands, then
/// ``shutdown()``. The handle is closed when the object is released.
///
/// Each synchronous command waits for its reply; ``pipelinedWrites(_:)`` and
/// ``pipelinedReads(_:)`` put many commands in flight on one connection, as real clients do.
///
/// Sendability: this is `@unchecked Sendable` because libnbd protects every handle with
/// its own lock — every `nbd_*` call on a handle may be made from any thread, and
/// concurrent calls are serialised inside the library. The Swift object holds only the
/// immutable handle pointer and an immutable configuration, so there is no Swift state to
/// race on. Error details are thread-local in libnbd and are read on the calling thread
/// right after the failing call (see ``NBDClientError``).
public final class NBDConnection: @unchecked Sendable {
    /// The libnbd handle. Never NULL; closed in `deinit`.
    let handle: OpaquePointer
    /// The settings applied before connecting.
    public let configuration: NBDConnectionConfiguration

    /// Creates a handle and applies `configuration`; does not connect yet.
    public init(_ configuration: NBDConnectionConfiguration = NBDConnectionConfiguration()) throws(NBDClientError) {
        guard let handle = nbd_create() else {
            throw NBDClientError.last("nbd_create")
        }
        self.handle = handle
        self.configuration = configuration
        // From here on `deinit` closes the handle if a setting below fails.
        try call("nbd_set_debug") { nbd_set_debug($0, configuration.debug) }
        try call("nbd_set_export_name") { nbd_set_export_name($0, configuration.exportName) }
        try call("nbd_set_request_structured_replies") {
            nbd_set_request_structured_replies($0, configuration.requestStructuredReplies)
        }
        for context in configuration.metaContexts {
            try call("nbd_add_meta_context") { nbd_add_meta_context($0, context) }
        }
        if let strict = configuration.strictMode {
            try call("nbd_set_strict_mode") { nbd_set_strict_mode($0, strict.rawValue) }
        }
        if let flags = configuration.handshakeFlags {
            try call("nbd_set_handshake_flags") { nbd_set_handshake_flags($0, flags.rawValue) }
        }
        try call("nbd_set_request_block_size") {
            nbd_set_request_block_size($0, configuration.requestBlockSize)
        }
        try call("nbd_set_full_info") { nbd_set_full_info($0, configuration.fullInfo) }
        try call("nbd_set_opt_mode") { nbd_set_opt_mode($0, configuration.optMode) }
        try call("nbd_set_pread_initialize") { nbd_set_pread_initialize($0, configuration.initializeReadBuffers) }
        try call("nbd_set_uri_allow_local_file") {
            nbd_set_uri_allow_local_file($0, configuration.allowLocalFilesInURI)
        }
        if let tls = configuration.tls {
            try call("nbd_set_tls") { nbd_set_tls($0, LIBNBD_TLS_REQUIRE) }
            if let directory = tls.certificatesDirectory {
                try call("nbd_set_tls_certificates") { nbd_set_tls_certificates($0, directory) }
            }
            if let file = tls.pskFile {
                try call("nbd_set_tls_psk_file") { nbd_set_tls_psk_file($0, file) }
            }
            if let username = tls.username {
                try call("nbd_set_tls_username") { nbd_set_tls_username($0, username) }
            }
            try call("nbd_set_tls_verify_peer") { nbd_set_tls_verify_peer($0, tls.verifyPeer) }
        }
    }

    deinit {
        nbd_close(handle)
    }

    // MARK: - Connecting

    /// Connects to an NBD URI such as `nbd+unix:///NAME?socket=PATH` or
    /// `nbd://127.0.0.1:10809/NAME`. The export name comes from the URI.
    public func connect(uri: String) throws(NBDClientError) {
        try call("nbd_connect_uri") { nbd_connect_uri($0, uri) }
    }

    /// Connects to a server listening on a Unix domain socket, opening
    /// ``NBDConnectionConfiguration/exportName``.
    public func connect(unixSocket path: String) throws(NBDClientError) {
        try call("nbd_connect_unix") { nbd_connect_unix($0, path) }
    }

    /// Connects over TCP, opening ``NBDConnectionConfiguration/exportName``.
    public func connect(host: String, port: Int) throws(NBDClientError) {
        try call("nbd_connect_tcp") { nbd_connect_tcp($0, host, String(port)) }
    }

    /// Sends `NBD_CMD_DISC` (after any queued commands) and lets the server close.
    /// Safe to call once; the handle itself is released in `deinit`.
    public func shutdown() throws(NBDClientError) {
        try call("nbd_shutdown") { nbd_shutdown($0, 0) }
    }

    // MARK: - State

    /// libnbd's name for the handle's state, such as `READY` or `DEAD` (for diagnostics).
    public var connectionState: String {
        nbd_connection_state(handle).map { String(cString: $0) } ?? "unknown"
    }

    /// True when the connection can take commands: it is neither dead nor closed.
    /// Tests use it to check that a server error did not cost the connection.
    public var isReady: Bool {
        nbd_aio_is_ready(handle) == 1
    }

    /// True after a protocol or transport failure killed the connection.
    public var isDead: Bool {
        nbd_aio_is_dead(handle) == 1
    }

    /// True while in option mode, before `optGo` (or after a failed `optGo`).
    public var isNegotiating: Bool {
        nbd_aio_is_negotiating(handle) == 1
    }

    /// The handshake style, such as `newstyle-fixed`.
    public var protocolName: String? {
        nbd_get_protocol(handle).map { String(cString: $0) }
    }

    // MARK: - Export properties

    /// Export size in bytes.
    public var size: UInt64 {
        get throws(NBDClientError) {
            let value = nbd_get_size(handle)
            if value < 0 { throw NBDClientError.last("nbd_get_size") }
            return UInt64(value)
        }
    }

    public var isReadOnly: Bool { get throws(NBDClientError) { try flag("nbd_is_read_only") { nbd_is_read_only($0) } } }
    /// Whether the connection runs over TLS (`nbd_get_tls_negotiated`).
    public var tlsNegotiated: Bool {
        get throws(NBDClientError) { try flag("nbd_get_tls_negotiated") { nbd_get_tls_negotiated($0) } }
    }
    public var canFlush: Bool { get throws(NBDClientError) { try flag("nbd_can_flush") { nbd_can_flush($0) } } }
    public var canFUA: Bool { get throws(NBDClientError) { try flag("nbd_can_fua") { nbd_can_fua($0) } } }
    public var isRotational: Bool { get throws(NBDClientError) { try flag("nbd_is_rotational") { nbd_is_rotational($0) } } }
    public var canTrim: Bool { get throws(NBDClientError) { try flag("nbd_can_trim") { nbd_can_trim($0) } } }
    public var canZero: Bool { get throws(NBDClientError) { try flag("nbd_can_zero") { nbd_can_zero($0) } } }
    public var canFastZero: Bool { get throws(NBDClientError) { try flag("nbd_can_fast_zero") { nbd_can_fast_zero($0) } } }
    public var canDF: Bool { get throws(NBDClientError) { try flag("nbd_can_df") { nbd_can_df($0) } } }
    public var canMultiConn: Bool { get throws(NBDClientError) { try flag("nbd_can_multi_conn") { nbd_can_multi_conn($0) } } }
    public var canCache: Bool { get throws(NBDClientError) { try flag("nbd_can_cache") { nbd_can_cache($0) } } }

    /// Whether the server selected `name` in `NBD_OPT_SET_META_CONTEXT`.
    public func canMetaContext(_ name: String) throws(NBDClientError) -> Bool {
        try flag("nbd_can_meta_context") { nbd_can_meta_context($0, name) }
    }

    /// Whether the server acknowledged `NBD_OPT_STRUCTURED_REPLY`.
    public var structuredRepliesNegotiated: Bool {
        get throws(NBDClientError) {
            try flag("nbd_get_structured_replies_negotiated") { nbd_get_structured_replies_negotiated($0) }
        }
    }

    /// The block sizes the server advertised (0 for any it did not).
    public var blockSizes: NBDBlockSizes {
        get throws(NBDClientError) {
            func size(_ type: Int32, _ name: String) throws(NBDClientError) -> UInt32 {
                let value = nbd_get_block_size(handle, type)
                if value < 0 { throw NBDClientError.last("nbd_get_block_size(\(name))") }
                return UInt32(truncatingIfNeeded: value)
            }
            return NBDBlockSizes(
                minimum: try size(LIBNBD_SIZE_MINIMUM, "minimum"),
                preferred: try size(LIBNBD_SIZE_PREFERRED, "preferred"),
                maximum: try size(LIBNBD_SIZE_MAXIMUM, "maximum")
            )
        }
    }

    /// The export's canonical name (`NBD_INFO_NAME`); needs `fullInfo` in the configuration.
    public var canonicalExportName: String {
        get throws(NBDClientError) {
            try ownedString("nbd_get_canonical_export_name") { nbd_get_canonical_export_name($0) }
        }
    }

    /// The export's description (`NBD_INFO_DESCRIPTION`); needs `fullInfo` in the configuration.
    public var exportDescription: String {
        get throws(NBDClientError) {
            try ownedString("nbd_get_export_description") { nbd_get_export_description($0) }
        }
    }

    // MARK: - Commands

    /// `NBD_CMD_READ`: reads `count` bytes at `offset`.
    ///
    /// libnbd's plain `nbd_pread` takes no flags, so a read with flags (`.df`) goes through
    /// ``preadChunks(count:offset:flags:)``.
    public func pread(count: Int, offset: UInt64, flags: NBDCommandFlags = []) throws(NBDClientError) -> [UInt8] {
        if !flags.isEmpty {
            return try preadChunks(count: count, offset: offset, flags: flags).data
        }
        var failure: NBDClientError?
        // At least one byte of capacity so the buffer pointer is never NULL, even for the
        // zero-length reads tests send with strict mode off.
        let data = [UInt8](unsafeUninitializedCapacity: max(count, 1)) { buffer, initialized in
            // libnbd zero-fills the buffer before reading (pread_initialize defaults on),
            // so the bytes are initialised whether or not the read succeeds.
            if nbd_pread(handle, buffer.baseAddress!, count, offset, flags.rawValue) == -1 {
                failure = NBDClientError.last("nbd_pread")
            }
            initialized = count
        }
        if let failure { throw failure }
        return data
    }

    /// `NBD_CMD_READ` through `nbd_pread_structured`: the data plus the structured-reply
    /// chunks it arrived in (one `.data` chunk at most when `flags` has `.df`). Without
    /// structured replies libnbd reports the whole simple reply as one data chunk.
    public func preadChunks(
        count: Int, offset: UInt64, flags: NBDCommandFlags = []
    ) throws(NBDClientError) -> (data: [UInt8], chunks: [NBDReadChunk]) {
        let collector = ChunkCollector()
        let callback = nbd_chunk_callback(
            callback: { userData, _, count, offset, status, _ in
                guard let userData else { return 0 }
                let collector = Unmanaged<ChunkCollector>.fromOpaque(userData).takeUnretainedValue()
                collector.append(offset: offset, count: count, status: status)
                return 0
            },
            // Unretained: the call is synchronous and `collector` outlives it.
            user_data: Unmanaged.passUnretained(collector).toOpaque(),
            free: nil
        )
        var failure: NBDClientError?
        let data = withExtendedLifetime(collector) {
            [UInt8](unsafeUninitializedCapacity: max(count, 1)) { buffer, initialized in
                if nbd_pread_structured(handle, buffer.baseAddress!, count, offset, callback, flags.rawValue) == -1 {
                    failure = NBDClientError.last("nbd_pread_structured")
                }
                initialized = count
            }
        }
        if let failure { throw failure }
        return (data, collector.chunks)
    }

    /// `NBD_CMD_WRITE`: writes `data` at `offset`. Flags: `.fua`.
    public func pwrite(_ data: [UInt8], offset: UInt64, flags: NBDCommandFlags = []) throws(NBDClientError) {
        var failure: NBDClientError?
        data.withUnsafeBytes { bytes in
            var dummy: UInt8 = 0
            let result = withUnsafeBytes(of: &dummy) { fallback in
                nbd_pwrite(handle, bytes.baseAddress ?? fallback.baseAddress!, bytes.count, offset, flags.rawValue)
            }
            if result == -1 {
                failure = NBDClientError.last("nbd_pwrite")
            }
        }
        if let failure { throw failure }
    }

    /// `NBD_CMD_FLUSH`: makes every completed write durable.
    public func flush(flags: NBDCommandFlags = []) throws(NBDClientError) {
        try call("nbd_flush") { nbd_flush($0, flags.rawValue) }
    }

    /// `NBD_CMD_TRIM`: the range may be discarded. Flags: `.fua`.
    public func trim(count: UInt64, offset: UInt64, flags: NBDCommandFlags = []) throws(NBDClientError) {
        try call("nbd_trim") { nbd_trim($0, count, offset, flags.rawValue) }
    }

    /// `NBD_CMD_WRITE_ZEROES`: the range reads back as zeroes.
    /// Flags: `.noHole` (keep it allocated), `.fastZero` (fail with ENOTSUP unless fast),
    /// `.fua`.
    public func zero(count: UInt64, offset: UInt64, flags: NBDCommandFlags = []) throws(NBDClientError) {
        try call("nbd_zero") { nbd_zero($0, count, offset, flags.rawValue) }
    }

    /// `NBD_CMD_CACHE`: advisory prefetch of the range.
    public func cache(count: UInt64, offset: UInt64, flags: NBDCommandFlags = []) throws(NBDClientError) {
        try call("nbd_cache") { nbd_cache($0, count, offset, flags.rawValue) }
    }

    /// `NBD_CMD_BLOCK_STATUS`: the extents of every selected metadata context, keyed by
    /// context name, starting at `offset`. Flags: `.reqOne`.
    ///
    /// The extents of one context are consecutive; the last may run past
    /// `offset + count` and the list may also stop short, as the protocol allows.
    public func blockStatus(
        count: UInt64, offset: UInt64, flags: NBDCommandFlags = []
    ) throws(NBDClientError) -> [String: [NBDExtent]] {
        let collector = ExtentCollector()
        let callback = nbd_extent_callback(
            callback: { userData, context, _, entries, entryCount, _ in
                guard let userData, let context else { return 0 }
                let collector = Unmanaged<ExtentCollector>.fromOpaque(userData).takeUnretainedValue()
                collector.append(
                    context: String(cString: context),
                    entries: UnsafeBufferPointer(start: entries, count: entryCount)
                )
                return 0
            },
            // Unretained: the call is synchronous and `collector` outlives it (see below),
            // so libnbd needs no free callback.
            user_data: Unmanaged.passUnretained(collector).toOpaque(),
            free: nil
        )
        let result = withExtendedLifetime(collector) {
            nbd_block_status(handle, count, offset, callback, flags.rawValue)
        }
        if result == -1 { throw NBDClientError.last("nbd_block_status") }
        return collector.extents
    }

    // MARK: - Helpers

    /// Runs a libnbd call that returns `-1` on failure and turns that into an error.
    @discardableResult
    func call(_ name: String, _ body: (OpaquePointer) -> Int32) throws(NBDClientError) -> Int32 {
        let result = body(handle)
        if result == -1 { throw NBDClientError.last(name) }
        return result
    }

    /// Runs a libnbd predicate (`1` true, `0` false, `-1` error).
    func flag(_ name: String, _ body: (OpaquePointer) -> Int32) throws(NBDClientError) -> Bool {
        try call(name, body) != 0
    }

    /// Runs a libnbd call returning a malloc'd string (NULL on failure) and frees it.
    func ownedString(_ name: String, _ body: (OpaquePointer) -> UnsafeMutablePointer<CChar>?) throws(NBDClientError) -> String {
        guard let pointer = body(handle) else { throw NBDClientError.last(name) }
        defer { free(pointer) }
        return String(cString: pointer)
    }
}
