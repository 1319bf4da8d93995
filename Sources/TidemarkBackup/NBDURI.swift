import Foundation

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
        return parts.path.removingPercentEncoding ?? parts.path
    }

    /// `uri` with the export name replaced by `export`.
    public static func replacingExport(of uri: String, with export: String) -> String? {
        guard let parts = split(uri) else { return nil }
        let encoded = export.addingPercentEncoding(withAllowedCharacters: allowed) ?? export
        return parts.prefix + "/" + encoded + parts.suffix
    }

    /// Characters left as they are in an encoded export name.
    private static let allowed: CharacterSet = {
        var set = CharacterSet.alphanumerics
        set.insert(charactersIn: "-._~@:!$&'()*+,;=")
        return set
    }()

    /// (scheme://authority, path without its leading slash, ?query#fragment).
    private static func split(_ uri: String) -> (prefix: String, path: String, suffix: String)? {
        guard uri.hasPrefix("nbd"), let schemeEnd = uri.range(of: "://") else { return nil }
        let afterScheme = uri[schemeEnd.upperBound...]
        let authorityEnd = afterScheme.firstIndex(where: { $0 == "/" || $0 == "?" || $0 == "#" }) ?? afterScheme.endIndex
        let prefix = String(uri[..<authorityEnd])
        let rest = uri[authorityEnd...]
        let pathEnd = rest.firstIndex(where: { $0 == "?" || $0 == "#" }) ?? rest.endIndex
        var path = rest[..<pathEnd]
        if path.hasPrefix("/") { path = path.dropFirst() }
        return (prefix, String(path), String(rest[pathEnd...]))
    }
}
