import NIOCore

/// What to do with one decoded request.
public enum RequestDisposition: Sendable {
    /// Run the command and reply with the request's cookie.
    case execute(cookie: UInt64, command: NBDCommand)
    /// Reply with this error at once; the connection goes on. Not counted in flight: the
    /// reply is written as the request is decoded.
    case reject(cookie: UInt64, command: UInt16, error: NBDError, message: String)
    /// `NBD_CMD_DISC`: stop reading, finish what is in flight, then close.
    case disconnect
}

/// What the handler must do when a request finishes.
public enum CompletionAction: Equatable, Sendable {
    case none
    /// Below the in-flight limit again: resume reading from the socket.
    case resumeReading
    /// The client asked to disconnect and nothing is in flight any more: close.
    case close
}

/// The transmission phase as a plain value: validates each request against the session
/// (command, flags, bounds, alignment, read-only) and tracks requests in flight so the
/// handler knows when to pause reading and when a disconnect may close the socket.
public struct TransmissionStateMachine {
    public let session: NBDSession
    /// Requests in flight at which reading pauses.
    public let maximumInFlight: Int
    /// Payload bytes (READ and WRITE lengths) in flight at which reading pauses, so a
    /// client that stops reading replies cannot make the server buffer without bound.
    public let maximumBytesInFlight: UInt64
    public private(set) var inFlight = 0
    public private(set) var bytesInFlight: UInt64 = 0
    public private(set) var isDisconnecting = false
    private var readingPaused = false

    public init(session: NBDSession, maximumInFlight: Int = 128, maximumBytesInFlight: UInt64 = 32 << 20) {
        self.session = session
        self.maximumInFlight = maximumInFlight
        self.maximumBytesInFlight = maximumBytesInFlight
    }

    /// Bytes a request keeps in memory while in flight: its data, for READ and WRITE.
    public static func cost(of disposition: RequestDisposition) -> UInt64 {
        switch disposition {
        case .execute(_, .read(_, let length, _)): return UInt64(length)
        case .execute(_, .write(_, let payload, _)): return UInt64(payload.readableBytes)
        case .execute, .reject, .disconnect: return 0
        }
    }

    /// True while the handler should not read more requests.
    public var shouldPauseReading: Bool { readingPaused || isDisconnecting }

    /// Validates a request and, when it is to be executed, counts it in flight.
    public mutating func received(_ request: NBDRequest) -> RequestDisposition {
        let disposition = validate(request)
        switch disposition {
        case .disconnect:
            isDisconnecting = true
        case .reject:
            break
        case .execute:
            inFlight += 1
            bytesInFlight += Self.cost(of: disposition)
            if inFlight >= maximumInFlight || bytesInFlight >= maximumBytesInFlight { readingPaused = true }
        }
        return disposition
    }

    /// Records that one request's reply has been written.
    /// - Parameter cost: what `cost(of:)` said for the request.
    public mutating func completed(cost: UInt64) -> CompletionAction {
        inFlight -= 1
        bytesInFlight -= min(cost, bytesInFlight)
        if isDisconnecting { return inFlight == 0 ? .close : .none }
        // Resume below half of both limits, or once nothing is in flight (which also covers
        // limits so small that half of them is zero).
        let belowHalf = inFlight < maximumInFlight / 2 && bytesInFlight < maximumBytesInFlight / 2
        if readingPaused && (belowHalf || inFlight == 0) {
            readingPaused = false
            return .resumeReading
        }
        return .none
    }

    /// True when a disconnect was requested and nothing is in flight.
    public var canCloseNow: Bool { isDisconnecting && inFlight == 0 }

    // MARK: - Validation

    private func validate(_ request: NBDRequest) -> RequestDisposition {
        let cookie = request.cookie
        func reject(_ error: NBDError, _ message: String) -> RequestDisposition {
            .reject(cookie: cookie, command: request.type, error: error, message: message)
        }
        guard let type = NBDCommandType(rawValue: request.type) else {
            return reject(.invalid, "unknown \(NBDNames.command(request.type))")
        }
        // DISC never gets a reply, whatever its flags, offset or length (as qemu does).
        if type == .disconnect { return .disconnect }
        let flags = request.flags
        let allowed = Self.allowedFlags(for: type, session: session)
        guard allowed.isSuperset(of: flags) else {
            return reject(.invalid, "flags 0x\(String(flags.rawValue, radix: 16)) are not valid for this command")
        }
        if let defect = request.defect {
            return reject(.invalid, defect.description)
        }
        let fua = flags.contains(.fua)
        let offset = request.offset
        let length = request.length

        switch type {
        case .flush:
            guard offset == 0 && length == 0 else { return reject(.invalid, "FLUSH needs offset and length 0") }
            return .execute(cookie: cookie, command: .flush)
        case .disconnect, .read, .write, .trim, .cache, .writeZeroes, .blockStatus:
            break
        }

        let isWriteLike = type == .write || type == .trim || type == .writeZeroes
        if isWriteLike && session.isReadOnly {
            return reject(.permission, "the export is read-only")
        }
        if type == .read || type == .write {
            if request.payloadDiscarded || length > NBDLimits.maximumPayload {
                return reject(.invalid, "request of \(length) bytes exceeds the maximum of \(NBDLimits.maximumPayload)")
            }
        }
        // READ's length is a payload's (checked above), at most 32 bits.
        let payloadLength = UInt32(truncatingIfNeeded: length)
        let (end, overflow) = offset.addingReportingOverflow(length)
        if overflow || end > session.size {
            let error: NBDError = (type == .write || type == .writeZeroes) ? .noSpace : .invalid
            return reject(error, "range \(offset)+\(length) is beyond the end of the export (\(session.size) bytes)")
        }
        if session.enforcesBlockSize && session.minimumBlockSize > 1 {
            let alignment = UInt64(session.minimumBlockSize)
            let lengthAligned = type == .blockStatus || length % alignment == 0 || end == session.size
            if offset % alignment != 0 || !lengthAligned {
                return reject(.invalid, "request is not aligned to the \(alignment)-byte minimum block size")
            }
        }

        switch type {
        case .read:
            return .execute(cookie: cookie, command: .read(
                offset: offset, length: payloadLength, dontFragment: flags.contains(.dontFragment)))
        case .write:
            var payload = request.payload ?? ByteBuffer()
            if payload.readableBytes != Int(length) {
                payload = ByteBuffer()
                guard length == 0 else { return reject(.invalid, "WRITE payload is missing") }
            }
            return .execute(cookie: cookie, command: .write(offset: offset, payload: payload, fua: fua))
        case .trim:
            return .execute(cookie: cookie, command: .trim(offset: offset, length: length, fua: fua))
        case .cache:
            return .execute(cookie: cookie, command: .cache(offset: offset, length: length))
        case .writeZeroes:
            return .execute(cookie: cookie, command: .writeZeroes(
                offset: offset, length: length, noHole: flags.contains(.noHole),
                fastZero: flags.contains(.fastZero), fua: fua))
        case .blockStatus:
            guard session.structuredReplies else {
                return reject(.invalid, "BLOCK_STATUS needs structured replies")
            }
            guard !session.metaContexts.isEmpty else {
                return reject(.invalid, "BLOCK_STATUS needs a metadata context selected")
            }
            guard length > 0 else { return reject(.invalid, "BLOCK_STATUS needs a non-zero length") }
            return .execute(cookie: cookie, command: .blockStatus(
                offset: offset, length: length, requestOne: flags.contains(.requestOne)))
        case .disconnect, .flush:
            return reject(.invalid, "unreachable")
        }
    }

    /// Flags each command accepts. FUA is accepted everywhere (clients set it on
    /// non-writes, and the spec allows it once SEND_FUA is advertised).
    static func allowedFlags(for type: NBDCommandType, session: NBDSession) -> NBDCommandFlags {
        switch type {
        case .read:
            return session.structuredReplies ? [.fua, .dontFragment] : [.fua]
        case .writeZeroes:
            return session.isReadOnly ? [.fua, .noHole] : [.fua, .noHole, .fastZero]
        case .blockStatus:
            return [.fua, .requestOne]
        case .write:
            // Extended headers: WRITE carries NBD_CMD_FLAG_PAYLOAD_LEN (qemu 10 leaves it out,
            // see NBDRequestDecoder); on any other command the flag is refused here.
            return session.framing == .extended ? [.fua, .payloadLength] : [.fua]
        case .disconnect, .flush, .trim, .cache:
            return [.fua]
        }
    }
}
