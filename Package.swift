// swift-tools-version:6.2
import PackageDescription

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

let strictSettings: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny"),
    .enableUpcomingFeature("MemberImportVisibility"),
    // Release builds skip run-time exclusivity checks on the data path (debug builds and
    // so the tests keep them). Measured in a 3-round fio A/B: +3% 4 KiB writes, +7% 1 MiB
    // reads, random reads unchanged.
    .unsafeFlags(["-enforce-exclusivity=unchecked"], .when(configuration: .release)),
]

// Release binaries carry the Swift runtime inside them: a captive `tidemark serve` (nbdcopy's
// `[ CMD ]`, systemd socket activation) starts 3.7 ms sooner without loading and relocating
// the runtime's shared libraries (socket-activated start to NBD greeting, median of 30).
let releaseStaticStdlib: [LinkerSetting] = [
    .unsafeFlags(["-static-stdlib"], .when(platforms: [.linux], configuration: .release)),
    .linkedLibrary("_FoundationCollections", .when(platforms: [.linux], configuration: .release)),
    .linkedLibrary("_FoundationCShims", .when(platforms: [.linux], configuration: .release)),
]

let package = Package(
    name: "Tidemark",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "tidemark", targets: ["tidemark"]),
        .executable(name: "tidemark-backup", targets: ["tidemark-backup"]),
        .library(name: "NBDProtocol", targets: ["NBDProtocol"]),
        .library(name: "BlockStorage", targets: ["BlockStorage"]),
        .library(name: "DirtyTracking", targets: ["DirtyTracking"]),
        .library(name: "TidemarkServer", targets: ["TidemarkServer"]),
        .library(name: "NBDClient", targets: ["NBDClient"]),
        .library(name: "BackupChain", targets: ["BackupChain"]),
        .library(name: "TidemarkBackup", targets: ["TidemarkBackup"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.0"),
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.0"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.0"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.0"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.5.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.0.0"),
    ],
    targets: [
        // Linux calls that Glibc's Swift module hides (fallocate, SEEK_DATA/HOLE, preadv2).
        .target(name: "CLinuxIO"),
        // Images: raw files and block devices. Knows nothing of NBD.
        .target(name: "BlockStorage", dependencies: ["CLinuxIO"], swiftSettings: strictSettings),
        // Named dirty bitmaps, their persistence journal and checkpoints. Knows nothing of NBD.
        .target(name: "DirtyTracking", dependencies: ["CLinuxIO"], swiftSettings: strictSettings),
        // Sans-IO NBD wire protocol: codecs and state machines.
        .target(
            name: "NBDProtocol",
            dependencies: [.product(name: "NIOCore", package: "swift-nio")],
            swiftSettings: strictSettings
        ),
        // TLS credentials for the server: the qemu/nbdkit certificate directory, psktool key
        // files, client allow-lists, and the context that new connections take (swapped on
        // reload). Knows nothing of NBD beyond the policy it is configured with.
        .target(
            name: "TidemarkTLS",
            dependencies: [
                "NBDProtocol",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strictSettings
        ),
        // NIO pipeline, exports and request execution.
        .target(
            name: "TidemarkServer",
            dependencies: [
                "NBDProtocol", "BlockStorage", "BackupChain", "DirtyTracking", "TidemarkTLS", "CLinuxIO",
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOTLS", package: "swift-nio"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
            ],
            swiftSettings: strictSettings
        ),
        // `serve --metrics`: swift-metrics bootstrapped onto a Prometheus registry, served
        // at GET /metrics by a small HTTP/1 listener on its own thread.
        .target(
            name: "TidemarkMetrics",
            dependencies: [
                "TidemarkServer",
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
            ],
            swiftSettings: strictSettings
        ),
        // QMP's wire format, shared by the server's control plane, the backup client and the
        // tests: JSON values and a strict parser, message framing, errors, a blocking client.
        // No NIO, so the backup client does not link the server's stack.
        .target(name: "QMPWire", dependencies: ["CLinuxIO"], swiftSettings: strictSettings),
        // QMP-compatible management socket: bitmap commands, transactions, checkpoints.
        .target(
            name: "TidemarkControl",
            dependencies: [
                "QMPWire", "TidemarkServer", "DirtyTracking", "BlockStorage", "CLinuxIO",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strictSettings
        ),
        // Running under a service manager: log lines for machines (text or JSON) and the
        // sd_notify protocol (readiness, watchdog, status). Knows nothing of NBD.
        .target(
            name: "TidemarkService",
            dependencies: [.product(name: "Logging", package: "swift-log")],
            swiftSettings: strictSettings
        ),
        // libnbd, the C client library behind nbdinfo, nbdcopy and fio's nbd engine.
        .systemLibrary(name: "CLibNBD", pkgConfig: "libnbd", providers: [.apt(["libnbd-dev"])]),
        .target(name: "NBDClient", dependencies: ["CLibNBD"], swiftSettings: strictSettings),
        // Backup directories and qcow2 chains read from disk: manifests, the chain reader of
        // restore and verify, and the chain image the server serves (with its writable
        // overlay). Below both the server and the backup client, so `tidemark` reads chains
        // without linking libnbd.
        .target(name: "BackupChain", dependencies: ["BlockStorage", "CLinuxIO"], swiftSettings: strictSettings),
        // Full and incremental backups into qcow2 chains, restore and verify (over NBDClient).
        .target(
            name: "TidemarkBackup", dependencies: ["BackupChain", "NBDClient", "CLinuxIO"], swiftSettings: strictSettings),
        .executableTarget(
            name: "tidemark",
            dependencies: [
                "TidemarkServer", "TidemarkControl", "QMPWire", "TidemarkService", "TidemarkMetrics", "BlockStorage",
                "DirtyTracking", "CLinuxIO", "TidemarkTLS",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ],
            swiftSettings: strictSettings,
            linkerSettings: releaseStaticStdlib
        ),
        // The backup client (`tidemark backup|restore|verify` run it): the one executable
        // that links libnbd, so the server does not load it.
        .executableTarget(
            name: "tidemark-backup",
            dependencies: [
                "TidemarkBackup", "NBDClient", "QMPWire", "CLinuxIO",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: strictSettings,
            linkerSettings: releaseStaticStdlib
        ),
        // Helpers every test target shares (seeded randomness).
        .target(name: "TestSupport", path: "Tests/TestSupport", swiftSettings: strictSettings),
        .testTarget(
            name: "NBDProtocolTests",
            dependencies: ["TestSupport", "NBDProtocol", .product(name: "NIOCore", package: "swift-nio")],
            swiftSettings: strictSettings
        ),
        // The real connection handler pumped in memory (NIOAsyncTestingChannel): framing
        // across reads, back-pressure, quiesce, the handshake deadline; no sockets, no sleeps.
        .testTarget(
            name: "TidemarkServerTests",
            dependencies: [
                "TidemarkServer", "NBDProtocol", "BlockStorage",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strictSettings
        ),
        .testTarget(
            name: "TidemarkTLSTests",
            dependencies: [
                "TidemarkTLS", "NBDProtocol",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOTLS", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ],
            swiftSettings: strictSettings
        ),
        .testTarget(
            name: "BlockStorageTests",
            dependencies: ["BlockStorage"],
            swiftSettings: strictSettings
        ),
        .testTarget(
            name: "TidemarkControlTests",
            dependencies: ["TidemarkControl", "QMPWire"],
            swiftSettings: strictSettings
        ),
        .testTarget(
            name: "TidemarkServiceTests",
            dependencies: ["TestSupport", "TidemarkService", .product(name: "Logging", package: "swift-log")],
            swiftSettings: strictSettings
        ),
        .testTarget(
            name: "DirtyTrackingTests",
            dependencies: ["TestSupport", "DirtyTracking"],
            swiftSettings: strictSettings
        ),
        .testTarget(
            name: "BackupTests",
            dependencies: ["TestSupport", "TidemarkBackup", "BackupChain", "BlockStorage"],
            swiftSettings: strictSettings
        ),
        .testTarget(
            name: "TidemarkMetricsTests",
            dependencies: [
                "TidemarkMetrics", "TidemarkServer", "NBDProtocol", "BlockStorage", "DirtyTracking",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ],
            swiftSettings: strictSettings
        ),
        .testTarget(
            name: "IntegrationTests",
            dependencies: ["TestSupport", "NBDClient", "TidemarkBackup", "QMPWire"],
            swiftSettings: strictSettings
        ),
    ]
)

// libFuzzer harnesses (Fuzz/), one per parser of untrusted bytes. They exist only when
// `scripts/fuzz` sets TIDEMARK_FUZZ=1 and builds them, sanitized, into .build/fuzz, so the
// normal `swift build` and `swift test` neither see nor compile them.
if ProcessInfo.processInfo.environment["TIDEMARK_FUZZ"] == "1" {
    let harnesses: [(name: String, dependencies: [Target.Dependency])] = [
        ("FuzzHandshake", ["NBDProtocol", .product(name: "NIOCore", package: "swift-nio")]),
        ("FuzzRequests", ["NBDProtocol", .product(name: "NIOCore", package: "swift-nio")]),
        ("FuzzQMP", ["QMPWire"]),
        ("FuzzQcow2", ["TidemarkBackup"]),
        ("FuzzStore", ["DirtyTracking"]),
    ]
    package.targets.append(.target(name: "FuzzSupport", path: "Fuzz/FuzzSupport", swiftSettings: [.swiftLanguageMode(.v5)]))
    for harness in harnesses {
        package.targets.append(.executableTarget(
            name: harness.name, dependencies: ["FuzzSupport"] + harness.dependencies,
            path: "Fuzz/\(harness.name)", swiftSettings: [.swiftLanguageMode(.v5)]))
        package.products.append(.executable(name: harness.name, targets: [harness.name]))
    }
}
