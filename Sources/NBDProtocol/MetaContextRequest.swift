import NIOCore

/// The payload of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
struct MetaContextRequest {
    /// More queries than this get `NBD_REP_ERR_TOO_BIG` (bounds the reply size).
    static let maximumQueries = 256

    var exportName: String
    /// Queries, with over-long or non-UTF-8 ones already dropped (they can match nothing).
    var queries: [String]

    /// Parses the payload; nil when a length field runs past the data.
    static func parse(_ data: inout ByteBuffer) -> MetaContextRequest? {
        guard let nameLength = data.readInteger(as: UInt32.self), Int(nameLength) <= data.readableBytes,
            let name = HandshakeStateMachine.decodeString(data, length: Int(nameLength))
        else { return nil }
        data.moveReaderIndex(forwardBy: Int(nameLength))
        guard let count = data.readInteger(as: UInt32.self) else { return nil }
        // Every query takes at least 4 bytes, so the count is bounded by the data.
        guard UInt64(count) * 4 <= UInt64(data.readableBytes) else { return nil }
        var queries: [String] = []
        for _ in 0..<count {
            guard let length = data.readInteger(as: UInt32.self), Int(length) <= data.readableBytes else { return nil }
            if let query = HandshakeStateMachine.decodeString(data, length: Int(length)) {
                queries.append(query)
            }
            data.moveReaderIndex(forwardBy: Int(length))
        }
        guard data.readableBytes == 0 else { return nil }
        return MetaContextRequest(exportName: name, queries: queries)
    }
}

/// Matches context queries against an export's contexts, following the spec and qemu.
enum MetaContextMatcher {
    /// Namespace wildcards that list a family of contexts but select none.
    private static let wildcards = ["base:", "qemu:", "qemu:dirty-bitmap:"]

    /// Indices into `available` of the contexts the queries name, in `available` order,
    /// each once. LIST with no query lists everything; SET with none selects nothing.
    static func match(queries: [String], available: [String], selecting: Bool) -> [Int] {
        if queries.isEmpty {
            return selecting ? [] : Array(available.indices)
        }
        var chosen = [Bool](repeating: false, count: available.count)
        for query in queries {
            if wildcards.contains(query) {
                guard !selecting else { continue }
                for (index, name) in available.enumerated() where name.hasPrefix(query) {
                    chosen[index] = true
                }
            } else if let index = available.firstIndex(of: query) {
                chosen[index] = true
            }
        }
        return chosen.indices.filter { chosen[$0] }
    }
}
