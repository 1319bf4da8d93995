/// A psktool key file (`identity:hexkey` lines), as `--tls-psk FILE` and qemu's
/// `tls-creds-psk` `keys.psk` hold them. The file is untrusted text: every length is
/// bounded and nothing in it can trap.
public struct PSKKeyFile: Sendable, Equatable {
    /// Identities and their decoded keys, in file order.
    public let keys: [String: [UInt8]]

    /// TLS limits an identity to what fits in the handshake; BoringSSL's limit is 128.
    public static let maximumIdentityLength = 128
    /// BoringSSL accepts keys of up to 256 bytes (psktool makes 32).
    public static let maximumKeyLength = 256
    /// No key file of real use comes near this.
    public static let maximumFileSize = 1 << 20

    /// Parses the file's text. `path` is only for messages.
    public init(parsing bytes: [UInt8], path: String) throws(TLSCredentialsError) {
        guard bytes.count <= Self.maximumFileSize else {
            throw .fileTooLarge(path: path, limit: Self.maximumFileSize)
        }
        var keys: [String: [UInt8]] = [:]
        var lineNumber = 0
        for rawLine in bytes.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false) {
            lineNumber += 1
            var line = rawLine[...]
            if line.last == UInt8(ascii: "\r") { line = line.dropLast() }
            if line.allSatisfy({ $0 == UInt8(ascii: " ") || $0 == UInt8(ascii: "\t") }) { continue }
            if line.first == UInt8(ascii: "#") { continue }
            guard let colon = line.firstIndex(of: UInt8(ascii: ":")) else {
                throw .malformedPSKLine(path: path, line: lineNumber, reason: "no ':' between identity and key")
            }
            let identityBytes = line[line.startIndex..<colon]
            let hex = line[line.index(after: colon)...]
            guard !identityBytes.isEmpty else {
                throw .malformedPSKLine(path: path, line: lineNumber, reason: "empty identity")
            }
            guard identityBytes.count <= Self.maximumIdentityLength else {
                throw .malformedPSKLine(
                    path: path, line: lineNumber,
                    reason: "identity longer than \(Self.maximumIdentityLength) bytes")
            }
            guard identityBytes.allSatisfy({ $0 >= 0x20 && $0 != 0x7F }),
                let identity = String(validating: identityBytes, as: UTF8.self)
            else {
                throw .malformedPSKLine(path: path, line: lineNumber, reason: "identity is not printable UTF-8")
            }
            let key = try Self.decodeHex(hex, path: path, line: lineNumber)
            guard keys[identity] == nil else {
                throw .duplicatePSKIdentity(path: path, line: lineNumber, identity: identity)
            }
            keys[identity] = key
        }
        guard !keys.isEmpty else { throw .emptyPSKFile(path: path) }
        self.keys = keys
    }

    private static func decodeHex(_ hex: ArraySlice<UInt8>, path: String, line: Int) throws(TLSCredentialsError) -> [UInt8] {
        guard !hex.isEmpty else { throw .malformedPSKLine(path: path, line: line, reason: "empty key") }
        guard hex.count % 2 == 0 else {
            throw .malformedPSKLine(path: path, line: line, reason: "key has an odd number of hex digits")
        }
        guard hex.count / 2 <= maximumKeyLength else {
            throw .malformedPSKLine(path: path, line: line, reason: "key longer than \(maximumKeyLength) bytes")
        }
        var key: [UInt8] = []
        key.reserveCapacity(hex.count / 2)
        var index = hex.startIndex
        while index < hex.endIndex {
            guard let high = hexValue(hex[index]), let low = hexValue(hex[index + 1]) else {
                throw .malformedPSKLine(path: path, line: line, reason: "key is not hexadecimal")
            }
            key.append(high << 4 | low)
            index += 2
        }
        return key
    }

    private static func hexValue(_ digit: UInt8) -> UInt8? {
        switch digit {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return digit - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return digit - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return digit - UInt8(ascii: "A") + 10
        default: return nil
        }
    }
}
