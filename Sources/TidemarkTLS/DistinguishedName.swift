import NIOSSL

/// A certificate subject written as qemu's `--tls-authz` and gnutls print it: RFC 4514,
/// most specific attribute first (`CN=client.example.com,O=Example,C=GB`), with RFC 4514
/// escaping. `--tls-allow` names are compared with this text exactly.
public enum DistinguishedName {
    /// The subject of `certificate`, or nil when it holds an attribute type this build
    /// cannot name (such a client matches no allow-list entry).
    public static func subject(of certificate: NIOSSLCertificate) -> String? {
        format(certificate.subjectName)
    }

    /// Formats name attributes given in certificate order (least specific first).
    public static func format(_ names: [SSLCertificateName]) -> String? {
        var parts: [String] = []
        parts.reserveCapacity(names.count)
        for name in names.reversed() {
            guard let type = shortName(name.type) else { return nil }
            parts.append("\(type)=\(escaped(name.value))")
        }
        return parts.joined(separator: ",")
    }

    private static func shortName(_ type: SSLCertificateNameType) -> String? {
        switch type {
        case .commonName: return "CN"
        case .organization: return "O"
        case .organizationalUnit: return "OU"
        case .city: return "L"
        case .state: return "ST"
        case .country: return "C"
        case .emailAddress: return "EMAIL"
        case .userId: return "UID"
        default: return nil
        }
    }

    /// RFC 4514 section 2.4: backslash before `"+,;<>\`, before a leading `#` or space and
    /// before a trailing space.
    static func escaped(_ value: String) -> String {
        var result = ""
        let characters = Array(value)
        for (index, character) in characters.enumerated() {
            let special: Bool
            switch character {
            case "\"", "+", ",", ";", "<", ">", "\\": special = true
            case "#": special = index == 0
            case " ": special = index == 0 || index == characters.count - 1
            default: special = false
            }
            if special { result.append("\\") }
            result.append(character)
        }
        return result
    }
}
