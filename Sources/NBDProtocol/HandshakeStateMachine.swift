import NIOCore

/// What the connection handler must do after feeding bytes to the handshake.
public enum HandshakeAction: Equatable {
    /// Wait for more bytes; nothing was consumed beyond complete messages.
    case needMoreData
    /// One option was handled and its replies written to the output buffer; call again.
    case continueNegotiating
    /// The client sent `NBD_OPT_ABORT`: flush the ACK written to the output, then close.
    case abort
    /// Negotiation is over: flush the output and start transmission with this session.
    case enterTransmission(NBDSession)
    /// Hard-disconnect without replying (protocol violation or an unsatisfiable
    /// `NBD_OPT_EXPORT_NAME`). The output may hold nothing useful.
    case close(HandshakeFailure)
    /// The client's `NBD_OPT_STARTTLS` was accepted and its ACK is in the output: write and
    /// flush it in plaintext, then put TLS in front of the connection. Bytes still in the
    /// input belong to the TLS handshake (the client's ClientHello) and were not parsed:
    /// hand them to TLS. Call `tlsEstablished()` once the TLS handshake is done; until
    /// then `process` consumes nothing.
    case startTLS
}

/// Why the handshake ended the connection.
public enum HandshakeFailure: Error, Equatable, CustomStringConvertible {
    case unknownClientFlags(UInt32)
    case badOptionMagic(UInt64)
    case optionTooLong(UInt32)
    case tooManyOptions
    case optionNotAllowedWithoutFixedNewstyle(UInt32)
    case unknownExport(String)
    case invalidExportName
    /// `NBD_OPT_EXPORT_NAME` before TLS on a server that requires TLS: the option has no
    /// error reply, so the spec has the server close.
    case exportNameBeforeTLS
    /// `NBD_OPT_EXPORT_NAME` after extended headers were negotiated, which the spec forbids
    /// (its reply could not say the framing changed); qemu's server drops such clients too.
    case exportNameAfterExtendedHeaders

    public var description: String {
        switch self {
        case .unknownClientFlags(let flags): return "client sent unknown handshake flags 0x\(String(flags, radix: 16))"
        case .badOptionMagic(let magic): return "bad option magic 0x\(String(magic, radix: 16))"
        case .optionTooLong(let length): return "option of \(length) bytes exceeds the limit"
        case .tooManyOptions: return "too many options without choosing an export"
        case .optionNotAllowedWithoutFixedNewstyle(let option):
            return "\(NBDNames.option(option)) from a client that did not negotiate fixed newstyle"
        case .unknownExport(let name): return "NBD_OPT_EXPORT_NAME asked for unknown export '\(name)'"
        case .invalidExportName: return "NBD_OPT_EXPORT_NAME with an invalid name"
        case .exportNameBeforeTLS: return "NBD_OPT_EXPORT_NAME before STARTTLS on a server that requires TLS"
        case .exportNameAfterExtendedHeaders: return "NBD_OPT_EXPORT_NAME after NBD_OPT_EXTENDED_HEADERS"
        }
    }
}

/// The server side of the fixed-newstyle handshake, as a plain value.
///
/// Feed it whatever bytes arrived; it consumes complete options one at a time, writes
/// the replies into a caller-owned buffer and says what to do next. It never touches a
/// socket, so every rule of the spec is unit-tested by feeding bytes.
public struct HandshakeStateMachine {
    private enum State {
        case awaitingClientFlags
        case negotiating
        /// STARTTLS was acknowledged; the caller is running the TLS handshake.
        case awaitingTLS
        case finished
    }

    private var state: State = .awaitingClientFlags
    private var clientFlags: NBDClientFlags = []
    private var structuredReplies = false
    /// `NBD_OPT_EXTENDED_HEADERS` was acknowledged: 32-byte headers in transmission. It
    /// implies structured replies and takes precedence over them.
    private var extendedHeaders = false
    private var selectedContexts: [NBDSelectedContext] = []
    private var contextsExport: String?
    private var optionCount = 0
    private let offersStructuredReplies: Bool
    private let tlsPolicy: NBDTLSPolicy
    /// Whether TLS is up on this connection (STARTTLS succeeded and `tlsEstablished()`).
    public private(set) var tlsActive = false
    private let offersExtendedHeaders: Bool
    private var pendingRefusal: HandshakeRefusal?

    /// `offersStructuredReplies: false` answers `NBD_OPT_STRUCTURED_REPLY` with
    /// `NBD_REP_ERR_UNSUP`, as nbdkit's `--no-sr` does: clients then fall back to simple
    /// replies, which is how an old server behaves and how to test a client against one.
    /// Metadata contexts (block status, dirty bitmaps) need structured replies and are
    /// then refused.
    ///
    /// `offersExtendedHeaders: false` answers `NBD_OPT_EXTENDED_HEADERS` with
    /// `NBD_REP_ERR_UNSUP`, as a server without them: qemu ≥ 8.2 and libnbd ≥ 1.18 then
    /// fall back to compact headers. Without structured replies there are no extended
    /// headers either (they imply them).
    ///
    /// `tls` says whether `NBD_OPT_STARTTLS` is accepted and whether anything else is
    /// answered before it (see `NBDTLSPolicy`).
    public init(offersStructuredReplies: Bool = true, offersExtendedHeaders: Bool = true, tls: NBDTLSPolicy = .unavailable) {
        self.offersStructuredReplies = offersStructuredReplies
        self.offersExtendedHeaders = offersExtendedHeaders && offersStructuredReplies
        self.tlsPolicy = tls
    }

    /// The caller finished the TLS handshake that `.startTLS` asked for: negotiation
    /// resumes, encrypted, with nothing carried over from before STARTTLS.
    public mutating func tlsEstablished() {
        guard case .awaitingTLS = state else { return }
        tlsActive = true
        state = .negotiating
    }

    /// Forgets everything negotiated so far. STARTTLS calls it: the spec says no state
    /// negotiated in plaintext may survive into the TLS session (CVE-2021-3716 was a
    /// structured-reply option injected before STARTTLS and honoured after it).
    private mutating func resetNegotiation() {
        structuredReplies = false
        extendedHeaders = false
        selectedContexts = []
        contextsExport = nil
    }

    /// The flags the greeting advertises.
    public static let serverFlags: NBDHandshakeFlags = [.fixedNewstyle, .noZeroes]

    /// Writes the 18-byte greeting the server sends as soon as a client connects.
    public func writeGreeting(into output: inout ByteBuffer) {
        output.writeMultipleIntegers(NBDMagic.greeting, NBDMagic.option, Self.serverFlags.rawValue)
    }

    /// The refusal made by the last `process` call, if any, cleared by reading it: the
    /// connection logs it with its reason.
    public mutating func takeRefusal() -> HandshakeRefusal? {
        defer { pendingRefusal = nil }
        return pendingRefusal
    }

    /// Consumes at most one message from `input` and writes any replies to `output`.
    public mutating func process(
        _ input: inout ByteBuffer, catalog: some NBDExportCatalog, output: inout ByteBuffer
    ) -> HandshakeAction {
        switch state {
        case .finished, .awaitingTLS:
            return .needMoreData
        case .awaitingClientFlags:
            guard let raw = input.readInteger(as: UInt32.self) else { return .needMoreData }
            let flags = NBDClientFlags(rawValue: raw)
            let known: NBDClientFlags = [.fixedNewstyle, .noZeroes]
            guard known.isSuperset(of: flags) else {
                state = .finished
                return .close(.unknownClientFlags(raw))
            }
            clientFlags = flags
            state = .negotiating
            return .continueNegotiating
        case .negotiating:
            return processOption(&input, catalog: catalog, output: &output)
        }
    }

    private mutating func processOption(
        _ input: inout ByteBuffer, catalog: some NBDExportCatalog, output: inout ByteBuffer
    ) -> HandshakeAction {
        guard let (magic, option, length) = input.getMultipleIntegers(
            at: input.readerIndex, as: (UInt64, UInt32, UInt32).self)
        else { return .needMoreData }
        guard magic == NBDMagic.option else {
            state = .finished
            return .close(.badOptionMagic(magic))
        }
        guard length <= NBDLimits.maximumOptionLength else {
            state = .finished
            return .close(.optionTooLong(length))
        }
        guard input.readableBytes >= 16 + Int(length) else { return .needMoreData }
        input.moveReaderIndex(forwardBy: 16)
        guard var data = input.readSlice(length: Int(length)) else { return .needMoreData }

        optionCount += 1
        guard optionCount <= NBDLimits.maximumOptionCount else {
            state = .finished
            return .close(.tooManyOptions)
        }

        if !clientFlags.contains(.fixedNewstyle) && option != NBDOption.exportName {
            state = .finished
            return .close(.optionNotAllowedWithoutFixedNewstyle(option))
        }

        if tlsPolicy == .required && !tlsActive && option != NBDOption.startTLS && option != NBDOption.abort {
            // Nothing about the exports, not even whether one exists, before TLS.
            if option == NBDOption.exportName {
                state = .finished
                return .close(.exportNameBeforeTLS)
            }
            pendingRefusal = .tlsRequired(option: option)
            OptionReplyWriter.error(
                option, NBDOptionReply.errorTLSRequired, "this server requires TLS: send NBD_OPT_STARTTLS first",
                into: &output)
            return .continueNegotiating
        }

        switch option {
        case NBDOption.exportName:
            return handleExportName(data, catalog: catalog, output: &output)
        case NBDOption.abort:
            OptionReplyWriter.ack(option, into: &output)
            state = .finished
            return .abort
        case NBDOption.list:
            handleList(data, catalog: catalog, output: &output)
        case NBDOption.startTLS:
            if data.readableBytes > 0 {
                OptionReplyWriter.error(option, NBDOptionReply.errorInvalid, "STARTTLS takes no data", into: &output)
            } else if tlsPolicy == .unavailable {
                pendingRefusal = .tlsNotConfigured
                OptionReplyWriter.error(
                    option, NBDOptionReply.errorPolicy, "TLS is not configured on this server", into: &output)
            } else if tlsActive {
                OptionReplyWriter.error(option, NBDOptionReply.errorInvalid, "TLS is already active", into: &output)
            } else {
                OptionReplyWriter.ack(option, into: &output)
                resetNegotiation()
                state = .awaitingTLS
                return .startTLS
            }
        case NBDOption.info, NBDOption.go:
            return handleInfoOrGo(option, &data, catalog: catalog, output: &output)
        case NBDOption.structuredReply:
            if data.readableBytes > 0 {
                OptionReplyWriter.error(option, NBDOptionReply.errorInvalid, "structured reply takes no data", into: &output)
            } else if !offersStructuredReplies {
                OptionReplyWriter.error(
                    option, NBDOptionReply.errorUnsupported, "structured replies are turned off on this server",
                    into: &output)
            } else if extendedHeaders {
                OptionReplyWriter.error(
                    option, NBDOptionReply.errorExtendedHeaderRequired,
                    "extended headers are already negotiated and take precedence", into: &output)
            } else if structuredReplies {
                OptionReplyWriter.error(
                    option, NBDOptionReply.errorInvalid, "structured replies already negotiated", into: &output)
            } else {
                structuredReplies = true
                OptionReplyWriter.ack(option, into: &output)
            }
        case NBDOption.listMetaContext, NBDOption.setMetaContext:
            handleMetaContext(option, &data, catalog: catalog, output: &output)
        case NBDOption.extendedHeaders:
            handleExtendedHeaders(data, output: &output)
        default:
            OptionReplyWriter.error(option, NBDOptionReply.errorUnsupported, "\(NBDNames.option(option)) is not supported", into: &output)
        }
        return .continueNegotiating
    }

    // MARK: - EXTENDED_HEADERS

    private mutating func handleExtendedHeaders(_ data: ByteBuffer, output: inout ByteBuffer) {
        let option = NBDOption.extendedHeaders
        if !offersExtendedHeaders {
            // As a server that does not know the option: unsupported, whatever it carries.
            OptionReplyWriter.error(
                option, NBDOptionReply.errorUnsupported, "extended headers are turned off on this server", into: &output)
        } else if data.readableBytes > 0 {
            OptionReplyWriter.error(option, NBDOptionReply.errorInvalid, "extended headers take no data", into: &output)
        } else if extendedHeaders {
            // As qemu's server: a repeat is invalid; the headers stay negotiated.
            OptionReplyWriter.error(option, NBDOptionReply.errorInvalid, "extended headers already negotiated", into: &output)
        } else {
            extendedHeaders = true
            OptionReplyWriter.ack(option, into: &output)
        }
    }

    // MARK: - EXPORT_NAME

    private mutating func handleExportName(
        _ data: ByteBuffer, catalog: some NBDExportCatalog, output: inout ByteBuffer
    ) -> HandshakeAction {
        state = .finished
        guard !extendedHeaders else { return .close(.exportNameAfterExtendedHeaders) }
        guard let name = Self.decodeString(data, length: data.readableBytes) else {
            return .close(.invalidExportName)
        }
        guard let summary = catalog.exportSummary(named: name) else {
            return .close(.unknownExport(name))
        }
        let session = makeSession(summary, enforcesBlockSize: false)
        output.writeMultipleIntegers(summary.size, session.transmissionFlags.rawValue)
        if !clientFlags.contains(.noZeroes) {
            output.writeRepeatingByte(0, count: 124)
        }
        return .enterTransmission(session)
    }

    // MARK: - LIST

    private func handleList(_ data: ByteBuffer, catalog: some NBDExportCatalog, output: inout ByteBuffer) {
        guard data.readableBytes == 0 else {
            OptionReplyWriter.error(NBDOption.list, NBDOptionReply.errorInvalid, "LIST takes no data", into: &output)
            return
        }
        for summary in catalog.exportSummaries() {
            OptionReplyWriter.reply(NBDOption.list, NBDOptionReply.server, into: &output) { body in
                body.writeInteger(UInt32(summary.name.utf8.count))
                body.writeString(summary.name)
                body.writeString(Self.truncated(summary.description))
            }
        }
        OptionReplyWriter.ack(NBDOption.list, into: &output)
    }

    // MARK: - INFO / GO

    private mutating func handleInfoOrGo(
        _ option: UInt32, _ data: inout ByteBuffer, catalog: some NBDExportCatalog, output: inout ByteBuffer
    ) -> HandshakeAction {
        let total = data.readableBytes
        guard total >= 6, let nameLength = data.readInteger(as: UInt32.self),
            Int(nameLength) <= total - 6
        else {
            OptionReplyWriter.error(option, NBDOptionReply.errorInvalid, "malformed INFO/GO request", into: &output)
            return .continueNegotiating
        }
        guard let name = Self.decodeString(data, length: Int(nameLength)) else {
            OptionReplyWriter.error(option, NBDOptionReply.errorInvalid, "export name is not valid UTF-8", into: &output)
            return .continueNegotiating
        }
        data.moveReaderIndex(forwardBy: Int(nameLength))
        guard let requestCount = data.readInteger(as: UInt16.self),
            data.readableBytes == Int(requestCount) * 2
        else {
            OptionReplyWriter.error(option, NBDOptionReply.errorInvalid, "malformed information request list", into: &output)
            return .continueNegotiating
        }
        var wantsName = false
        var wantsDescription = false
        var wantsBlockSize = false
        for _ in 0..<requestCount {
            switch data.readInteger(as: UInt16.self) {
            case NBDInfoType.name: wantsName = true
            case NBDInfoType.description: wantsDescription = true
            case NBDInfoType.blockSize: wantsBlockSize = true
            default: break
            }
        }
        guard let summary = catalog.exportSummary(named: name) else {
            pendingRefusal = .unknownExport(name: Self.truncated(name), option: option)
            OptionReplyWriter.error(option, NBDOptionReply.errorUnknown, "no export named '\(Self.truncated(name))'", into: &output)
            return .continueNegotiating
        }
        let session = makeSession(summary, enforcesBlockSize: wantsBlockSize && option == NBDOption.go)

        OptionReplyWriter.reply(option, NBDOptionReply.info, into: &output) { body in
            body.writeMultipleIntegers(
                NBDInfoType.blockSize, summary.minimumBlockSize,
                max(NBDLimits.preferredBlockSize, summary.minimumBlockSize), NBDLimits.maximumPayload)
        }
        if wantsName {
            OptionReplyWriter.reply(option, NBDOptionReply.info, into: &output) { body in
                body.writeInteger(NBDInfoType.name)
                body.writeString(summary.name)
            }
        }
        if wantsDescription || !summary.description.isEmpty {
            OptionReplyWriter.reply(option, NBDOptionReply.info, into: &output) { body in
                body.writeInteger(NBDInfoType.description)
                body.writeString(Self.truncated(summary.description))
            }
        }
        OptionReplyWriter.reply(option, NBDOptionReply.info, into: &output) { body in
            body.writeMultipleIntegers(NBDInfoType.export, summary.size, session.transmissionFlags.rawValue)
        }
        OptionReplyWriter.ack(option, into: &output)
        if option == NBDOption.go {
            state = .finished
            return .enterTransmission(session)
        }
        return .continueNegotiating
    }

    private func makeSession(_ summary: NBDExportSummary, enforcesBlockSize: Bool) -> NBDSession {
        NBDSession(
            exportName: summary.name,
            size: summary.size,
            transmissionFlags: summary.transmissionFlags(structuredReplies: structuredReplies || extendedHeaders),
            structuredReplies: structuredReplies || extendedHeaders,
            metaContexts: contextsExport == summary.name ? selectedContexts : [],
            minimumBlockSize: summary.minimumBlockSize,
            enforcesBlockSize: enforcesBlockSize,
            framing: extendedHeaders ? .extended : .compact
        )
    }

    // MARK: - LIST_META_CONTEXT / SET_META_CONTEXT

    private mutating func handleMetaContext(
        _ option: UInt32, _ data: inout ByteBuffer, catalog: some NBDExportCatalog, output: inout ByteBuffer
    ) {
        let isSet = option == NBDOption.setMetaContext
        if isSet {
            // A SET replaces the previous selection even when it fails.
            selectedContexts = []
            contextsExport = nil
        }
        guard let parsed = MetaContextRequest.parse(&data) else {
            OptionReplyWriter.error(option, NBDOptionReply.errorInvalid, "malformed meta context request", into: &output)
            return
        }
        if isSet && !structuredReplies && !extendedHeaders {
            OptionReplyWriter.error(
                option, NBDOptionReply.errorInvalid, "structured replies or extended headers must be negotiated first",
                into: &output)
            return
        }
        guard parsed.queries.count <= MetaContextRequest.maximumQueries else {
            OptionReplyWriter.error(option, NBDOptionReply.errorTooBig, "too many meta context queries", into: &output)
            return
        }
        guard let summary = catalog.exportSummary(named: parsed.exportName) else {
            OptionReplyWriter.error(
                option, NBDOptionReply.errorUnknown, "no export named '\(Self.truncated(parsed.exportName))'",
                into: &output)
            return
        }
        let matches = MetaContextMatcher.match(
            queries: parsed.queries, available: summary.metaContexts, selecting: isSet)
        var selection: [NBDSelectedContext] = []
        for index in matches {
            let name = summary.metaContexts[index]
            let id: UInt32 = isSet ? UInt32(index + 1) : 0
            if isSet { selection.append(NBDSelectedContext(id: id, name: name)) }
            OptionReplyWriter.reply(option, NBDOptionReply.metaContext, into: &output) { body in
                body.writeInteger(id)
                body.writeString(name)
            }
        }
        OptionReplyWriter.ack(option, into: &output)
        if isSet {
            selectedContexts = selection
            contextsExport = summary.name
        }
    }

    // MARK: - Strings

    /// Decodes a protocol string: UTF-8, no NUL, at most 4096 bytes.
    static func decodeString(_ buffer: ByteBuffer, length: Int) -> String? {
        guard length <= NBDLimits.maximumString, let view = buffer.viewBytes(at: buffer.readerIndex, length: length)
        else { return nil }
        guard !view.contains(0) else { return nil }
        return String(validating: view, as: UTF8.self)
    }

    /// Keeps outgoing strings within the protocol's 4096-byte limit.
    static func truncated(_ text: String) -> String {
        guard text.utf8.count > NBDLimits.maximumString else { return text }
        var result = ""
        for character in text {
            if result.utf8.count + character.utf8.count > NBDLimits.maximumString { break }
            result.append(character)
        }
        return result
    }
}
