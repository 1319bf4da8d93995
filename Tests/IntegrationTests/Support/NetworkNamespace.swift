import Foundation

/// A network namespace joined to this one by a veth pair, made and removed by the test:
/// a second "host" for traffic that must cross a real (virtual) link. Addresses are
/// link-local and live only on this pair.
final class NetworkNamespace: @unchecked Sendable {
    let name: String
    let hostInterface: String
    /// The address inside the namespace (the "remote host").
    let address: String
    /// The address on this side.
    let hostAddress: String

    init() throws {
        let tag = String(UInt32.random(in: 0..<0xFFFF_FF), radix: 16)
        name = "tm-\(tag)"
        hostInterface = "tmh\(tag)"
        let peer = "tmp\(tag)"
        let subnet = Int.random(in: 1...250)
        address = "169.254.\(subnet).2"
        hostAddress = "169.254.\(subnet).1"
        try Self.ip(["netns", "add", name])
        do {
            try Self.ip(["link", "add", hostInterface, "type", "veth", "peer", "name", peer])
            try Self.ip(["link", "set", peer, "netns", name])
            try Self.ip(["addr", "add", "\(hostAddress)/30", "dev", hostInterface])
            try Self.ip(["link", "set", hostInterface, "up"])
            try Self.ip(["netns", "exec", name, "ip", "addr", "add", "\(address)/30", "dev", peer])
            try Self.ip(["netns", "exec", name, "ip", "link", "set", peer, "up"])
            try Self.ip(["netns", "exec", name, "ip", "link", "set", "lo", "up"])
        } catch {
            remove()
            throw error
        }
    }

    /// Runs a program inside the namespace (as a launcher prefix: `ip netns exec NAME`).
    var launcher: [String] { ["/usr/sbin/ip", "netns", "exec", name] }

    func remove() {
        _ = try? ExternalTool.run("/usr/sbin/ip", ["link", "del", hostInterface])
        _ = try? ExternalTool.run("/usr/sbin/ip", ["netns", "del", name])
    }

    deinit { remove() }

    private static func ip(_ arguments: [String]) throws {
        try ExternalTool.check("/usr/sbin/ip", arguments)
    }
}
