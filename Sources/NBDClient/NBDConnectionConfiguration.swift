/// Everything libnbd must know *before* it connects.
///
/// libnbd negotiates the whole handshake inside `nbd_connect_*` (unless option mode is on),
/// so export name, structured replies, metadata contexts, block-size requests, strict mode
/// and handshake flags have to be set on the handle first. Collecting them in one value
/// keeps ``NBDConnection/init(_:)`` the single place where that ordering is enforced.
public struct NBDConnectionConfiguration: Sendable {
    /// Export to open. Ignored by ``NBDConnection/connect(uri:)``, which takes the name
    /// from the URI. The empty name asks the server for its default export.
    public var exportName: String = ""
    /// Send `NBD_OPT_STRUCTURED_REPLY` (needed for block status and DF reads).
    public var requestStructuredReplies: Bool = true
    /// Metadata contexts to select with `NBD_OPT_SET_META_CONTEXT`, such as
    /// `base:allocation`. Empty means no block status.
    public var metaContexts: [String] = []
    /// libnbd's client-side checks; `nil` keeps libnbd's default (all of them).
    public var strictMode: NBDStrictMode?
    /// Handshake flags the client offers; `nil` keeps libnbd's default (all of them).
    public var handshakeFlags: NBDHandshakeFlags?
    /// Ask for `NBD_INFO_BLOCK_SIZE` in `NBD_OPT_GO` (libnbd's default). A client that asks
    /// commits to the advertised alignment, so the server may then reject unaligned
    /// requests with EINVAL.
    public var requestBlockSize: Bool = true
    /// Ask for the canonical name and description too (`nbd_set_full_info`).
    public var fullInfo: Bool = false
    /// Stop in the negotiation phase after connecting (`nbd_set_opt_mode`), so that the
    /// caller can list exports and contexts before choosing one with `optGo`.
    public var optMode: Bool = false
    /// Log libnbd's protocol trace to stderr (`nbd_set_debug`).
    public var debug: Bool = false
    /// Zero every read buffer before reading into it (`nbd_set_pread_initialize`,
    /// libnbd's default), so a failed read can never expose old memory. Callers that only
    /// look at buffers of successful reads can turn it off and save a memset per read
    /// (6% of a full backup's CPU).
    public var initializeReadBuffers: Bool = true
    /// TLS settings; nil leaves TLS to the URI (`nbds://` requires it, `nbd://` has none).
    /// Given, `connect(host:port:)` and `connect(unixSocket:)` require TLS too.
    public var tls: NBDClientTLS?
    /// Let URIs name local files (`tls-certificates=`, `tls-psk-file=`), as nbdinfo and
    /// nbdcopy do (`nbd_set_uri_allow_local_file`). The URIs are the user's own.
    public var allowLocalFilesInURI: Bool = true

    public init(
        exportName: String = "",
        requestStructuredReplies: Bool = true,
        metaContexts: [String] = [],
        strictMode: NBDStrictMode? = nil,
        handshakeFlags: NBDHandshakeFlags? = nil,
        requestBlockSize: Bool = true,
        fullInfo: Bool = false,
        optMode: Bool = false,
        debug: Bool = false,
        initializeReadBuffers: Bool = true,
        tls: NBDClientTLS? = nil,
        allowLocalFilesInURI: Bool = true
    ) {
        self.exportName = exportName
        self.requestStructuredReplies = requestStructuredReplies
        self.metaContexts = metaContexts
        self.strictMode = strictMode
        self.handshakeFlags = handshakeFlags
        self.requestBlockSize = requestBlockSize
        self.fullInfo = fullInfo
        self.optMode = optMode
        self.debug = debug
        self.initializeReadBuffers = initializeReadBuffers
        self.tls = tls
        self.allowLocalFilesInURI = allowLocalFilesInURI
    }
}
