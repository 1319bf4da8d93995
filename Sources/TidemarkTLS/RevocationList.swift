#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import NIOSSL

/// The serial numbers a `ca-crl.pem` revokes. swift-nio-ssl has no CRL support, so the
/// server reads the list itself and refuses a client whose certificate serial is on it.
/// Every CRL in the file must be issued and signed by a CA of `ca-cert.pem`: a list of
/// another CA, or one whose bytes were altered, is refused rather than used (a forged list
/// could silently drop revocations). A list past its nextUpdate is still used (dropping it
/// would un-revoke its certificates) and reported so the caller can warn. The DER walk is
/// bounded and never traps on a damaged file.
public struct RevocationList: Sendable, Equatable {
    /// Revoked serial numbers, big-endian without leading zero bytes.
    public let revokedSerials: Set<[UInt8]>
    /// Whether a CRL in the file is past its nextUpdate time: the CA should have issued a
    /// newer one. Its revocations still apply.
    public let isPastNextUpdate: Bool

    /// Parses every `X509 CRL` PEM block in `pem` (read from `path`) and checks that each
    /// is signed by one of `authorities` (read from `authoritiesPath`).
    public init(
        pem: [UInt8], path: String, authorities: [NIOSSLCertificate], authoritiesPath: String
    ) throws(TLSCredentialsError) {
        guard let text = String(validating: pem, as: UTF8.self) else {
            throw .badCRL(path: path, reason: "not PEM text")
        }
        var serials: Set<[UInt8]> = []
        var found = false
        var pastNextUpdate = false
        var remaining = Substring(text)
        while let begin = remaining.firstRange(of: "-----BEGIN X509 CRL-----") {
            guard let end = remaining[begin.upperBound...].firstRange(of: "-----END X509 CRL-----")
            else { throw .badCRL(path: path, reason: "a BEGIN X509 CRL block has no END") }
            let body = remaining[begin.upperBound..<end.lowerBound].filter { !$0.isWhitespace }
            guard let der = Data(base64Encoded: String(body)) else {
                throw .badCRL(path: path, reason: "the base64 inside the PEM block is damaged")
            }
            guard let parsed = Self.revokedSerials(der: [UInt8](der)) else {
                throw .badCRL(path: path, reason: "the DER structure is not a CRL")
            }
            switch RevocationListSignature.check(der: [UInt8](der), authorities: authorities) {
            case .signed(let past):
                pastNextUpdate = pastNextUpdate || past
            case .unparseable:
                throw .badCRL(path: path, reason: "the DER structure is not a CRL")
            case .issuerUnknown(let issuer):
                throw .revocationListNotSigned(
                    path: path, authorities: authoritiesPath,
                    reason: "its issuer \(issuer) is not the subject of any certificate there")
            case .badSignature:
                throw .revocationListNotSigned(
                    path: path, authorities: authoritiesPath,
                    reason: "its signature does not verify with the CA's public key (altered, or signed by another key)")
            case .notForCRLSigning:
                throw .revocationListNotSigned(
                    path: path, authorities: authoritiesPath,
                    reason: "the CA certificate of its issuer has a key usage without cRLSign, so it may not sign CRLs")
            }
            serials.formUnion(parsed)
            found = true
            remaining = remaining[end.upperBound...]
        }
        guard found else { throw .badCRL(path: path, reason: "no '-----BEGIN X509 CRL-----' block") }
        revokedSerials = serials
        isPastNextUpdate = pastNextUpdate
    }

    /// Whether a certificate with this serial number is revoked.
    public func isRevoked(serial: [UInt8]) -> Bool {
        revokedSerials.contains(Self.normalized(serial[...]))
    }

    static func normalized(_ serial: ArraySlice<UInt8>) -> [UInt8] {
        Array(serial.drop(while: { $0 == 0 }))
    }

    /// CertificateList → TBSCertList → revokedCertificates → userCertificate.
    static func revokedSerials(der: [UInt8]) -> Set<[UInt8]>? {
        var outer = DERReader(der[...])
        guard let certificateList = outer.read(tag: 0x30) else { return nil }
        var list = DERReader(certificateList)
        guard let tbs = list.read(tag: 0x30) else { return nil }
        var fields = DERReader(tbs)
        if fields.peekTag == 0x02 { _ = fields.read(tag: 0x02) }  // version
        guard fields.read(tag: 0x30) != nil,  // signature algorithm
            fields.read(tag: 0x30) != nil,  // issuer
            fields.readTime() != nil  // thisUpdate
        else { return nil }
        if fields.peekTag == 0x17 || fields.peekTag == 0x18 { _ = fields.readTime() }  // nextUpdate
        var serials: Set<[UInt8]> = []
        guard fields.peekTag == 0x30, let revoked = fields.read(tag: 0x30) else { return serials }
        var entries = DERReader(revoked)
        while !entries.isAtEnd {
            guard let entry = entries.read(tag: 0x30) else { return nil }
            var entryFields = DERReader(entry)
            guard let serial = entryFields.read(tag: 0x02) else { return nil }
            serials.insert(normalized(serial))
        }
        return serials
    }
}

/// Reads DER tag-length-value items from a slice; nil on anything malformed.
struct DERReader {
    private var bytes: ArraySlice<UInt8>

    init(_ bytes: ArraySlice<UInt8>) { self.bytes = bytes }

    var isAtEnd: Bool { bytes.isEmpty }
    var peekTag: UInt8? { bytes.first }

    mutating func readTime() -> ArraySlice<UInt8>? {
        if peekTag == 0x17 { return read(tag: 0x17) }
        return read(tag: 0x18)
    }

    /// The content of the next item if its tag is `tag`.
    mutating func read(tag: UInt8) -> ArraySlice<UInt8>? {
        guard bytes.count >= 2, bytes[bytes.startIndex] == tag else { return nil }
        var index = bytes.startIndex + 1
        let first = bytes[index]
        index += 1
        var length = 0
        if first < 0x80 {
            length = Int(first)
        } else {
            let count = Int(first & 0x7F)
            guard count >= 1, count <= 4, bytes.endIndex - index >= count else { return nil }
            for _ in 0..<count {
                length = length << 8 | Int(bytes[index])
                index += 1
            }
        }
        guard length <= bytes.endIndex - index else { return nil }
        let content = bytes[index..<(index + length)]
        bytes = bytes[(index + length)...]
        return content
    }
}
