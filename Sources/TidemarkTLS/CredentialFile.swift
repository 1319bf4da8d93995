#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Reads credential files with a size bound, turning failures into messages that name
/// the file and its role.
enum CredentialFile {
    /// Certificates, keys, CRLs and PSK files are all far smaller than this.
    static let maximumSize = 4 << 20

    static func read(_ path: String, role: String) throws(TLSCredentialsError) -> [UInt8] {
        guard FileManager.default.fileExists(atPath: path) else {
            throw .missingFile(path: path, role: role)
        }
        let data: Data
        do {
            data = try Data(contentsOf: URL(fileURLWithPath: path), options: .mappedIfSafe)
        } catch {
            throw .unreadableFile(path: path, reason: "\(error)")
        }
        guard data.count <= maximumSize else { throw .fileTooLarge(path: path, limit: maximumSize) }
        return [UInt8](data)
    }

    static func exists(_ path: String) -> Bool {
        FileManager.default.fileExists(atPath: path)
    }
}
