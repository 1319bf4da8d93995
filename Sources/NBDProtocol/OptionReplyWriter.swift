import NIOCore

/// Writes handshake option replies (`NBD_REP_*`) with their 20-byte header.
enum OptionReplyWriter {
    /// Writes one reply whose body is produced by `body`; the length field is patched
    /// afterwards so bodies never need to be measured twice.
    static func reply(
        _ option: UInt32, _ type: UInt32, into output: inout ByteBuffer, body: (inout ByteBuffer) -> Void
    ) {
        output.writeMultipleIntegers(NBDMagic.optionReply, option, type)
        let lengthIndex = output.writerIndex
        output.writeInteger(UInt32(0))
        let start = output.writerIndex
        body(&output)
        output.setInteger(UInt32(output.writerIndex - start), at: lengthIndex)
    }

    static func ack(_ option: UInt32, into output: inout ByteBuffer) {
        output.writeMultipleIntegers(NBDMagic.optionReply, option, NBDOptionReply.ack, UInt32(0))
    }

    /// An error reply carrying a message the client can show to its user.
    static func error(_ option: UInt32, _ type: UInt32, _ message: String, into output: inout ByteBuffer) {
        reply(option, type, into: &output) { body in
            body.writeString(HandshakeStateMachine.truncated(message))
        }
    }
}
