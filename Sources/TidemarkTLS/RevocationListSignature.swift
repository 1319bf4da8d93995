import CNIOBoringSSL
import NIOSSL

#if canImport(Glibc)
import Glibc
#endif

/// Checks that a CRL was issued and signed by a CA of `ca-cert.pem`, with the BoringSSL
/// that swift-nio-ssl bundles (swift-nio-ssl itself has no CRL API).
///
/// Why: a CRL is trusted to *remove* trust. A file that anyone could have written (or
/// that a damaged copy or a wrong CA produced) must not be used silently: a forged list
/// could be emptied, and a list of another CA revokes nothing of ours while looking as if
/// it did. gnutls (qemu-nbd, nbdkit) refuses such a CRL too.
enum RevocationListSignature {
    /// What the check found about one DER-encoded CRL.
    enum Verdict: Equatable {
        /// Signed by one of the authorities. `pastNextUpdate`: its nextUpdate time is in
        /// the past (the CA should have published a newer list by now).
        case signed(pastNextUpdate: Bool)
        /// BoringSSL could not parse the DER as a CRL.
        case unparseable
        /// No authority has the CRL's issuer name as its subject.
        case issuerUnknown(issuer: String)
        /// An authority with the issuer's name exists but the signature does not verify
        /// with its public key (altered bytes, or another key under the same name).
        case badSignature
        /// The only authorities with the issuer's name have a key usage without cRLSign:
        /// their key may not vouch for a CRL (RFC 5280 4.2.1.3; OpenSSL and gnutls refuse
        /// such a CRL too).
        case notForCRLSigning
    }

    /// Verifies `der` against every certificate of `authorities` whose subject is the CRL's
    /// issuer and whose key usage allows cRLSign; one that verifies suffices.
    static func check(der: [UInt8], authorities: [NIOSSLCertificate]) -> Verdict {
        // BoringSSL reports failures on the thread's error queue; leave it empty, as the
        // TLS code that may run on this thread later expects.
        defer { ERR_clear_error() }
        guard let crl = parseCRL(der) else { return .unparseable }
        defer { X509_CRL_free(crl) }
        guard let issuer = X509_CRL_get_issuer(crl) else { return .unparseable }

        // The most telling failure if no authority vouches for the CRL.
        var failure = Verdict.issuerUnknown(issuer: oneLine(issuer))
        for authority in authorities {
            guard let certificate = parseCertificate(authority) else { continue }
            defer { X509_free(certificate) }
            guard let subject = X509_get_subject_name(certificate), X509_NAME_cmp(issuer, subject) == 0 else {
                continue
            }
            // UINT32_MAX when the certificate has no key usage extension (any use allowed).
            guard X509_get_key_usage(certificate) & UInt32(X509v3_KU_CRL_SIGN) != 0 else {
                if failure != .badSignature { failure = .notForCRLSigning }
                continue
            }
            guard let key = X509_get0_pubkey(certificate), X509_CRL_verify(crl, key) == 1 else {
                failure = .badSignature
                continue
            }
            return .signed(pastNextUpdate: isPastNextUpdate(crl))
        }
        return failure
    }

    private static func parseCRL(_ der: [UInt8]) -> OpaquePointer? {
        der.withUnsafeBufferPointer { buffer -> OpaquePointer? in
            guard let base = buffer.baseAddress else { return nil }
            var cursor: UnsafePointer<UInt8>? = base
            guard let crl = d2i_X509_CRL(nil, &cursor, buffer.count) else { return nil }
            // Trailing bytes after the CRL mean the block is not what it claims to be.
            guard cursor == base + buffer.count else {
                X509_CRL_free(crl)
                return nil
            }
            return crl
        }
    }

    private static func parseCertificate(_ certificate: NIOSSLCertificate) -> OpaquePointer? {
        guard let der = try? certificate.toDERBytes() else { return nil }
        return der.withUnsafeBufferPointer { buffer -> OpaquePointer? in
            guard let base = buffer.baseAddress else { return nil }
            var cursor: UnsafePointer<UInt8>? = base
            return d2i_X509(nil, &cursor, buffer.count)
        }
    }

    /// Whether the CRL's nextUpdate (when it has one) lies in the past.
    private static func isPastNextUpdate(_ crl: OpaquePointer) -> Bool {
        guard let nextUpdate = X509_CRL_get0_nextUpdate(crl) else { return false }
        // Negative: nextUpdate <= now. Zero means the time could not be read, which the
        // DER walk and BoringSSL's parse already rule out; it is not reported as past.
        return X509_cmp_time_posix(nextUpdate, Int64(time(nil))) < 0
    }

    /// The issuer as OpenSSL's one-line form (`/O=Example/CN=Example CA`), for messages.
    private static func oneLine(_ name: OpaquePointer) -> String {
        var buffer = [CChar](repeating: 0, count: 256)
        let written = buffer.withUnsafeMutableBufferPointer { pointer -> Bool in
            guard let base = pointer.baseAddress else { return false }
            return X509_NAME_oneline(name, base, Int32(pointer.count)) != nil
        }
        guard written, let end = buffer.firstIndex(of: 0) else { return "(unreadable name)" }
        return String(decoding: buffer[..<end].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
