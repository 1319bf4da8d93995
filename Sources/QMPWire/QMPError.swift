/// An error returned to a QMP client: `{"error": {"class": …, "desc": …}}`.
public struct QMPError: Error, Equatable, CustomStringConvertible {
    /// QEMU's error classes that Tidemark uses.
    public enum ErrorClass: String, Sendable {
        case genericError = "GenericError"
        case commandNotFound = "CommandNotFound"
        case deviceNotFound = "DeviceNotFound"
    }

    public var errorClass: ErrorClass
    public var desc: String

    public init(_ errorClass: ErrorClass = .genericError, _ desc: String) {
        self.errorClass = errorClass
        self.desc = desc
    }

    public var description: String { "\(errorClass.rawValue): \(desc)" }

    /// The wire form.
    public var json: JSONValue { ["class": .string(errorClass.rawValue), "desc": .string(desc)] }
}
