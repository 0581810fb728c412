// swift-tools-version:6.0
import PackageDescription

// Arrows point down the stack: the core (MVCC) imports no C and no protobuf; only the
// wrapper modules (EventLoop, HTTP2, LMDBBackend) touch C.
let package = Package(
    name: "vigil",
    platforms: [.macOS(.v13)],
    products: [
        .executable(name: "vigil", targets: ["vigil"]),
        .library(name: "VigilServer", targets: ["VigilServer"]),
        // An etcd v3 client for Swift programs (async/await), for etcd and Vigil alike.
        .library(name: "VigilClient", targets: ["VigilClient"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-protobuf.git", from: "1.28.0"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.6.0"),
        // etcd's --config-file is YAML; Yams (libyaml) parses it.
        .package(url: "https://github.com/jpsim/Yams.git", from: "5.0.1"),
        // Swift servers' lifecycle: VigilServer is a `Service`, and `vigil` runs in a `ServiceGroup`
        // (graceful shutdown on SIGTERM/SIGINT).
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.6.0"),
        // The metrics facade of Swift servers: an embedding program's backend gets Vigil's metrics.
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.4.0"),
        // vigil-bench's latency percentiles: HDR histograms (bounded memory, exact to 3 digits).
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift.git", from: "0.1.0"),
        // DocC for the two library products (scripts/docs.sh); a plugin, built only when used.
        .package(url: "https://github.com/swiftlang/swift-docc-plugin.git", from: "1.4.0"),
    ],
    targets: [
        // System libraries: a modulemap and a one-line header each, no code.
        .systemLibrary(name: "CLibUV", pkgConfig: "libuv", providers: [.apt(["libuv1-dev"])]),
        .systemLibrary(name: "CNghttp2", pkgConfig: "libnghttp2", providers: [.apt(["libnghttp2-dev"])]),
        .systemLibrary(name: "CLMDB", pkgConfig: "lmdb", providers: [.apt(["liblmdb-dev"])]),
        .systemLibrary(name: "CHTTPParser", providers: [.apt(["libhttp-parser-dev"])]),
        .systemLibrary(name: "CCrypt", providers: [.apt(["libcrypt-dev"])]),
        .systemLibrary(name: "COpenSSL", pkgConfig: "openssl", providers: [.apt(["libssl-dev"])]),
        .systemLibrary(name: "CMalloc"),

        // Thin Swift over C.
        .target(name: "EventLoop", dependencies: ["CLibUV"]),
        .target(name: "HTTPCore"),
        .target(name: "HTTP2", dependencies: ["CNghttp2", "HTTPCore"]),
        .target(name: "HTTP1", dependencies: ["CHTTPParser", "HTTPCore"]),
        .target(name: "LMDBBackend", dependencies: ["CLMDB", "MVCC", "VigilCore"]),
        .target(name: "Passwords", dependencies: ["CCrypt"]),
        // TLS on the loop (memory BIOs) and JWT signatures, with OpenSSL.
        .target(name: "TLS", dependencies: ["COpenSSL", "EventLoop", "VigilCore"]),

        // Deterministic core: no C, no protobuf, no clock of its own.
        .target(name: "VigilCore"),
        .target(name: "IntervalTree"),
        .target(name: "MVCC"),
        .target(name: "WatchHub", dependencies: ["MVCC", "IntervalTree", "VigilCore"]),
        .target(name: "Lease", dependencies: ["VigilCore"]),
        .target(name: "Auth", dependencies: ["VigilCore"]),
        // bbolt's file format (etcd's snapshots), in Swift.
        .target(name: "Bolt"),

        // Protocol layers.
        .target(
            name: "GRPC",
            dependencies: ["HTTP2", "VigilCore", .product(name: "SwiftProtobuf", package: "swift-protobuf")]),
        .target(name: "EtcdProto", dependencies: [.product(name: "SwiftProtobuf", package: "swift-protobuf")]),
        .target(
            name: "EtcdAPI",
            dependencies: [
                "EtcdProto", "MVCC", "GRPC", "WatchHub", "Lease", "Auth", "VigilCore", "Bolt", "COpenSSL",
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            ]),
        .target(
            name: "Gateway",
            dependencies: [
                "EtcdAPI", "EtcdProto", "HTTPCore", "MVCC", "WatchHub", "VigilCore",
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            ]),

        // Mirror mode: a copy of an etcd cluster's key space, followed by watch (VigilClient is
        // its upstream connection).
        .target(
            name: "Mirror",
            dependencies: [
                "EtcdAPI", "EtcdProto", "EventLoop", "GRPC", "HTTP2", "MVCC", "TLS", "VigilClient", "VigilCore",
                "WatchHub", .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            ]),

        // Wiring and the executable.
        .target(
            name: "VigilServer",
            dependencies: [
                "EtcdAPI", "EtcdProto", "Gateway", "Auth", "Passwords", "WatchHub", "EventLoop", "HTTPCore", "HTTP1",
                "HTTP2", "TLS", "CMalloc", "Bolt", "Mirror", "COpenSSL",
                "GRPC", "LMDBBackend", "MVCC", "VigilCore", .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
            ]),
        .executableTarget(
            name: "vigil",
            dependencies: [
                "VigilServer", "VigilCore", "EventLoop", "CMalloc",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Yams", package: "Yams"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]),
        .target(
            name: "VigilClient",
            dependencies: [
                "EventLoop", "HTTP2", "GRPC", "EtcdProto", "TLS", "VigilCore",
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            ]),
        .target(
            name: "VigilTesting",
            dependencies: [
                "VigilClient", "EventLoop", "GRPC", "HTTP2", "VigilCore", "EtcdAPI", "EtcdProto", "Auth", "MVCC",
                "WatchHub", "TLS",
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            ]),

        // The robustness suite (etcd's tests/robustness, for Vigil): seeded traffic over real
        // connections, faults (kill, pause, failpoints), validators of every guarantee.
        .target(
            name: "Robustness",
            dependencies: [
                "VigilClient", "VigilTesting", "EventLoop", "GRPC", "HTTP2", "EtcdProto", "VigilCore",
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            ]),
        .executableTarget(
            name: "vigil-robustness",
            dependencies: ["Robustness", .product(name: "ArgumentParser", package: "swift-argument-parser")]),

        // The load generator (Benchmarks/, not part of the tests).
        .executableTarget(
            name: "vigil-bench",
            dependencies: [
                "VigilClient", "VigilServer", "EventLoop", "GRPC", "EtcdProto", "VigilCore", "TLS",
                .product(name: "Histogram", package: "hdrhistogram-swift"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ], path: "Benchmarks/vigil-bench"),

        // Micro-benchmarks of the hot paths with allocation counts (the C target counts them).
        .target(name: "CAllocCount", path: "Benchmarks/CAllocCount"),
        .executableTarget(
            name: "vigil-micro",
            dependencies: ["CAllocCount", "EtcdAPI", "WatchHub", "IntervalTree", "MVCC", "LMDBBackend"],
            path: "Benchmarks/micro"),

        // Fuzzing (scripts/fuzz.sh): the harness, and its libFuzzer entry point / corpus replayer.
        .target(
            name: "FuzzHarness",
            dependencies: [
                "VigilServer", "VigilTesting", "GRPC", "COpenSSL", .product(name: "Logging", package: "swift-log"),
            ]),
        .executableTarget(name: "vigil-fuzz", dependencies: ["FuzzHarness"], path: "Fuzz"),

        // Examples (each runnable, with a README).
        .executableTarget(
            name: "EmbeddedExample", dependencies: ["VigilServer"], path: "Examples/embedded", exclude: ["README.md"]),
        .executableTarget(
            name: "SidecarExample", dependencies: ["VigilServer"], path: "Examples/sidecar", exclude: ["README.md"]),
        .executableTarget(
            name: "ConfigPushExample",
            dependencies: [
                "VigilServer", "VigilClient", "EventLoop", "GRPC", "EtcdProto", "VigilCore",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ], path: "Examples/config-push", exclude: ["README.md"]),

        .testTarget(name: "MVCCTests", dependencies: ["MVCC"]),
        .testTarget(name: "BoltTests", dependencies: ["Bolt"]),
        .testTarget(name: "WatchHubTests", dependencies: ["WatchHub", "IntervalTree", "MVCC"]),
        .testTarget(name: "GRPCTests", dependencies: ["GRPC"]),
        .testTarget(name: "EventLoopTests", dependencies: ["EventLoop"]),
        .testTarget(name: "HTTP1Tests", dependencies: ["HTTP1", "HTTPCore"]),
        .testTarget(name: "HTTP2Tests", dependencies: ["HTTP2", "HTTPCore", "GRPC"]),
        .testTarget(name: "LMDBBackendTests", dependencies: ["LMDBBackend", "MVCC"]),
        .testTarget(
            name: "GatewayMappingTests",
            dependencies: [
                "Gateway", "EtcdAPI", "EtcdProto", "HTTPCore", "MVCC", "VigilCore", "VigilTesting", "WatchHub",
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            ]),
        .testTarget(name: "LeaseTests", dependencies: ["Lease", "VigilCore", "VigilTesting"]),
        .testTarget(name: "RobustnessTests", dependencies: ["Robustness", "VigilTesting"]),
        .testTarget(
            name: "EtcdAPITests",
            dependencies: [
                "EtcdAPI", "EtcdProto", "MVCC", "VigilCore", "VigilTesting",
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            ]),
        .testTarget(name: "AuthStoreTests", dependencies: ["Auth", "VigilCore", "VigilTesting"]),
        .testTarget(
            name: "VigilIntegrationTests",
            dependencies: [
                "VigilTesting", "VigilClient",
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "MetricsTestKit", package: "swift-metrics"), "EtcdProto", "GRPC", "MVCC", "FuzzHarness",
                "VigilServer", "Bolt",
                .product(name: "Logging", package: "swift-log"), "VigilCore",
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            ]),
    ],
    swiftLanguageModes: [.v6]
)

// Every Swift target: `any` spelled out for existentials (ExistentialAny).
for target in package.targets where target.type != .system {
    target.swiftSettings = (target.swiftSettings ?? []) + [.enableUpcomingFeature("ExistentialAny")]
}
