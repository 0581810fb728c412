import ArgumentParser
import EventLoop
import Foundation
import Logging
import ServiceLifecycle
import VigilServer

#if os(Linux)
import CMalloc
#endif

/// `vigil`: flags named as etcd's, for a single member. Every flag can also come from the matching
/// `ETCD_*` environment variable (e.g. `ETCD_DATA_DIR`), as with etcd; a flag given on the command
/// line wins.
struct VigilCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vigil",
        abstract: "An etcd v3-compatible key-value server with an event-streaming watch hub.")

    @Option(name: .customLong("name"), help: "Human-readable name for this member.")
    var name: String?
    @Option(name: .customLong("data-dir"), help: "Path to the data directory (default: default.vigil).")
    var dataDir: String?
    @Option(name: .customLong("listen-client-urls"), help: "Comma-separated URLs to listen on for client traffic.")
    var listenClientURLs: String?
    @Option(name: .customLong("advertise-client-urls"), help: "Comma-separated client URLs to advertise.")
    var advertiseClientURLs: String?
    @Option(name: .customLong("listen-peer-urls"), help: "Accepted for compatibility (single member: no peer traffic).")
    var listenPeerURLs: String?
    @Option(name: .customLong("initial-advertise-peer-urls"), help: "This member's peer URLs (used for its ID).")
    var initialAdvertisePeerURLs: String?
    @Option(name: .customLong("initial-cluster"), help: "Initial cluster configuration; must name only this member.")
    var initialCluster: String?
    @Option(name: .customLong("initial-cluster-token"), help: "Initial cluster token (used for the IDs).")
    var initialClusterToken: String?
    @Option(name: .customLong("initial-cluster-state"), help: "new or existing (accepted for compatibility).")
    var initialClusterState: String?
    @Option(name: .customLong("max-request-bytes"), help: "Maximum client request size in bytes (default 1572864).")
    var maxRequestBytes: Int?
    @Option(name: .customLong("max-txn-ops"), help: "Maximum number of operations per txn (default 128).")
    var maxTxnOps: Int?
    @Option(
        name: .customLong("max-concurrent-streams"),
        help: "Maximum concurrent HTTP/2 streams per client connection (default: no limit, as etcd).")
    var maxConcurrentStreams: UInt32?
    @Option(name: .customLong("quota-backend-bytes"), help: "Backend size quota; 0 = default 2 GiB.")
    var quotaBackendBytes: Int64?
    @Option(name: .customLong("log-level"), help: "debug, info, warn, error, panic or fatal.")
    var logLevel: String?
    @Option(
        name: .customLong("experimental-watch-progress-notify-interval"),
        help: "Interval of periodic watch progress notifications, e.g. 10m, 5s, 100ms (default 10m).")
    var watchProgressNotifyInterval: String?
    @Option(
        name: .customLong("sse-keepalive-interval"),
        help: "How often an idle Server-Sent Events watch stream gets a keep-alive comment (default 15s).")
    var sseKeepAliveInterval: String?
    @Option(name: .customLong("watch-ring-max-events"), help: "Events the watch event ring keeps (default 200000).")
    var watchRingMaxEvents: Int?
    @Option(name: .customLong("watch-ring-max-bytes"), help: "Bytes the watch event ring keeps (default 64 MiB).")
    var watchRingMaxBytes: Int?
    @Option(
        name: .customLong("watch-stream-queue-bytes"),
        help: "Unsent bytes after which a watch stream counts as slow and its watchers are parked (default 1 MiB).")
    var watchStreamQueueBytes: Int?
    @Option(
        name: .customLong("http-read-timeout"),
        help: "Seconds an HTTP/1.1 request may take to arrive in full before it is answered 408 (default 10).")
    var httpReadTimeout: Double?
    @Option(
        name: .customLong("auto-compaction-mode"),
        help: "periodic or revision (default periodic when a retention is set).")
    var autoCompactionMode: String?
    @Option(
        name: .customLong("auto-compaction-retention"),
        help:
            "periodic: history to keep (\"1h\", \"30m\"; a bare number is hours); revision: revisions to keep. 0 = off."
    )
    var autoCompactionRetention: String?
    @Option(
        name: .customLong("auto-compaction-check-interval"),
        help: "How often revision-mode auto-compaction checks (default 5m, as etcd).")
    var autoCompactionCheckInterval: String?
    @Option(
        name: .customLong("restore-snapshot"),
        help: "A file from `etcdctl snapshot save` to start from when --data-dir holds no data yet.")
    var restoreSnapshot: String?
    @Option(
        name: .customLong("auth-token"),
        help: "simple (the default) or jwt,pub-key=FILE,priv-key=FILE,sign-method=RS256|…|ES512,ttl=5m.")
    var authToken: String?
    @Option(name: .customLong("auth-token-ttl"), help: "Seconds a simple token lives after its last use (default 300).")
    var authTokenTTL: Int?
    @Option(name: .customLong("bcrypt-cost"), help: "bcrypt cost for password hashes, 4 to 31 (default 10).")
    var bcryptCost: Int?
    @Flag(name: .customLong("unsafe-no-fsync"), help: "Disables fsync: unsafe, for tests only.")
    var unsafeNoFsync = false
    @Option(
        name: .customLong("config-file"),
        help: "Path to etcd's YAML configuration file; other flags and ETCD_* variables are then ignored, as etcd does."
    )
    var configFile: String?
    @Option(name: .customLong("logger"), help: "capnslog (text lines, the default) or zap (etcd's JSON lines).")
    var logger: String?
    @Option(
        name: .customLong("log-outputs"),
        help: "Where logs go: default, stderr, stdout, or file paths (comma-separated).")
    var logOutputs: String?
    @Option(
        name: .customLong("listen-metrics-urls"),
        help: "Comma-separated URLs to serve /metrics and /health (and /livez, /readyz) on, beside the client URLs.")
    var listenMetricsURLs: String?
    @Option(
        name: .customLong("cors"),
        help: "Comma-separated origins allowed for CORS (cross-origin resource sharing); default *, every origin.")
    var cors: String?
    @Flag(name: .customLong("version"), help: "Print the version and exit.")
    var version = false

    // TLS, as etcd's flags.
    @Option(name: .customLong("cert-file"), help: "Path to the client server TLS cert file.")
    var certFile: String?
    @Option(name: .customLong("key-file"), help: "Path to the client server TLS key file.")
    var keyFile: String?
    @Option(name: .customLong("trusted-ca-file"), help: "Path to the client server TLS trusted CA cert file.")
    var trustedCAFile: String?
    @Flag(name: .customLong("client-cert-auth"), help: "Enable client cert authentication (the CN is the user).")
    var clientCertAuth = false
    @Option(name: .customLong("client-crl-file"), help: "Path to the client certificate revocation list file.")
    var clientCRLFile: String?
    @Flag(name: .customLong("auto-tls"), help: "Client TLS using a generated certificate.")
    var autoTLS = false
    @Option(
        name: .customLong("cipher-suites"), help: "Comma-separated list of supported TLS cipher suites (Go's names).")
    var cipherSuites: String?
    @Option(name: .customLong("peer-cert-file"), help: "Path to the peer server TLS cert file (checked only).")
    var peerCertFile: String?
    @Option(name: .customLong("peer-key-file"), help: "Path to the peer server TLS key file (checked only).")
    var peerKeyFile: String?
    @Option(
        name: .customLong("peer-trusted-ca-file"), help: "Path to the peer server TLS trusted CA file (checked only).")
    var peerTrustedCAFile: String?
    @Flag(name: .customLong("peer-client-cert-auth"), help: "Enable peer client cert authentication (checked only).")
    var peerClientCertAuth = false
    @Flag(name: .customLong("peer-auto-tls"), help: "Peer TLS using generated certificates (accepted).")
    var peerAutoTLS = false
    @Option(
        name: .customLong("peer-crl-file"), help: "Path to the peer certificate revocation list file (checked only).")
    var peerCRLFile: String?
    @Option(name: .customLong("tls-handshake-timeout"), help: "Seconds a TLS handshake may take (default 10).")
    var tlsHandshakeTimeout: Double?

    /// A setting: the flag, else its `ETCD_*` variable; with `--config-file`, the file's key alone
    /// (etcd ignores flags and variables then).
    private func value(_ flag: String?, _ env: String) -> String? {
        if let file = settingsFile { return file[ConfigFile.key(forEnvironment: env)] }
        return flag ?? ProcessInfo.processInfo.environment[env]
    }

    /// A numeric setting, checked for type wherever it came from.
    private func number<T: LosslessStringConvertible>(_ flag: T?, _ env: String, as: T.Type) throws -> T? {
        let raw: String?
        if settingsFile != nil || flag == nil { raw = value(nil, env) } else { return flag }
        guard let raw else { return nil }
        guard let v = T(raw) else {
            throw ValidationError("invalid value \"\(raw)\" for --\(ConfigFile.key(forEnvironment: env))")
        }
        return v
    }

    /// A boolean flag, or its `ETCD_*` variable ("true"/"false", as Go parses them).
    private func boolean(_ flag: Bool, _ env: String) throws -> Bool {
        if flag && settingsFile == nil { return true }
        guard let v = value(nil, env) else { return false }
        switch v.lowercased() {
        case "1", "t", "true": return true
        case "0", "f", "false", "": return false
        default: throw ValidationError("\(env)=\(v): expected true or false")
        }
    }

    private static func list(_ s: String) -> [String] {
        s.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
    }

    /// The settings of `--config-file`, flattened to flag names (read by `loadConfigFile`).
    var settingsFile: [String: String]? {
        get { FileSettings.shared.values }
        nonmutating set { FileSettings.shared.values = newValue }
    }

    /// Reads `--config-file` (or `ETCD_CONFIG_FILE`), if given.
    func loadConfigFile() throws {
        guard let path = configFile ?? ProcessInfo.processInfo.environment["ETCD_CONFIG_FILE"] else { return }
        settingsFile = try ConfigFile.load(path)
    }

    func makeConfiguration() throws -> Configuration {
        try loadConfigFile()
        var c = Configuration()
        if let v = value(name, "ETCD_NAME") { c.name = v }
        if let v = value(dataDir, "ETCD_DATA_DIR") { c.dataDir = v }
        if let v = value(listenClientURLs, "ETCD_LISTEN_CLIENT_URLS") { c.listenClientURLs = Self.list(v) }
        if let v = value(advertiseClientURLs, "ETCD_ADVERTISE_CLIENT_URLS") { c.advertiseClientURLs = Self.list(v) }
        if let v = value(initialAdvertisePeerURLs, "ETCD_INITIAL_ADVERTISE_PEER_URLS") {
            c.initialAdvertisePeerURLs = Self.list(v)
        }
        if let v = value(initialClusterToken, "ETCD_INITIAL_CLUSTER_TOKEN") { c.initialClusterToken = v }
        if let v = value(initialCluster, "ETCD_INITIAL_CLUSTER") {
            let members = Self.list(v)
            let names = Set(members.compactMap { $0.split(separator: "=", maxSplits: 1).first.map(String.init) })
            if names.count > 1 || (names.count == 1 && !names.contains(c.name)) {
                throw ValidationError(
                    "--initial-cluster must list only this member (\(c.name)): Vigil is a single-member server")
            }
        }
        if let v = try number(maxRequestBytes, "ETCD_MAX_REQUEST_BYTES", as: Int.self) {
            guard v > 0 else { throw ValidationError("--max-request-bytes must be positive") }
            c.limits.maxRequestBytes = v
        }
        if let v = try number(maxTxnOps, "ETCD_MAX_TXN_OPS", as: Int.self) {
            guard v > 0 else { throw ValidationError("--max-txn-ops must be positive") }
            c.limits.maxTxnOps = v
        }
        if let v = try number(maxConcurrentStreams, "ETCD_MAX_CONCURRENT_STREAMS", as: UInt32.self) {
            guard v > 0 else { throw ValidationError("--max-concurrent-streams must be positive") }
            c.maxConcurrentStreams = v
        }
        if let v = try number(quotaBackendBytes, "ETCD_QUOTA_BACKEND_BYTES", as: Int64.self) {
            c.quotaBackendBytes = v
        }
        if let v = value(watchProgressNotifyInterval, "ETCD_EXPERIMENTAL_WATCH_PROGRESS_NOTIFY_INTERVAL") {
            guard let ms = Self.durationMs(v), ms >= 100 else {
                throw ValidationError(
                    "--experimental-watch-progress-notify-interval must be a duration of at least 100ms")
            }
            c.watchProgressNotifyIntervalMs = ms
        }
        if let v = value(sseKeepAliveInterval, "ETCD_SSE_KEEPALIVE_INTERVAL") {
            guard let ms = Self.durationMs(v), ms >= 100 else {
                throw ValidationError("--sse-keepalive-interval must be a duration of at least 100ms")
            }
            c.sseKeepAliveIntervalMs = ms
        }
        if let v = try number(watchRingMaxEvents, "ETCD_WATCH_RING_MAX_EVENTS", as: Int.self) {
            guard v > 0 else { throw ValidationError("--watch-ring-max-events must be positive") }
            c.watch.ringMaxEvents = v
        }
        if let v = try number(watchRingMaxBytes, "ETCD_WATCH_RING_MAX_BYTES", as: Int.self) {
            guard v > 0 else { throw ValidationError("--watch-ring-max-bytes must be positive") }
            c.watch.ringMaxBytes = v
        }
        if let v = try number(watchStreamQueueBytes, "ETCD_WATCH_STREAM_QUEUE_BYTES", as: Int.self) {
            guard v > 0 else { throw ValidationError("--watch-stream-queue-bytes must be positive") }
            c.watch.streamQueueLimit = v
        }
        if let v = try number(httpReadTimeout, "ETCD_HTTP_READ_TIMEOUT", as: Double.self) {
            guard v > 0 else { throw ValidationError("--http-read-timeout must be positive") }
            c.httpReadTimeoutMs = UInt64(v * 1000)
        }
        c.restoreSnapshot = value(restoreSnapshot, "ETCD_RESTORE_SNAPSHOT")
        if let v = value(authToken, "ETCD_AUTH_TOKEN") { try c.setAuthToken(v) }
        c.clientTLS.certFile = value(certFile, "ETCD_CERT_FILE")
        c.clientTLS.keyFile = value(keyFile, "ETCD_KEY_FILE")
        c.clientTLS.trustedCAFile = value(trustedCAFile, "ETCD_TRUSTED_CA_FILE")
        c.clientTLS.clientCertAuth = try boolean(clientCertAuth, "ETCD_CLIENT_CERT_AUTH")
        c.clientTLS.crlFile = value(clientCRLFile, "ETCD_CLIENT_CRL_FILE")
        c.clientTLS.autoTLS = try boolean(autoTLS, "ETCD_AUTO_TLS")
        if (c.clientTLS.certFile == nil) != (c.clientTLS.keyFile == nil) {
            throw ValidationError("--cert-file and --key-file must be given together")
        }
        if let v = value(cipherSuites, "ETCD_CIPHER_SUITES") { c.cipherSuites = Self.list(v) }
        c.peerTLS.certFile = value(peerCertFile, "ETCD_PEER_CERT_FILE")
        c.peerTLS.keyFile = value(peerKeyFile, "ETCD_PEER_KEY_FILE")
        c.peerTLS.trustedCAFile = value(peerTrustedCAFile, "ETCD_PEER_TRUSTED_CA_FILE")
        c.peerTLS.clientCertAuth = try boolean(peerClientCertAuth, "ETCD_PEER_CLIENT_CERT_AUTH")
        c.peerTLS.crlFile = value(peerCRLFile, "ETCD_PEER_CRL_FILE")
        c.peerTLS.autoTLS = try boolean(peerAutoTLS, "ETCD_PEER_AUTO_TLS")
        if (c.peerTLS.certFile == nil) != (c.peerTLS.keyFile == nil) {
            throw ValidationError("--peer-cert-file and --peer-key-file must be given together")
        }
        if let v = try number(tlsHandshakeTimeout, "ETCD_TLS_HANDSHAKE_TIMEOUT", as: Double.self) {
            guard v > 0 else { throw ValidationError("--tls-handshake-timeout must be positive") }
            c.tlsHandshakeTimeoutMs = UInt64(v * 1000)
        }
        if let v = try number(authTokenTTL, "ETCD_AUTH_TOKEN_TTL", as: Int.self) {
            guard v > 0 else { throw ValidationError("--auth-token-ttl must be positive") }
            c.auth.tokenTTLSeconds = v
        }
        if let v = try number(bcryptCost, "ETCD_BCRYPT_COST", as: Int.self) {
            guard (4...31).contains(v) else { throw ValidationError("--bcrypt-cost must be between 4 and 31") }
            c.auth.bcryptCost = v
        }
        c.autoCompactionRetention = value(autoCompactionRetention, "ETCD_AUTO_COMPACTION_RETENTION") ?? "0"
        c.autoCompactionMode =
            value(autoCompactionMode, "ETCD_AUTO_COMPACTION_MODE")
            ?? (c.autoCompactionRetention == "0" ? "" : "periodic")
        if let v = value(autoCompactionCheckInterval, "ETCD_AUTO_COMPACTION_CHECK_INTERVAL") {
            guard let ms = Self.durationMs(v), ms > 0 else {
                throw ValidationError("invalid --auto-compaction-check-interval \(v)")
            }
            c.autoCompactionCheckMs = ms
        }
        c.unsafeNoFsync = try boolean(unsafeNoFsync, "ETCD_UNSAFE_NO_FSYNC")
        if let v = value(listenMetricsURLs, "ETCD_LISTEN_METRICS_URLS") { c.listenMetricsURLs = Self.list(v) }
        if let v = value(cors, "ETCD_CORS") { c.corsOrigins = Self.list(v) }
        _ = try c.listenAddresses()
        return c
    }

    static func durationMs(_ s: String) -> UInt64? { Configuration.durationMs(s) }

    func logLevelValue() throws -> Logger.Level { try parseLogLevel(value(logLevel, "ETCD_LOG_LEVEL") ?? "info") }

    func run() async throws {
        if version {
            print(VersionText.text)
            return
        }
        let config = try makeConfiguration()
        let level = try logLevelValue()
        let outputs = try LogOutputs.open(value(logOutputs, "ETCD_LOG_OUTPUTS").map(Self.list) ?? ["default"])
        switch value(logger, "ETCD_LOGGER") ?? "capnslog" {
        case "zap":
            LoggingSystem.bootstrap { label in
                var h = ZapJSONLogHandler(label: label, outputs: outputs)
                h.logLevel = level
                return h
            }
        case "capnslog":
            bootstrapTextLogs(level)
        case let other:
            throw ValidationError("unknown --logger \(other): capnslog or zap")
        }
        tuneMalloc()
        let logger = Logger(label: "vigil")
        logger.info("starting vigil", metadata: ["name": "\(config.name)", "data-dir": "\(config.dataDir)"])
        if let file = configFile ?? ProcessInfo.processInfo.environment["ETCD_CONFIG_FILE"] {
            logger.info(
                "Loading server configuration from \"\(file)\". Other configuration command line flags and environment variables will be ignored if provided."
            )
        }
        for (flag, value) in IgnoredFlags.seen {
            logger.notice(
                "flag ignored: a single-member Vigil has no Raft, WAL or profiler",
                metadata: ["flag": "--\(flag)", "value": "\(value)"])
        }
        try await serve(VigilServer(configuration: config, logger: logger), logger)
    }
}

/// Runs the server as swift-service-lifecycle runs services: in a `ServiceGroup` that shuts it
/// down gracefully on SIGTERM or SIGINT.
func serve(_ server: VigilServer, _ logger: Logger) async throws {
    let group = ServiceGroup(
        configuration: ServiceGroupConfiguration(
            services: [.init(service: server)], gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
    try await group.run()
}

/// Go's flag package takes `--flag=true` and `--flag=false` for booleans (kubeadm writes
/// `--client-cert-auth=true`); ArgumentParser's flags take no value, so those are rewritten.
func goBooleanFlags(_ args: [String]) -> [String] {
    let booleans: Set<String> = [
        "client-cert-auth", "auto-tls", "peer-client-cert-auth", "peer-auto-tls", "unsafe-no-fsync", "version",
    ]
    return args.compactMap { a in
        guard a.hasPrefix("-"), let eq = a.firstIndex(of: "=") else { return a }
        let name = String(a[..<eq].drop { $0 == "-" })
        guard booleans.contains(name) else { return a }
        switch a[a.index(after: eq)...].lowercased() {
        case "true", "1", "t": return "--" + name
        case "false", "0", "f": return nil
        default: return a
        }
    }
}

/// Parses `args` for `command` and runs it, as ArgumentParser's `main` does, then exits.
func runCommand<C: AsyncParsableCommand>(_ command: C.Type, _ args: [String]) async -> Never {
    do {
        var parsed = try C.parseAsRoot(args)
        if var asyncCommand = parsed as? any AsyncParsableCommand {
            try await asyncCommand.run()
        } else {
            try parsed.run()
        }
        exit(0)
    } catch {
        C.exit(withError: error)
    }
}

EventLoop.preferShortTurns()
do {
    let given = Array(CommandLine.arguments.dropFirst())
    if given.first == "grpc-proxy" {
        guard given.count > 1, given[1] == "start" else {
            FileHandle.standardError.write(Data("Usage: vigil grpc-proxy start [flags] (see --help)\n".utf8))
            exit(64)
        }
        await runCommand(GRPCProxyStart.self, Array(given.dropFirst(2)))
    }
    let args = try IgnoredFlags.extract(goBooleanFlags(given))
    await runCommand(VigilCommand.self, args)
} catch {
    FileHandle.standardError.write(Data("Error: \(error)\n".utf8))
    exit(64)
}
