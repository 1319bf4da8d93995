import NBDProtocol
import Testing
import TidemarkTLS

@Suite("TLS options: which combinations are accepted, and what the messages say")
struct TLSServerSettingsTests {
    @Test("the modes map to the handshake's policies")
    func policies() {
        #expect(TLSServerSettings(mode: .off).policy == .unavailable)
        #expect(TLSServerSettings(mode: .on, pskFile: "k").policy == .offered)
        #expect(TLSServerSettings(mode: .require, pskFile: "k").policy == .required)
    }

    @Test("valid combinations pass")
    func valid() throws {
        try TLSServerSettings().validate()
        try TLSServerSettings(mode: .require, certificatesDirectory: "d").validate()
        try TLSServerSettings(mode: .on, certificatesDirectory: "d", verifyPeer: true, allowedNames: ["CN=a"]).validate()
        try TLSServerSettings(mode: .require, pskFile: "k", allowedNames: ["alice"]).validate()
    }

    @Test(
        "invalid combinations are refused with the option to fix",
        arguments: [
            (TLSServerSettings(mode: .require), TLSCredentialsError.noCredentials(mode: .require)),
            (TLSServerSettings(mode: .on), .noCredentials(mode: .on)),
            (TLSServerSettings(mode: .require, certificatesDirectory: "d", pskFile: "k"), .bothCredentialKinds),
            (TLSServerSettings(mode: .off, certificatesDirectory: "d"), .optionWithoutTLS(option: "--tls-certificates")),
            (TLSServerSettings(mode: .off, pskFile: "k"), .optionWithoutTLS(option: "--tls-psk")),
            (TLSServerSettings(mode: .off, verifyPeer: true), .optionWithoutTLS(option: "--tls-verify-peer")),
            (TLSServerSettings(mode: .off, allowedNames: ["x"]), .optionWithoutTLS(option: "--tls-allow")),
            (TLSServerSettings(mode: .require, pskFile: "k", verifyPeer: true), .verifyPeerWithPSK),
            (TLSServerSettings(mode: .require, certificatesDirectory: "d", allowedNames: ["CN=a"]), .allowListNeedsVerifyPeer),
            (TLSServerSettings(mode: .require, pskFile: "k", allowedNames: [""]), .emptyAllowedName),
        ])
    func invalid(settings: TLSServerSettings, expected: TLSCredentialsError) {
        #expect(throws: expected) { try settings.validate() }
        #expect(!expected.description.isEmpty)
    }
}
