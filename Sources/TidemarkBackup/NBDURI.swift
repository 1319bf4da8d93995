import FoundationEssentials

/// The export-name part of an NBD URI (`nbd://host:port/EXPORT?…`,
/// `nbd+unix:///EXPORT?socket=…`).
///
/// Why: the `--control` cycle pulls from a point-in-time view, a second export on the same
/// server, so the backup needs the user's URI with only the export name swapped — same
/// transport, host, port, socket and TLS settings.
public enum NBDURI {
    /// The export name (percent-decoded), or nil when `uri` is not an NBD URI.
    public static func exportName(of uri: String) -> String? {
        guard let parts = split(uri) else { return nil }
        return percentDecoded(parts.path) ?? parts.path
    }

    /// `uri` with the export name replaced by `export`.
    public static func replacingExport(of uri: String, with export: String) -> String? {
        guard let parts = split(uri) else { return nil }
        let encoded = percentEncoded(export)
        return parts.prefix + "/" + encoded + parts.suffix
    }

    /// Bytes left as they are in an encoded export name (RFC 3986 unreserved and
    /// sub-delimiters, `@` and `:`).
    private static let allowed = Set(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~@:!$&'()*+,;=".utf8)

    private static func percentEncoded(_ text: String) -> String {
        var result = ""
        for byte in text.utf8 {
            if allowed.contains(byte) {
                result.unicodeScalars.append(Unicode.Scalar(byte))
            } else {
                result += "%" + String(byte >> 4, radix: 16, uppercase: true) + String(byte & 15, radix: 16, uppercase: true)
            }
        }
        return result
    }

    /// `%XX` sequences decoded; nil when one is malformed or the result is not UTF-8.
    private static func percentDecoded(_ text: String) -> String? {
        var bytes: [UInt8] = []
        var iterator = text.utf8.makeIterator()
        while let byte = iterator.next() {
            guard byte == UInt8(ascii: "%") else {
                bytes.append(byte)
                continue
            }
            guard let high = iterator.next(), let low = iterator.next(),
                let value = UInt8(String(decoding: [high, low], as: UTF8.self), radix: 16)
            else { return nil }
            bytes.append(value)
        }
        return String(validating: bytes, as: UTF8.self)
    }

    /// (scheme://authority, path without its leading slash, ?query#fragment).
    private static func split(_ uri: String) -> (prefix: String, path: String, suffix: String)? {
        guard uri.hasPrefix("nbd"), let separator = uri.firstRange(of: "://") else { return nil }
        let afterScheme = uri[separator.upperBound...]
        let authorityEnd = afterScheme.firstIndex(where: { $0 == "/" || $0 == "?" || $0 == "#" }) ?? afterScheme.endIndex
        let prefix = String(uri[..<authorityEnd])
        let rest = uri[authorityEnd...]
        let pathEnd = rest.firstIndex(where: { $0 == "?" || $0 == "#" }) ?? rest.endIndex
        var path = rest[..<pathEnd]
        if path.hasPrefix("/") { path = path.dropFirst() }
        return (prefix, String(path), String(rest[pathEnd...]))
    }
}
