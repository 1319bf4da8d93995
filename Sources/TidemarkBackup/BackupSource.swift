import NBDClient

/// Opens the NBD connections a backup reads from, and turns "the server lacks the
/// context" into an error the user can act on.
///
/// The first connection negotiates in option mode so that, before choosing the export, it
/// can list the `qemu:dirty-bitmap:` contexts the server has; if the wanted bitmap is not
/// selected, the error then says whether the server has no bitmaps at all or which ones it
/// has. Extra connections (for `--connections`) need no metadata contexts.
public enum BackupSource {
    static let bitmapContextPrefix = "qemu:dirty-bitmap:"

    /// The context name of a bitmap (or checkpoint increment).
    public static func bitmapContext(_ bitmap: String) -> String {
        bitmapContextPrefix + bitmap
    }

    /// The primary connection: `base:allocation` and, when `bitmap` is given, its dirty
    /// bitmap context, both selected. Returns the connection and whether the server
    /// offers `base:allocation`.
    static func openPrimary(uri: String, bitmap: String?, tls: NBDClientTLS?) throws(BackupError) -> (NBDConnection, hasAllocation: Bool) {
        var contexts = [NBDAllocationFlags.contextName]
        if let bitmap { contexts.append(bitmapContext(bitmap)) }
        let connection: NBDConnection
        var available: [String] = []
        do {
            // The puller reads only buffers of successful reads: no need to zero them first.
            connection = try NBDConnection(
                NBDConnectionConfiguration(metaContexts: contexts, optMode: true, initializeReadBuffers: false, tls: tls))
            try connection.connect(uri: uri)
            if bitmap != nil {
                // Only for the error message: a server may not support listing.
                available = (try? connection.optListMetaContexts([bitmapContextPrefix])) ?? []
            }
            try connection.optGo()
        } catch {
            throw BackupError.connectionFailed(uri: uri, detail: error.description)
        }
        let hasAllocation = (try? connection.canMetaContext(NBDAllocationFlags.contextName)) ?? false
        if let bitmap {
            let selected = (try? connection.canMetaContext(bitmapContext(bitmap))) ?? false
            if !selected {
                try? connection.shutdown()
                let names = available.filter { $0.hasPrefix(bitmapContextPrefix) }
                    .map { String($0.dropFirst(bitmapContextPrefix.count)) }
                if names.isEmpty { throw BackupError.serverLacksDirtyBitmaps(uri: uri) }
                throw BackupError.bitmapNotFound(name: bitmap, available: names)
            }
        }
        return (connection, hasAllocation)
    }

    /// A plain connection for extra parallel reads.
    static func openSecondary(uri: String, tls: NBDClientTLS?) throws(BackupError) -> NBDConnection {
        do {
            let connection = try NBDConnection(NBDConnectionConfiguration(initializeReadBuffers: false, tls: tls))
            try connection.connect(uri: uri)
            return connection
        } catch {
            throw BackupError.connectionFailed(uri: uri, detail: error.description)
        }
    }

    /// The read size: the server's maximum block size capped at 4 MiB (32 MiB, the
    /// protocol's default maximum, when it advertised none), at least one cluster, a whole
    /// number of clusters.
    static func requestSize(for connection: NBDConnection) -> UInt64 {
        let cap: UInt64 = 4 << 20
        let advertised = (try? connection.blockSizes)?.maximum ?? 0
        let maximum = advertised == 0 ? UInt64(32 << 20) : UInt64(advertised)
        let size = min(cap, maximum) / Qcow2Format.clusterSize * Qcow2Format.clusterSize
        return max(Qcow2Format.clusterSize, size)
    }
}
