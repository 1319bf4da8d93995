// libFuzzer harness: the NBD handshake as a stranger drives it.
//
// Input: [config byte][8-byte split seed][client → server bytes, from the client flags on].
// The stream is fed to HandshakeStateMachine twice, whole and cut at seed-chosen points;
// both runs must take the same actions and write the same bytes. Every step's replies must
// be well-formed option replies for the option just consumed, and a session must describe
// the export that was asked for.
import FuzzSupport

import NBDProtocol
import NIOCore

struct Catalog: NBDExportCatalog {
    let exports: [NBDExportSummary] = [
        NBDExportSummary(
            name: "disk", description: "the main disk", size: 1 << 30, isReadOnly: false,
            minimumBlockSize: 512, metaContexts: ["base:allocation", "qemu:dirty-bitmap:b0"]),
        NBDExportSummary(
            name: "ro", description: "", size: 1000, isReadOnly: true, minimumBlockSize: 1,
            metaContexts: ["base:allocation"]),
        NBDExportSummary(
            name: "bitmaps", description: String(repeating: "é", count: 2100), size: 64 << 20, isReadOnly: false,
            minimumBlockSize: 512,
            metaContexts: ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"]),
    ]
    func exportSummaries() -> [NBDExportSummary] { exports }
    func exportSummary(named name: String) -> NBDExportSummary? {
        name.isEmpty ? exports.first : exports.first { $0.name == name }
    }
}

let catalog = Catalog()

struct Run: Equatable {
    var events: [String] = []
    var output: [UInt8] = []
}

/// Checks the replies one option produced: a run of replies for `option`, the last one an
/// ACK or an error and only the last.
func checkReplies(_ bytes: [UInt8], option: UInt32, consumedData: Int) {
    var buffer = ByteBuffer(bytes: bytes)
    var sawFinal = false
    require(!bytes.isEmpty, "option \(option) got no reply")
    while buffer.readableBytes > 0 {
        require(!sawFinal, "reply after the final reply of option \(option)")
        guard let (magic, replyOption, type, length) = buffer.readMultipleIntegers(
            as: (UInt64, UInt32, UInt32, UInt32).self)
        else { fail("truncated reply header") }
        require(magic == NBDMagic.optionReply, "bad reply magic")
        require(replyOption == option, "reply for option \(replyOption) to option \(option)")
        guard var body = buffer.readSlice(length: Int(length)) else { fail("reply body overruns") }
        if type & 0x8000_0000 != 0 {
            require(Int(length) <= 4096, "error message of \(length) bytes")
            require(body.readString(length: body.readableBytes) != nil, "error message not UTF-8")
            sawFinal = true
        } else if type == NBDOptionReply.ack {
            require(length == 0, "ACK with data")
            sawFinal = true
        } else if type == NBDOptionReply.metaContext {
            require(option == NBDOption.listMetaContext || option == NBDOption.setMetaContext, "context reply to \(option)")
            guard let id = body.readInteger(as: UInt32.self), let name = body.readString(length: body.readableBytes)
            else { fail("bad context reply") }
            require((option == NBDOption.setMetaContext) == (id != 0), "context id \(id) for option \(option)")
            require(catalog.exports.contains { $0.metaContexts.contains(name) }, "unknown context \(name)")
        } else if type == NBDOptionReply.info {
            require(option == NBDOption.info || option == NBDOption.go, "info reply to \(option)")
            require(length >= 2, "info reply without a type")
        } else if type == NBDOptionReply.server {
            require(option == NBDOption.list, "server reply to \(option)")
            guard let nameLength = body.readInteger(as: UInt32.self) else { fail("bad server reply") }
            require(Int(nameLength) <= body.readableBytes, "server reply name overruns")
        } else {
            require(false, "reply type \(type)")
        }
    }
    require(sawFinal, "option \(option) got no final reply")
}

func drive(_ pieces: [[UInt8]], offersStructuredReplies: Bool) -> Run {
    var machine = HandshakeStateMachine(offersStructuredReplies: offersStructuredReplies)
    var input = ByteBuffer()
    var output = ByteBuffer()
    var run = Run()
    var flagsRead = false
    var finished = false
    for piece in pieces where !finished {
        input.writeBytes(piece)
        stepping: while !finished {
            let before = input.readerIndex
            let outputBefore = output.writerIndex
            let option = flagsRead ? input.getInteger(at: input.readerIndex + 8, as: UInt32.self) : nil
            let dataLength = flagsRead ? input.getInteger(at: input.readerIndex + 12, as: UInt32.self) : nil
            let action = machine.process(&input, catalog: catalog, output: &output)
            let written = output.getBytes(at: outputBefore, length: output.writerIndex - outputBefore) ?? []
            switch action {
            case .needMoreData:
                require(input.readerIndex == before && written.isEmpty, "needMoreData consumed or wrote")
                break stepping
            case .continueNegotiating:
                require(input.readerIndex > before, "no progress")
                if flagsRead {
                    require(input.readerIndex - before == 16 + Int(dataLength!), "consumed a different length")
                    checkReplies(written, option: option!, consumedData: Int(dataLength!))
                } else {
                    require(written.isEmpty, "wrote a reply to the client flags")
                }
                flagsRead = true
            case .abort:
                require(option == NBDOption.abort, "abort on option \(String(describing: option))")
                checkReplies(written, option: NBDOption.abort, consumedData: 0)
                finished = true
            case .enterTransmission(let session):
                guard let summary = catalog.exportSummary(named: session.exportName) else {
                    fail("session for unknown export")
                }
                require(session.size == summary.size, "session size")
                require(session.isReadOnly == summary.isReadOnly, "session read-only")
                require(session.structuredReplies || session.metaContexts.isEmpty, "contexts without structured replies")
                require(offersStructuredReplies || !session.structuredReplies, "structured replies when refused")
                for context in session.metaContexts {
                    require(summary.metaContexts.contains(context.name), "context \(context.name) not on the export")
                    require(context.id != 0, "context id 0")
                }
                if option == NBDOption.exportName {
                    require(written.count == 10 || written.count == 134, "EXPORT_NAME reply of \(written.count) bytes")
                } else {
                    require(option == NBDOption.go, "transmission after option \(String(describing: option))")
                    checkReplies(written, option: NBDOption.go, consumedData: Int(dataLength!))
                }
                finished = true
            case .close:
                finished = true
            case .startTLS:
                fail("STARTTLS accepted by a machine without a TLS policy")
            }
            run.events.append("\(action)")
            run.output += written
        }
    }
    return run
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ start: UnsafeRawPointer, _ count: Int) -> CInt {
    fuzz(UnsafeRawBufferPointer(start: start, count: count))
    return 0
}

func fuzz(_ buffer: UnsafeRawBufferPointer) {
    var input = FuzzInput(buffer)
    let config = input.byte()
    var splitter = StreamSplitter(seed: input.u64())
    let stream = input.rest()
    let offers = config & 1 == 0
    let whole = drive([stream], offersStructuredReplies: offers)
    let pieces = drive(splitter.pieces(of: stream), offersStructuredReplies: offers)
    require(whole == pieces, "feeding the stream in pieces changed the outcome")
}
