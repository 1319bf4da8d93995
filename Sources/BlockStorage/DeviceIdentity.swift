import CLinuxIO

#if canImport(Glibc)
import Glibc
#endif

/// What disk an image is, independent of the path it was opened at: the key of its bitmap
/// store in a state directory, and the check that a store's bitmaps describe this disk.
///
/// Device paths are not identities: `/dev/sdb` or `/dev/loop0` can be another disk after a
/// reboot or a re-attach, and the same disk can appear at another path. So the identity is
/// read from what the kernel knows about the device, most stable first:
/// - a block device: `/sys/dev/block/MAJ:MIN/` → `device/wwid`, `device/serial` (with the
///   model), `wwid`, `dm/uuid` (LVM, dm-crypt), `md/uuid`; a partition is its disk's
///   identity plus its partition number;
/// - a loop device: its backing file's path, the identity of the file system holding it and
///   its inode (from `LOOP_GET_STATUS64`, so it is the file the loop really holds even if
///   another file was put at that path since), plus offset and size limit when set;
/// - a regular file: its real path, file system and inode, in the same form;
/// - else the path given, which tells nothing apart: `isPathOnly` says so, for a warning.
///
/// The file system holding a file is named by its block device's stable identity where it
/// has one (a dm minor number is not stable across reboots, an LVM UUID is), else by its
/// device number.
public struct DeviceIdentity: Sendable, Equatable, CustomStringConvertible {
    /// The identity, e.g. `wwid:naa.5000c500a1b2c3d4`, `dm-uuid:LVM-…`,
    /// `loop:/srv/disk.img,fs=dev-0:51,ino=1234`, `path:/dev/sdb`.
    public let value: String
    /// Where it was read (a sysfs file, `LOOP_GET_STATUS64`, `fstat`), for messages.
    public let source: String
    /// True when only the path identifies the device: another disk attached at that path
    /// cannot be told apart (except by its size).
    public let isPathOnly: Bool

    public var description: String { value }

    public init(value: String, source: String, isPathOnly: Bool = false) {
        self.value = value
        self.source = source
        self.isPathOnly = isPathOnly
    }

    /// Where sysfs is mounted.
    static let sysfs = "/sys"

    /// The identity of an open image.
    public static func of(_ image: RawImage) -> DeviceIdentity {
        var info = stat()
        guard fstat(image.fd, &info) == 0 else {
            return DeviceIdentity(value: "path:" + image.path, source: "the path given (fstat failed)", isPathOnly: true)
        }
        if image.isBlockDevice {
            let (major, minor) = split(UInt64(info.st_rdev))
            if major == loopMajor, let loop = loopIdentity(fd: image.fd, minor: minor) { return loop }
            if let identity = blockIdentity(major: major, minor: minor) { return identity }
            return DeviceIdentity(
                value: "path:" + image.path,
                source: "the path given (/sys/dev/block/\(major):\(minor) has no wwid, serial, dm or md uuid)",
                isPathOnly: true)
        }
        let real = realPath(image.path) ?? image.path
        let fileSystem = fileSystemIdentity(UInt64(info.st_dev))
        return DeviceIdentity(
            value: "file:\(real),fs=\(fileSystem),ino=\(info.st_ino)", source: "fstat of the file")
    }

    // MARK: - Block devices

    /// The loop driver's major number (`Documentation/admin-guide/devices.txt`).
    static let loopMajor: UInt64 = 7

    /// Major and minor of a Linux dev_t (glibc's encoding; `major()`/`minor()` are macros
    /// Swift cannot import).
    static func split(_ device: UInt64) -> (major: UInt64, minor: UInt64) {
        let major = ((device >> 8) & 0xfff) | ((device >> 32) & ~UInt64(0xfff))
        let minor = (device & 0xff) | ((device >> 12) & ~UInt64(0xff))
        return (major, minor)
    }

    /// The sysfs identity of block device MAJ:MIN, or nil when it has none. A partition is
    /// its disk's identity plus `,part=N`.
    static func blockIdentity(major: UInt64, minor: UInt64) -> DeviceIdentity? {
        let base = "\(sysfs)/dev/block/\(major):\(minor)"
        if let number = readAttribute(base + "/partition") {
            guard let disk = identityAttributes(base + "/..") else { return nil }
            return DeviceIdentity(value: disk.value + ",part=\(number)", source: disk.source)
        }
        return identityAttributes(base)
    }

    /// The first identity attribute found under a sysfs block device folder.
    private static func identityAttributes(_ base: String) -> DeviceIdentity? {
        if let wwid = readAttribute(base + "/device/wwid") {
            return DeviceIdentity(value: "wwid:" + wwid, source: base + "/device/wwid")
        }
        if let serial = readAttribute(base + "/device/serial") {
            let model = readAttribute(base + "/device/model").map { $0 + "/" } ?? ""
            return DeviceIdentity(value: "serial:" + model + serial, source: base + "/device/serial")
        }
        if let wwid = readAttribute(base + "/wwid") {
            return DeviceIdentity(value: "wwid:" + wwid, source: base + "/wwid")
        }
        if let uuid = readAttribute(base + "/dm/uuid") {
            return DeviceIdentity(value: "dm-uuid:" + uuid, source: base + "/dm/uuid")
        }
        if let uuid = readAttribute(base + "/md/uuid") {
            return DeviceIdentity(value: "md-uuid:" + uuid, source: base + "/md/uuid")
        }
        return nil
    }

    /// A loop device: the file it is attached to. Nil when the kernel does not say (not
    /// attached, or an old kernel): the caller falls back to sysfs, then to the path.
    private static func loopIdentity(fd: Int32, minor: UInt64) -> DeviceIdentity? {
        var device: UInt64 = 0
        var inode: UInt64 = 0
        var offset: UInt64 = 0
        var limit: UInt64 = 0
        guard clinuxio_loop_status(fd, &device, &inode, &offset, &limit) == 0 else { return nil }
        let attribute = "\(sysfs)/dev/block/\(loopMajor):\(minor)/loop/backing_file"
        // The full path is in sysfs; LOOP_GET_STATUS64's name is cut at 64 bytes.
        let backing = readAttribute(attribute) ?? "?"
        var value = "loop:\(backing),fs=\(fileSystemIdentity(device)),ino=\(inode)"
        if offset != 0 { value += ",offset=\(offset)" }
        if limit != 0 { value += ",sizelimit=\(limit)" }
        return DeviceIdentity(value: value, source: attribute + " and LOOP_GET_STATUS64")
    }

    /// Names the file system on device `device` (a dev_t): its block device's identity when
    /// sysfs has one, else `dev-MAJ:MIN`.
    static func fileSystemIdentity(_ device: UInt64) -> String {
        let (major, minor) = split(device)
        // Not followed through loop devices: a file system on a loop device is named by
        // its device number, which keeps this from recursing.
        if major != loopMajor, let identity = blockIdentity(major: major, minor: minor) {
            return identity.value
        }
        return "dev-\(major):\(minor)"
    }

    // MARK: - Files

    /// A sysfs attribute's text, trimmed; nil when missing or empty.
    static func readAttribute(_ path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 4096)
        let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard count > 0 else { return nil }
        let text = String(decoding: buffer[0..<count], as: UTF8.self)
        let trimmed = text.unicodeScalars.drop { isBlank($0) }.reversed().drop { isBlank($0) }.reversed()
        let result = String(String.UnicodeScalarView(trimmed))
        return result.isEmpty ? nil : result
    }

    private static func isBlank(_ scalar: Unicode.Scalar) -> Bool {
        scalar == " " || scalar == "\n" || scalar == "\t" || scalar == "\r" || scalar == "\0"
    }

    private static func realPath(_ path: String) -> String? {
        guard let resolved = realpath(path, nil) else { return nil }
        defer { free(resolved) }
        return String(cString: resolved)
    }
}
