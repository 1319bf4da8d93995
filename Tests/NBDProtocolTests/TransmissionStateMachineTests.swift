import NBDProtocol
import NIOCore
import Testing

/// The sessions the transmission tests run against.
enum SessionKind: String, Sendable, CaseIterable {
    /// 1 MiB, writable, structured replies, base:allocation selected, block size not enforced.
    case writable
    /// 1 MiB, read-only, structured replies, base:allocation selected.
    case readOnly
    /// 1 MiB, writable, no structured replies (so no contexts either).
    case simple
    /// 1 MiB, writable, structured replies but no context selected.
    case noContexts
    /// 1 MiB, writable, structured, client agreed to the 512-byte minimum block size.
    case enforced
    /// 1 MiB + 100 bytes, minimum 512, enforced: an unaligned tail.
    case enforcedUnalignedEnd
    /// 8 GiB, writable, structured, base:allocation.
    case large

    var session: NBDSession {
        let writable = NBDTransmissionFlags(rawValue: ExpectedFlags.writable)
        let readOnlyFlags = NBDTransmissionFlags(rawValue: ExpectedFlags.readOnly)
        let df = NBDTransmissionFlags(rawValue: ExpectedFlags.sendDF)
        let contexts = [NBDSelectedContext(id: 1, name: "base:allocation")]
        switch self {
        case .writable:
            return NBDSession(
                exportName: "w", size: 1 << 20, transmissionFlags: writable.union(df), structuredReplies: true,
                metaContexts: contexts, minimumBlockSize: 512, enforcesBlockSize: false)
        case .readOnly:
            return NBDSession(
                exportName: "r", size: 1 << 20, transmissionFlags: readOnlyFlags.union(df), structuredReplies: true,
                metaContexts: contexts, minimumBlockSize: 512, enforcesBlockSize: false)
        case .simple:
            return NBDSession(
                exportName: "s", size: 1 << 20, transmissionFlags: writable, structuredReplies: false,
                metaContexts: [], minimumBlockSize: 512, enforcesBlockSize: false)
        case .noContexts:
            return NBDSession(
                exportName: "n", size: 1 << 20, transmissionFlags: writable.union(df), structuredReplies: true,
                metaContexts: [], minimumBlockSize: 512, enforcesBlockSize: false)
        case .enforced:
            return NBDSession(
                exportName: "e", size: 1 << 20, transmissionFlags: writable.union(df), structuredReplies: true,
                metaContexts: contexts, minimumBlockSize: 512, enforcesBlockSize: true)
        case .enforcedUnalignedEnd:
            return NBDSession(
                exportName: "u", size: (1 << 20) + 100, transmissionFlags: writable.union(df), structuredReplies: true,
                metaContexts: contexts, minimumBlockSize: 512, enforcesBlockSize: true)
        case .large:
            return NBDSession(
                exportName: "l", size: 8 << 30, transmissionFlags: writable.union(df), structuredReplies: true,
                metaContexts: contexts, minimumBlockSize: 512, enforcesBlockSize: false)
        }
    }
}

/// A request and the error the spec says it gets.
struct RejectCase: Sendable, CustomTestStringConvertible {
    var name: String
    var session: SessionKind
    var type: UInt16
    var flags: UInt16 = 0
    var offset: UInt64 = 0
    var length: UInt32 = 0
    /// Attach a WRITE payload of `length` bytes.
    var withPayload = false
    var discarded = false
    var error: NBDError

    var testDescription: String { "\(name) [\(session.rawValue)] → \(error)" }

    var request: NBDRequest {
        NBDRequest(
            type: type, flags: NBDCommandFlags(rawValue: flags), cookie: 0xC0FF_EE00_0000_0000 | UInt64(length),
            offset: offset, length: UInt64(length),
            payload: withPayload ? ByteBuffer(repeating: 0x5A, count: Int(length)) : nil,
            payloadDiscarded: discarded)
    }
}

extension RequestDisposition {
    var rejection: (cookie: UInt64, command: UInt16, error: NBDError)? {
        if case .reject(let cookie, let command, let error, _) = self { return (cookie, command, error) }
        return nil
    }

    var execution: (cookie: UInt64, command: NBDCommand)? {
        if case .execute(let cookie, let command) = self { return (cookie, command) }
        return nil
    }

    var isDisconnect: Bool {
        if case .disconnect = self { return true }
        return false
    }
}

@Suite("TransmissionStateMachine: validation")
struct TransmissionValidationTests {
    static let mib: UInt64 = 1 << 20

    static let rejects: [RejectCase] = [
        // Unknown commands.
        RejectCase(name: "command 8 (RESIZE, not advertised)", session: .writable, type: 8, error: .invalid),
        RejectCase(name: "command 9", session: .writable, type: 9, length: 512, error: .invalid),
        RejectCase(name: "command 0xFFFF", session: .readOnly, type: 0xFFFF, error: .invalid),
        // Flags not valid for the command or the session.
        RejectCase(name: "DF without structured replies", session: .simple, type: Wire.cmdRead, flags: Wire.flagDF, length: 512, error: .invalid),
        RejectCase(name: "REQ_ONE on READ", session: .writable, type: Wire.cmdRead, flags: Wire.flagReqOne, length: 512, error: .invalid),
        RejectCase(name: "NO_HOLE on READ", session: .writable, type: Wire.cmdRead, flags: Wire.flagNoHole, length: 512, error: .invalid),
        RejectCase(name: "FAST_ZERO on READ", session: .writable, type: Wire.cmdRead, flags: Wire.flagFastZero, length: 512, error: .invalid),
        RejectCase(
            name: "NO_HOLE on WRITE", session: .writable, type: Wire.cmdWrite, flags: Wire.flagNoHole, length: 512,
            withPayload: true, error: .invalid),
        RejectCase(
            name: "DF on WRITE", session: .writable, type: Wire.cmdWrite, flags: Wire.flagDF, length: 512, withPayload: true,
            error: .invalid),
        RejectCase(
            name: "FAST_ZERO on a read-only export", session: .readOnly, type: Wire.cmdWriteZeroes, flags: Wire.flagFastZero,
            length: 512, error: .invalid),
        RejectCase(name: "DF on WRITE_ZEROES", session: .writable, type: Wire.cmdWriteZeroes, flags: Wire.flagDF, length: 512, error: .invalid),
        RejectCase(name: "REQ_ONE on WRITE_ZEROES", session: .writable, type: Wire.cmdWriteZeroes, flags: Wire.flagReqOne, length: 512, error: .invalid),
        RejectCase(name: "NO_HOLE on TRIM", session: .writable, type: Wire.cmdTrim, flags: Wire.flagNoHole, length: 512, error: .invalid),
        RejectCase(name: "FAST_ZERO on TRIM", session: .writable, type: Wire.cmdTrim, flags: Wire.flagFastZero, length: 512, error: .invalid),
        RejectCase(name: "DF on CACHE", session: .writable, type: Wire.cmdCache, flags: Wire.flagDF, length: 512, error: .invalid),
        RejectCase(name: "DF on BLOCK_STATUS", session: .writable, type: Wire.cmdBlockStatus, flags: Wire.flagDF, length: 512, error: .invalid),
        RejectCase(name: "NO_HOLE on BLOCK_STATUS", session: .writable, type: Wire.cmdBlockStatus, flags: Wire.flagNoHole, length: 512, error: .invalid),
        RejectCase(name: "NO_HOLE on FLUSH", session: .writable, type: Wire.cmdFlush, flags: Wire.flagNoHole, error: .invalid),
        RejectCase(name: "PAYLOAD_LEN (0x20) on READ", session: .writable, type: Wire.cmdRead, flags: 0x20, length: 512, error: .invalid),
        RejectCase(name: "unknown bit 0x8000 on READ", session: .writable, type: Wire.cmdRead, flags: 0x8000, length: 512, error: .invalid),
        RejectCase(name: "unknown bit 0x40 on CACHE", session: .writable, type: Wire.cmdCache, flags: 0x40, length: 512, error: .invalid),
        // Read-only.
        RejectCase(name: "WRITE on read-only", session: .readOnly, type: Wire.cmdWrite, length: 512, withPayload: true, error: .permission),
        RejectCase(name: "TRIM on read-only", session: .readOnly, type: Wire.cmdTrim, length: 512, error: .permission),
        RejectCase(name: "WRITE_ZEROES on read-only", session: .readOnly, type: Wire.cmdWriteZeroes, length: 512, error: .permission),
        RejectCase(
            name: "WRITE_ZEROES NO_HOLE on read-only", session: .readOnly, type: Wire.cmdWriteZeroes, flags: Wire.flagNoHole,
            length: 512, error: .permission),
        RejectCase(
            name: "discarded WRITE on read-only", session: .readOnly, type: Wire.cmdWrite, length: 40 << 20, discarded: true,
            error: .permission),
        // Out of range.
        RejectCase(name: "READ past the end", session: .writable, type: Wire.cmdRead, offset: mib - 512, length: 1024, error: .invalid),
        RejectCase(name: "READ starting past the end", session: .writable, type: Wire.cmdRead, offset: mib + 512, length: 512, error: .invalid),
        RejectCase(name: "empty READ past the end", session: .writable, type: Wire.cmdRead, offset: mib + 1, length: 0, error: .invalid),
        RejectCase(name: "TRIM past the end", session: .writable, type: Wire.cmdTrim, offset: mib - 512, length: 1024, error: .invalid),
        RejectCase(name: "CACHE past the end", session: .writable, type: Wire.cmdCache, offset: mib, length: 1, error: .invalid),
        RejectCase(name: "BLOCK_STATUS past the end", session: .writable, type: Wire.cmdBlockStatus, offset: mib - 512, length: 1024, error: .invalid),
        RejectCase(
            name: "WRITE past the end", session: .writable, type: Wire.cmdWrite, offset: mib - 512, length: 1024, withPayload: true,
            error: .noSpace),
        RejectCase(name: "WRITE_ZEROES past the end", session: .writable, type: Wire.cmdWriteZeroes, offset: mib, length: 512, error: .noSpace),
        RejectCase(
            name: "WRITE offset+length overflows", session: .writable, type: Wire.cmdWrite, offset: UInt64.max - 100, length: 512,
            withPayload: true, error: .noSpace),
        RejectCase(
            name: "WRITE_ZEROES offset+length overflows", session: .large, type: Wire.cmdWriteZeroes, offset: UInt64.max,
            length: 0xFFFF_FFFF, error: .noSpace),
        RejectCase(name: "READ offset+length overflows", session: .writable, type: Wire.cmdRead, offset: UInt64.max - 100, length: 512, error: .invalid),
        RejectCase(name: "TRIM offset+length overflows", session: .writable, type: Wire.cmdTrim, offset: UInt64.max, length: 1, error: .invalid),
        RejectCase(
            name: "BLOCK_STATUS offset+length overflows", session: .writable, type: Wire.cmdBlockStatus, offset: UInt64.max - 1,
            length: 0xFFFF_FFFF, error: .invalid),
        // Size limits.
        RejectCase(name: "READ over 32 MiB", session: .large, type: Wire.cmdRead, length: (32 << 20) + 1, error: .invalid),
        RejectCase(name: "READ of 4 GiB - 1", session: .large, type: Wire.cmdRead, length: 0xFFFF_FFFF, error: .invalid),
        RejectCase(name: "discarded WRITE", session: .large, type: Wire.cmdWrite, length: 40 << 20, discarded: true, error: .invalid),
        RejectCase(name: "WRITE without its payload", session: .writable, type: Wire.cmdWrite, length: 512, error: .invalid),
        // FLUSH.
        RejectCase(name: "FLUSH with an offset", session: .writable, type: Wire.cmdFlush, offset: 512, error: .invalid),
        RejectCase(name: "FLUSH with a length", session: .writable, type: Wire.cmdFlush, length: 512, error: .invalid),
        // Alignment when the client agreed to the block size.
        RejectCase(name: "unaligned READ offset", session: .enforced, type: Wire.cmdRead, offset: 1, length: 512, error: .invalid),
        RejectCase(name: "unaligned READ length", session: .enforced, type: Wire.cmdRead, offset: 512, length: 100, error: .invalid),
        RejectCase(
            name: "unaligned WRITE", session: .enforced, type: Wire.cmdWrite, offset: 256, length: 512, withPayload: true,
            error: .invalid),
        RejectCase(name: "unaligned TRIM", session: .enforced, type: Wire.cmdTrim, offset: 0, length: 1000, error: .invalid),
        RejectCase(name: "unaligned WRITE_ZEROES", session: .enforced, type: Wire.cmdWriteZeroes, offset: 4095, length: 512, error: .invalid),
        RejectCase(name: "unaligned CACHE", session: .enforced, type: Wire.cmdCache, offset: 0, length: 1, error: .invalid),
        RejectCase(name: "unaligned BLOCK_STATUS offset", session: .enforced, type: Wire.cmdBlockStatus, offset: 100, length: 512, error: .invalid),
        RejectCase(
            name: "unaligned length not ending at the unaligned end", session: .enforcedUnalignedEnd, type: Wire.cmdRead,
            offset: 1 << 20, length: 50, error: .invalid),
        // BLOCK_STATUS preconditions.
        RejectCase(name: "BLOCK_STATUS without structured replies", session: .simple, type: Wire.cmdBlockStatus, length: 512, error: .invalid),
        RejectCase(
            name: "BLOCK_STATUS REQ_ONE without structured replies", session: .simple, type: Wire.cmdBlockStatus,
            flags: Wire.flagReqOne, length: 512, error: .invalid),
        RejectCase(name: "BLOCK_STATUS without contexts", session: .noContexts, type: Wire.cmdBlockStatus, length: 512, error: .invalid),
        RejectCase(name: "BLOCK_STATUS of length 0", session: .writable, type: Wire.cmdBlockStatus, offset: 512, length: 0, error: .invalid),
    ]

    @Test("requests the spec refuses get the spec's error, with the cookie and command echoed", arguments: rejects)
    func reject(testCase: RejectCase) throws {
        var machine = TransmissionStateMachine(session: testCase.session.session)
        let request = testCase.request
        let disposition = machine.received(request)
        let rejection = try #require(disposition.rejection, "got \(disposition)")
        #expect(rejection.error == testCase.error)
        #expect(rejection.cookie == request.cookie)
        #expect(rejection.command == request.type)
        // The refusal is answered as it is decoded: nothing is in flight.
        #expect(machine.inFlight == 0)
        #expect(TransmissionStateMachine.cost(of: disposition) == 0)
    }

    private func execute(_ kind: SessionKind, _ request: NBDRequest) -> NBDCommand? {
        var machine = TransmissionStateMachine(session: kind.session)
        let disposition = machine.received(request)
        guard let execution = disposition.execution else {
            Issue.record("expected execution of \(request.type), got \(disposition)")
            return nil
        }
        #expect(execution.cookie == request.cookie)
        return execution.command
    }

    private func request(
        _ type: UInt16, flags: UInt16 = 0, offset: UInt64 = 0, length: UInt32 = 0, payload: [UInt8]? = nil
    ) -> NBDRequest {
        NBDRequest(
            type: type, flags: NBDCommandFlags(rawValue: flags), cookie: 0xABCD_0000_0000_0001 &+ offset, offset: offset,
            length: UInt64(length), payload: payload.map { ByteBuffer(bytes: $0) })
    }

    @Test("READ is executed with its range and DF flag")
    func read() {
        guard case .read(let offset, let length, let df)? = execute(.writable, request(Wire.cmdRead, offset: 4096, length: 8192))
        else { Issue.record("not a read"); return }
        #expect(offset == 4096 && length == 8192 && !df)
        guard case .read(_, _, let withDF)? = execute(.writable, request(Wire.cmdRead, flags: Wire.flagDF | Wire.flagFUA, length: 512))
        else { Issue.record("not a read"); return }
        #expect(withDF)
        // The very end of the export, and exactly 32 MiB.
        guard case .read(let endOffset, _, _)? = execute(.writable, request(Wire.cmdRead, offset: (1 << 20) - 512, length: 512))
        else { Issue.record("not a read"); return }
        #expect(endOffset == (1 << 20) - 512)
        guard case .read(_, let big, _)? = execute(.large, request(Wire.cmdRead, length: 32 << 20))
        else { Issue.record("not a read"); return }
        #expect(big == 32 << 20)
        // Read-only exports still read.
        guard case .read? = execute(.readOnly, request(Wire.cmdRead, length: 512)) else { Issue.record("not a read"); return }
    }

    @Test("WRITE is executed with its payload and FUA")
    func write() {
        let payload: [UInt8] = (0..<1024).map { UInt8(truncatingIfNeeded: $0) }
        guard
            case .write(let offset, let buffer, let fua)? = execute(
                .writable, request(Wire.cmdWrite, flags: Wire.flagFUA, offset: 2048, length: 1024, payload: payload))
        else { Issue.record("not a write"); return }
        #expect(offset == 2048)
        #expect(buffer.bytes == payload)
        #expect(fua)
    }

    @Test("TRIM, WRITE_ZEROES and CACHE are executed with their flags, even above 32 MiB")
    func trimZeroesCache() {
        guard case .trim(let offset, let length, let fua)? = execute(.large, request(Wire.cmdTrim, flags: Wire.flagFUA, offset: 1 << 32, length: 0xFFFF_FFFF))
        else { Issue.record("not a trim"); return }
        #expect(offset == 1 << 32 && length == 0xFFFF_FFFF && fua)
        guard
            case .writeZeroes(let zOffset, let zLength, let noHole, let fastZero, let zFUA)? = execute(
                .writable, request(Wire.cmdWriteZeroes, flags: Wire.flagNoHole | Wire.flagFastZero, offset: 512, length: 4096))
        else { Issue.record("not write zeroes"); return }
        #expect(zOffset == 512 && zLength == 4096 && noHole && fastZero && !zFUA)
        guard case .writeZeroes(_, _, let plainNoHole, let plainFast, _)? = execute(.large, request(Wire.cmdWriteZeroes, length: 0xFFFF_FFFF))
        else { Issue.record("not write zeroes"); return }
        #expect(!plainNoHole && !plainFast)
        guard case .cache(let cOffset, let cLength)? = execute(.readOnly, request(Wire.cmdCache, flags: Wire.flagFUA, offset: 0, length: 1 << 20))
        else { Issue.record("not cache"); return }
        #expect(cOffset == 0 && cLength == 1 << 20)
    }

    @Test("FLUSH is executed, with or without FUA, on writable and read-only exports")
    func flush() {
        for kind in [SessionKind.writable, .readOnly, .simple] {
            guard case .flush? = execute(kind, request(Wire.cmdFlush)) else { Issue.record("not a flush"); return }
            guard case .flush? = execute(kind, request(Wire.cmdFlush, flags: Wire.flagFUA)) else { Issue.record("not a flush"); return }
        }
    }

    @Test("BLOCK_STATUS is executed with REQ_ONE and lengths far above the maximum payload")
    func blockStatus() {
        guard case .blockStatus(let offset, let length, let one)? = execute(.large, request(Wire.cmdBlockStatus, flags: Wire.flagReqOne, offset: 512, length: 0xFFFF_FFFF))
        else { Issue.record("not block status"); return }
        #expect(offset == 512 && length == 0xFFFF_FFFF && one)
        guard case .blockStatus(_, _, let notOne)? = execute(.readOnly, request(Wire.cmdBlockStatus, length: 1 << 20))
        else { Issue.record("not block status"); return }
        #expect(!notOne)
    }

    @Test("unaligned requests are accepted when the client did not agree to the block size")
    func unalignedAccepted() {
        guard case .read(1, 100, false)? = execute(.writable, request(Wire.cmdRead, offset: 1, length: 100)) else {
            Issue.record("unaligned read refused"); return
        }
        guard case .write(3, _, false)? = execute(.writable, request(Wire.cmdWrite, offset: 3, length: 5, payload: [1, 2, 3, 4, 5]))
        else { Issue.record("unaligned write refused"); return }
        guard case .trim(7, 9, false)? = execute(.writable, request(Wire.cmdTrim, offset: 7, length: 9)) else {
            Issue.record("unaligned trim refused"); return
        }
    }

    @Test("with the block size enforced, aligned requests, the unaligned tail and BLOCK_STATUS lengths are accepted")
    func alignedAccepted() {
        guard case .read(512, 1024, _)? = execute(.enforced, request(Wire.cmdRead, offset: 512, length: 1024)) else {
            Issue.record("aligned read refused"); return
        }
        guard case .read(1 << 20, 100, _)? = execute(.enforcedUnalignedEnd, request(Wire.cmdRead, offset: 1 << 20, length: 100)) else {
            Issue.record("read of the unaligned tail refused"); return
        }
        guard case .writeZeroes((1 << 20) - 512, 612, _, _, _)? = execute(
            .enforcedUnalignedEnd, request(Wire.cmdWriteZeroes, offset: (1 << 20) - 512, length: 612))
        else { Issue.record("zeroing up to the unaligned end refused"); return }
        guard case .blockStatus(0, 1000, _)? = execute(.enforced, request(Wire.cmdBlockStatus, offset: 0, length: 1000)) else {
            Issue.record("block status with a hint length refused"); return
        }
    }

    @Test("a zero-length READ or WRITE inside the export is not refused")
    func zeroLength() {
        guard case .read(_, 0, _)? = execute(.writable, request(Wire.cmdRead, offset: 512)) else {
            Issue.record("zero-length read refused"); return
        }
        guard case .write(_, let payload, _)? = execute(.writable, request(Wire.cmdWrite, offset: 512)) else {
            Issue.record("zero-length write refused"); return
        }
        #expect(payload.readableBytes == 0)
    }

    @Test("cost(of:) is the data a request keeps in memory: READ length, WRITE payload, nothing else")
    func cost() {
        var machine = TransmissionStateMachine(session: SessionKind.writable.session)
        #expect(TransmissionStateMachine.cost(of: machine.received(request(Wire.cmdRead, length: 4096))) == 4096)
        #expect(
            TransmissionStateMachine.cost(of: machine.received(request(Wire.cmdWrite, length: 3, payload: [1, 2, 3]))) == 3)
        #expect(TransmissionStateMachine.cost(of: machine.received(request(Wire.cmdTrim, length: 4096))) == 0)
        #expect(TransmissionStateMachine.cost(of: machine.received(request(Wire.cmdBlockStatus, length: 4096))) == 0)
        // Past the end: refused, so neither in flight nor costing anything.
        #expect(TransmissionStateMachine.cost(of: machine.received(request(Wire.cmdRead, offset: 1 << 30, length: 4096))) == 0)
        #expect(machine.inFlight == 4)
        #expect(machine.bytesInFlight == 4099)
    }
}

@Suite("TransmissionStateMachine: disconnect and flow control")
struct TransmissionFlowTests {
    private static func read(_ cookie: UInt64, length: UInt32 = 512) -> NBDRequest {
        NBDRequest(type: Wire.cmdRead, flags: [], cookie: cookie, offset: 0, length: UInt64(length))
    }

    private static let disc = NBDRequest(type: Wire.cmdDisc, flags: [], cookie: 99, offset: 0, length: 0)

    @Test("DISC with nothing in flight: disconnect, close at once, stop reading")
    func disconnectIdle() {
        var machine = TransmissionStateMachine(session: SessionKind.writable.session)
        #expect(machine.received(Self.disc).isDisconnect)
        #expect(machine.isDisconnecting)
        #expect(machine.canCloseNow)
        #expect(machine.shouldPauseReading)
        #expect(machine.inFlight == 0)
    }

    @Test("DISC with requests in flight: close only when the last one completes")
    func disconnectDrains() {
        var machine = TransmissionStateMachine(session: SessionKind.readOnly.session)
        let first = machine.received(Self.read(1))
        let second = machine.received(Self.read(2, length: 4096))
        #expect(machine.received(Self.disc).isDisconnect)
        #expect(!machine.canCloseNow)
        #expect(machine.shouldPauseReading)
        #expect(machine.completed(cost: TransmissionStateMachine.cost(of: first)) == .none)
        #expect(!machine.canCloseNow)
        #expect(machine.completed(cost: TransmissionStateMachine.cost(of: second)) == .close)
        #expect(machine.canCloseNow)
        #expect(machine.bytesInFlight == 0)
    }

    @Test(
        "DISC with bogus flags, offset or length still disconnects without a reply (as qemu: no reply is ever sent to DISC)",
        arguments: [
            (0x0001, 0, 0), (0x0002, 0, 0), (0x0004, 0, 0), (0x8000, 0, 0), (0, 512, 0), (0, 0, 4096),
            (0, UInt64.max, UInt32.max),
        ] as [(UInt16, UInt64, UInt32)])
    func disconnectWithBogusFields(flags: UInt16, offset: UInt64, length: UInt32) {
        var machine = TransmissionStateMachine(session: SessionKind.writable.session)
        let disposition = machine.received(
            NBDRequest(type: Wire.cmdDisc, flags: NBDCommandFlags(rawValue: flags), cookie: 5, offset: offset, length: UInt64(length)))
        #expect(disposition.isDisconnect, "got \(disposition)")
        #expect(machine.isDisconnecting)
        #expect(machine.inFlight == 0)
    }

    @Test("DISC is a disconnect on every kind of session", arguments: SessionKind.allCases)
    func disconnectEverywhere(kind: SessionKind) {
        var machine = TransmissionStateMachine(session: kind.session)
        #expect(machine.received(Self.disc).isDisconnect)
    }

    @Test("the in-flight limit pauses reading; it resumes below half the limit")
    func inFlightLimit() {
        var machine = TransmissionStateMachine(session: SessionKind.writable.session, maximumInFlight: 4)
        for cookie in UInt64(1)...3 { _ = machine.received(Self.read(cookie)) }
        #expect(!machine.shouldPauseReading)
        // Refused requests do not count: their error reply is written as they are decoded.
        let refused = machine.received(NBDRequest(type: 42, flags: [], cookie: 4, offset: 0, length: 0))
        #expect(refused.rejection != nil)
        #expect(machine.inFlight == 3)
        #expect(!machine.shouldPauseReading)
        _ = machine.received(Self.read(5))
        #expect(machine.inFlight == 4)
        #expect(machine.shouldPauseReading)
        #expect(machine.completed(cost: 512) == .none)  // 3 in flight
        #expect(machine.shouldPauseReading)
        #expect(machine.completed(cost: 512) == .none)  // 2: not below half yet
        #expect(machine.shouldPauseReading)
        #expect(machine.completed(cost: 512) == .resumeReading)  // 1
        #expect(!machine.shouldPauseReading)
        #expect(machine.completed(cost: 0) == .none)
        #expect(machine.inFlight == 0)
    }

    @Test("the byte limit pauses reading on READ lengths and WRITE payloads")
    func byteLimit() {
        var machine = TransmissionStateMachine(
            session: SessionKind.writable.session, maximumInFlight: 100, maximumBytesInFlight: 1 << 20)
        let first = machine.received(Self.read(1, length: 512 << 10))
        #expect(!machine.shouldPauseReading)
        let write = NBDRequest(
            type: Wire.cmdWrite, flags: [], cookie: 2, offset: 0, length: 512 << 10,
            payload: ByteBuffer(repeating: 1, count: 512 << 10))
        let second = machine.received(write)
        #expect(machine.bytesInFlight == 1 << 20)
        #expect(machine.shouldPauseReading)
        #expect(machine.completed(cost: TransmissionStateMachine.cost(of: first)) == .none)
        #expect(machine.shouldPauseReading)
        #expect(machine.completed(cost: TransmissionStateMachine.cost(of: second)) == .resumeReading)
        #expect(!machine.shouldPauseReading)
        #expect(machine.bytesInFlight == 0)
    }

    @Test("a single READ larger than the byte limit pauses, and reading resumes when it completes")
    func singleLargeRead() {
        var machine = TransmissionStateMachine(
            session: SessionKind.large.session, maximumInFlight: 128, maximumBytesInFlight: 16 << 20)
        let big = machine.received(Self.read(1, length: 32 << 20))
        #expect(machine.shouldPauseReading)
        #expect(machine.completed(cost: TransmissionStateMachine.cost(of: big)) == .resumeReading)
    }

    @Test("with an in-flight limit of 1, reading resumes once the only request completes")
    func inFlightLimitOfOne() {
        var machine = TransmissionStateMachine(session: SessionKind.writable.session, maximumInFlight: 1)
        let request = machine.received(Self.read(1))
        #expect(machine.shouldPauseReading)
        #expect(machine.completed(cost: TransmissionStateMachine.cost(of: request)) == .resumeReading)
        #expect(!machine.shouldPauseReading)
    }
}
