// libFuzzer harness: the transmission phase — NBDRequestDecoder and TransmissionStateMachine.
//
// Input: [session byte][limits byte][8-byte split seed][client → server request stream].
// Bit 4 of the limits byte picks extended headers (32-byte requests, 64-bit lengths,
// NBD_CMD_FLAG_PAYLOAD_LEN) instead of compact ones.
// The stream is decoded twice, whole and cut at seed-chosen points, with the same results.
// Every decoded request re-encodes to exactly the bytes it came from (header and WRITE
// payload); `bytesMissing` never claims a message is complete when it is not; every
// request the machine lets through is within the export, allowed on it and aligned when
// it must be; the in-flight counters match a model, and reading always resumes.
import FuzzSupport

import NBDProtocol
import NIOCore

func session(_ config: UInt8, framing: NBDFraming) -> NBDSession {
    let sizes: [UInt64] = [1000, 1 << 30, 64 << 20, UInt64.max & ~511]
    let blockSizes: [UInt32] = [1, 512, 4096, 512]
    let structured = config & 1 != 0 || framing == .extended
    let readOnly = config & 2 != 0
    let summary = NBDExportSummary(
        name: "disk", description: "", size: sizes[Int(config >> 4) & 3], isReadOnly: readOnly,
        minimumBlockSize: blockSizes[Int(config >> 6) & 3], metaContexts: [])
    return NBDSession(
        exportName: "disk", size: summary.size, transmissionFlags: summary.transmissionFlags(structuredReplies: structured),
        structuredReplies: structured,
        metaContexts: config & 8 != 0 && structured ? [NBDSelectedContext(id: 1, name: "base:allocation")] : [],
        minimumBlockSize: summary.minimumBlockSize, enforcesBlockSize: config & 4 != 0, framing: framing)
}

func encode(_ request: NBDRequest, framing: NBDFraming) -> [UInt8] {
    var buffer = ByteBuffer()
    switch framing {
    case .compact:
        buffer.writeMultipleIntegers(
            NBDMagic.request, request.flags.rawValue, request.type, request.cookie, request.offset,
            UInt32(truncatingIfNeeded: request.length))
    case .extended:
        buffer.writeMultipleIntegers(
            NBDMagic.extendedRequest, request.flags.rawValue, request.type, request.cookie, request.offset, request.length)
    }
    if let payload = request.payload { buffer.writeImmutableBuffer(payload) }
    return Array(buffer.readableBytesView)
}

func checkDisposition(_ disposition: RequestDisposition, _ request: NBDRequest, _ session: NBDSession) {
    func inBounds(_ offset: UInt64, _ length: UInt64) {
        let (end, overflow) = offset.addingReportingOverflow(length)
        require(!overflow && end <= session.size, "request \(offset)+\(length) past the end \(session.size)")
        if session.enforcesBlockSize && session.minimumBlockSize > 1 {
            require(offset % UInt64(session.minimumBlockSize) == 0, "unaligned offset let through")
        }
    }
    switch disposition {
    case .disconnect:
        require(request.type == NBDCommandType.disconnect.rawValue, "disconnect for command \(request.type)")
    case .reject(let cookie, let command, _, let message):
        require(cookie == request.cookie && command == request.type, "reject with another cookie or command")
        require(message.utf8.count <= 4096, "long message")
    case .execute(let cookie, let command):
        require(cookie == request.cookie, "execute with another cookie")
        require(request.type == NBDCommandType.write.rawValue || !request.flags.contains(.payloadLength),
                "PAYLOAD_LEN let through on a command without a payload")
        switch command {
        case .read(let offset, let length, _):
            require(request.type == 0 && length <= NBDLimits.maximumPayload, "bad READ")
            inBounds(offset, UInt64(length))
        case .write(let offset, let payload, _):
            require(request.type == 1 && !session.isReadOnly, "WRITE let through")
            require(payload.readableBytes == Int(request.length) && !request.payloadDiscarded, "WRITE payload size")
            inBounds(offset, UInt64(payload.readableBytes))
        case .flush:
            require(request.type == 3 && request.offset == 0 && request.length == 0, "bad FLUSH")
        case .trim(let offset, let length, _):
            require(request.type == 4 && !session.isReadOnly, "TRIM let through")
            inBounds(offset, length)
        case .cache(let offset, let length):
            require(request.type == 5, "bad CACHE")
            inBounds(offset, length)
        case .writeZeroes(let offset, let length, _, let fastZero, _):
            require(request.type == 6 && !session.isReadOnly, "WRITE_ZEROES let through")
            require(!fastZero || !session.isReadOnly, "fast zero on a read-only export")
            inBounds(offset, length)
        case .blockStatus(let offset, let length, _):
            require(request.type == 7 && session.structuredReplies && !session.metaContexts.isEmpty && length > 0,
                    "BLOCK_STATUS let through")
            inBounds(offset, length)
        }
    }
}

func drive(_ pieces: [[UInt8]], stream: [UInt8], config: UInt8, limits: UInt8, seed: UInt64) -> [String] {
    let framing: NBDFraming = limits & 0x10 != 0 ? .extended : .compact
    let headerSize = framing.requestHeaderSize
    let session = session(config, framing: framing)
    var machine = TransmissionStateMachine(
        session: session, maximumInFlight: [1, 2, 16, 128][Int(limits & 3)],
        maximumBytesInFlight: [4096, 1 << 20, 32 << 20, 1][Int(limits >> 2) & 3])
    var decoder = NBDRequestDecoder(framing: framing)
    var buffer = ByteBuffer()
    var events: [String] = []
    var position = 0  // where the next request starts in `stream`
    var inFlight: [UInt64] = []
    var completionRoll = seed
    var stopped = false

    func complete() {
        let cost = inFlight.removeFirst()
        let action = machine.completed(cost: cost)
        require(machine.inFlight == inFlight.count, "in-flight count \(machine.inFlight), model \(inFlight.count)")
        require(machine.bytesInFlight == inFlight.reduce(0, +), "bytes in flight differ from the model")
        if machine.isDisconnecting {
            require((action == .close) == inFlight.isEmpty, "close \(action) with \(inFlight.count) in flight")
        }
    }

    for piece in pieces where !stopped {
        buffer.writeBytes(piece)
        decoding: while !stopped {
            while machine.shouldPauseReading && !inFlight.isEmpty { complete() }
            if machine.isDisconnecting { stopped = true; break }
            require(!machine.shouldPauseReading, "reading still paused with nothing in flight")
            let missing = decoder.bytesMissing(in: buffer)
            let before = buffer.readerIndex
            switch decoder.decode(&buffer) {
            case .needMoreData:
                // Only a WRITE header whose payload is still to come is taken ahead of it.
                let headerTaken = decoder.isWithinRequest && buffer.readerIndex - before == headerSize
                require(buffer.readerIndex == before || missing == nil || missing == 0 || headerTaken, "needMoreData consumed bytes")
                break decoding
            case .protocolViolation(let error):
                if let missing { require(missing == 0, "violation reported though \(missing) bytes were missing") }
                switch error {
                case .badMagic(let magic):
                    require(stream.count >= position + 4, "bad magic past the end")
                    let expected = stream[position..<(position + 4)].reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
                    require(magic == expected && magic != framing.requestMagic, "bad magic \(magic) is not the stream's")
                case .payloadTooLarge(let length):
                    require(length > NBDLimits.maximumDrainedPayload, "refused a drainable payload")
                }
                events.append("violation \(error)")
                stopped = true
            case .request(let request):
                if let missing { require(missing == 0, "request decoded though \(missing) bytes were missing") }
                let encoded = encode(request, framing: framing)
                require(stream.count >= position + encoded.count, "request past the stream")
                require(Array(stream[position..<(position + headerSize)]) == Array(encoded.prefix(headerSize)),
                        "re-encoded header differs")
                if request.type == NBDCommandType.write.rawValue {
                    require(request.payloadDiscarded == (request.length > NBDLimits.maximumPayload), "discard flag")
                    if !request.payloadDiscarded {
                        require(Array(stream[position..<(position + encoded.count)]) == encoded, "re-encoded WRITE differs")
                    }
                    position += headerSize + Int(request.length)
                } else if case .unexpectedPayload(let length) = request.defect {
                    // Extended headers: a payload on a command without one, drained.
                    require(framing == .extended && request.flags.contains(.payloadLength) && length == request.length,
                            "drained payload \(length) without PAYLOAD_LEN")
                    require(request.payload == nil, "payload kept on a non-WRITE")
                    position += headerSize + Int(length)
                } else {
                    require(request.payload == nil, "payload on a non-WRITE")
                    // PAYLOAD_LEN with length 0 has nothing to drain; the machine refuses the flag.
                    require(framing == .compact || !request.flags.contains(.payloadLength) || request.length == 0,
                            "PAYLOAD_LEN payload not drained")
                    position += headerSize
                }
                let disposition = machine.received(request)
                checkDisposition(disposition, request, session)
                events.append("\(request.type) \(request.cookie) \(disposition)")
                switch disposition {
                case .disconnect:
                    if inFlight.isEmpty { require(machine.canCloseNow, "cannot close with nothing in flight") }
                case .reject:
                    // Answered as decoded: never in flight.
                    require(machine.inFlight == inFlight.count, "a refused request was counted in flight")
                case .execute:
                    inFlight.append(TransmissionStateMachine.cost(of: disposition))
                }
                completionRoll = completionRoll &* 6364136223846793005 &+ 1442695040888963407
                if completionRoll >> 62 == 0 && !inFlight.isEmpty { complete() }
            }
        }
    }
    while !inFlight.isEmpty { complete() }
    if !machine.isDisconnecting { require(!machine.shouldPauseReading, "paused with nothing in flight") }
    return events
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ start: UnsafeRawPointer, _ count: Int) -> CInt {
    fuzz(UnsafeRawBufferPointer(start: start, count: count))
    return 0
}

func fuzz(_ buffer: UnsafeRawBufferPointer) {
    var input = FuzzInput(buffer)
    let config = input.byte()
    let limits = input.byte()
    let seed = input.u64()
    var splitter = StreamSplitter(seed: seed)
    let stream = input.rest()
    let whole = drive([stream], stream: stream, config: config, limits: limits, seed: seed)
    let pieces = drive(splitter.pieces(of: stream), stream: stream, config: config, limits: limits, seed: seed)
    require(whole == pieces, "feeding the stream in pieces changed the requests")
}
