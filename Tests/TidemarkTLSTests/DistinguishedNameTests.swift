import NIOSSL
import Testing
import TidemarkTLS

@Suite("Certificate subjects as qemu's --tls-authz lists them")
struct DistinguishedNameTests {
    @Test("most specific attribute first, comma-separated")
    func order() {
        let names = [
            SSLCertificateName("GB", .country), SSLCertificateName("London", .state), SSLCertificateName("London", .city),
            SSLCertificateName("Example Org", .organization), SSLCertificateName("laptop.example.com", .commonName),
        ]
        #expect(DistinguishedName.format(names) == "CN=laptop.example.com,O=Example Org,L=London,ST=London,C=GB")
    }

    @Test("RFC 4514 specials are escaped, so a crafted CN cannot pose as another subject")
    func escaping() {
        let names = [SSLCertificateName("Tidemark", .organization), SSLCertificateName("evil,O=Tidemark", .commonName)]
        #expect(DistinguishedName.format(names) == "CN=evil\\,O=Tidemark,O=Tidemark")
        #expect(DistinguishedName.format([SSLCertificateName(" #lead ", .commonName)]) == "CN=\\ #lead\\ ")
        #expect(DistinguishedName.format([SSLCertificateName("#x", .commonName)]) == "CN=\\#x")
    }
}
