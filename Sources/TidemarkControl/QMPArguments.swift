import QMPWire

/// Typed access to a command's `arguments`, with QEMU's error messages for a missing,
/// mistyped or unexpected parameter.
public struct QMPArguments {
    private let members: [String: JSONValue]

    /// - Parameter allowed: every parameter the command knows; any other is refused.
    public init(_ value: JSONValue?, allowed: Set<String>) throws(QMPError) {
        switch value {
        case nil, .null?:
            members = [:]
        case .object(let object)?:
            members = object
        case let other?:
            throw QMPError(.genericError, "Invalid parameter type for 'arguments', expected: object, got \(other.typeName)")
        }
        if let unexpected = members.keys.sorted().first(where: { !allowed.contains($0) }) {
            throw QMPError(.genericError, "Parameter '\(unexpected)' is unexpected")
        }
    }

    public func string(_ key: String) throws(QMPError) -> String {
        guard let value = try optionalString(key) else { throw Self.missing(key) }
        return value
    }

    public func optionalString(_ key: String) throws(QMPError) -> String? {
        switch members[key] {
        case nil: return nil
        case .string(let value)?: return value
        case let other?: throw Self.wrongType(key, expected: "string", got: other)
        }
    }

    public func bool(_ key: String, default fallback: Bool) throws(QMPError) -> Bool {
        switch members[key] {
        case nil: return fallback
        case .bool(let value)?: return value
        case let other?: throw Self.wrongType(key, expected: "boolean", got: other)
        }
    }

    public func optionalUInt(_ key: String) throws(QMPError) -> UInt64? {
        switch members[key] {
        case nil: return nil
        case .int(let value)? where value >= 0: return UInt64(value)
        case let other?: throw Self.wrongType(key, expected: "non-negative integer", got: other)
        }
    }

    public func array(_ key: String) throws(QMPError) -> [JSONValue] {
        switch members[key] {
        case nil: throw Self.missing(key)
        case .array(let value)?: return value
        case let other?: throw Self.wrongType(key, expected: "array", got: other)
        }
    }

    static func missing(_ key: String) -> QMPError {
        QMPError(.genericError, "Parameter '\(key)' is missing")
    }

    static func wrongType(_ key: String, expected: String, got value: JSONValue) -> QMPError {
        QMPError(.genericError, "Invalid parameter type for '\(key)', expected: \(expected), got \(value.typeName)")
    }
}
