import Testing
import TidemarkTLS

@Suite("PSK key files: psktool's identity:hexkey lines, hostile input")
struct PSKKeyFileTests {
    @Test("psktool lines are read and their keys hex-decoded (upper and lower case, CRLF, comments, blank lines)")
    func parsesPsktoolLines() throws {
        let text = "alice:000102ff\r\n\n# a comment\nbob:ABCDEF\n"
        let file = try PSKKeyFile(parsing: Array(text.utf8), path: "keys.psk")
        #expect(file.keys == ["alice": [0x00, 0x01, 0x02, 0xFF], "bob": [0xAB, 0xCD, 0xEF]])
    }

    @Test(
        "malformed lines are refused with the line number and what is wrong",
        arguments: [
            ("alice", "no ':'"), (":0011", "empty identity"), ("alice:", "empty key"), ("alice:abc", "odd number"),
            ("alice:zz", "not hexadecimal"), ("al\u{1}ce:00", "printable"),
            ("alice:" + String(repeating: "00", count: 257), "longer than 256"),
            (String(repeating: "a", count: 129) + ":00", "identity longer"),
        ])
    func malformedLines(line: String, expected: String) {
        do {
            _ = try PSKKeyFile(parsing: Array(("ok:00\n" + line + "\n").utf8), path: "k.psk")
            Issue.record("accepted '\(line)'")
        } catch {
            guard case .malformedPSKLine(let path, let number, let reason) = error else {
                Issue.record("unexpected \(error)")
                return
            }
            #expect(path == "k.psk")
            #expect(number == 2)
            #expect(reason.contains(expected), "\(reason)")
            #expect(error.description.contains("psktool"))
        }
    }

    @Test("an identity listed twice is refused")
    func duplicateIdentity() {
        #expect(throws: TLSCredentialsError.duplicatePSKIdentity(path: "k", line: 2, identity: "a")) {
            try PSKKeyFile(parsing: Array("a:00\na:01\n".utf8), path: "k")
        }
    }

    @Test("a file with no key is refused", arguments: ["", "\n\n", "# only a comment\n"])
    func emptyFile(text: String) {
        #expect(throws: TLSCredentialsError.emptyPSKFile(path: "k")) {
            try PSKKeyFile(parsing: Array(text.utf8), path: "k")
        }
    }

    @Test("a file over 1 MiB is refused before parsing")
    func hugeFile() {
        let bytes = [UInt8](repeating: UInt8(ascii: "a"), count: PSKKeyFile.maximumFileSize + 1)
        #expect(throws: TLSCredentialsError.fileTooLarge(path: "k", limit: PSKKeyFile.maximumFileSize)) {
            try PSKKeyFile(parsing: bytes, path: "k")
        }
    }

    @Test("random bytes never trap: each input is parsed or refused")
    func randomBytes() {
        var generator = SystemRandomNumberGenerator()
        let alphabet = Array("ab:0F\n\r#\u{0}\u{ff}".utf8)
        var accepted = 0
        for _ in 0..<5000 {
            let count = Int.random(in: 0..<64, using: &generator)
            let bytes = (0..<count).map { _ in alphabet[Int.random(in: 0..<alphabet.count, using: &generator)] }
            if (try? PSKKeyFile(parsing: bytes, path: "k")) != nil { accepted += 1 }
        }
        #expect(accepted < 5000)
    }
}
