import NIOCore

extension NBDReplyEncoder {
    /// True when a reply holds an error: a simple reply with a non-zero error, or any
    /// structured or extended ERROR chunk. For metrics (`result="error"`) of replies made on
    /// the I/O pool; reads the buffer without consuming it and stops at anything it cannot parse.
    /// - Parameter start: where the reply begins in `reply`.
    public static func isErrorReply(_ reply: ByteBuffer, at start: Int) -> Bool {
        var index = start
        let end = reply.writerIndex
        while index + 4 <= end, let magic = reply.getInteger(at: index, as: UInt32.self) {
            if magic == NBDMagic.simpleReply {
                guard let error = reply.getInteger(at: index + 4, as: UInt32.self) else { return false }
                if error != 0 { return true }
                // A simple READ reply's data follows; nothing else can.
                return false
            }
            guard let type = reply.getInteger(at: index + 6, as: UInt16.self) else { return false }
            if magic == NBDMagic.structuredReply {
                guard let length = reply.getInteger(at: index + 16, as: UInt32.self) else { return false }
                if type & 0x8000 != 0 { return true }
                index += 20 + Int(length)
            } else if magic == NBDMagic.extendedReply {
                guard let length = reply.getInteger(at: index + 24, as: UInt64.self), length <= UInt64(end - index)
                else { return false }
                if type & 0x8000 != 0 { return true }
                index += 32 + Int(length)
            } else {
                return false
            }
        }
        return false
    }
}
