import NBDProtocol
import NIOCore

/// The `command` label of request metrics: one small integer per NBD command, so the
/// per-connection tally indexes plain arrays instead of hashing strings on every request.
public enum RequestKind: Int, CaseIterable, Sendable {
    case read, write, writeZeroes, trim, flush, blockStatus, cache
    /// A refused request whose command type is not one of the above (bounded label set).
    case other

    /// The label value, in Prometheus' snake_case.
    public var label: String {
        switch self {
        case .read: return "read"
        case .write: return "write"
        case .writeZeroes: return "write_zeroes"
        case .trim: return "trim"
        case .flush: return "flush"
        case .blockStatus: return "block_status"
        case .cache: return "cache"
        case .other: return "other"
        }
    }

    /// The kind of a validated command and the bytes it counts for: the data moved by
    /// READ and WRITE, the range changed or prefetched by WRITE_ZEROES, TRIM and CACHE;
    /// FLUSH and BLOCK_STATUS (a query, often of the whole disk) count none.
    init(_ command: NBDCommand) {
        switch command {
        case .read: self = .read
        case .write: self = .write
        case .writeZeroes: self = .writeZeroes
        case .trim: self = .trim
        case .flush: self = .flush
        case .blockStatus: self = .blockStatus
        case .cache: self = .cache
        }
    }

    /// The kind of a refused request, from its raw command type.
    init(rawCommand: UInt16) {
        switch NBDCommandType(rawValue: rawCommand) {
        case .read: self = .read
        case .write: self = .write
        case .writeZeroes: self = .writeZeroes
        case .trim: self = .trim
        case .flush: self = .flush
        case .blockStatus: self = .blockStatus
        case .cache: self = .cache
        case .disconnect, .none: self = .other
        }
    }

    /// See ``init(_:)`` for what counts. `cost` is the request's data bytes
    /// (``TransmissionStateMachine/cost(of:)``), so a WRITE's payload is not copied here.
    static func bytes(of command: NBDCommand, cost: UInt64) -> Int {
        switch command {
        case .read, .write: return Int(cost)
        case .writeZeroes(_, let length, _, _, _), .trim(_, let length, _), .cache(_, let length): return Int(clamping: length)
        case .flush, .blockStatus: return 0
        }
    }
}
