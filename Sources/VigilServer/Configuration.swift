import Auth
import EtcdAPI
import TLS
import WatchHub

/// etcd's TLS flags for one side (clients: `--cert-file`, …; peers: `--peer-cert-file`, …).
public struct TLSFiles: Sendable {
    public var certFile: String?
    public var keyFile: String?
    public var trustedCAFile: String?
    public var clientCertAuth = false
    public var crlFile: String?
    /// `--auto-tls` / `--peer-auto-tls`: a self-signed certificate when no files are given.
    public var autoTLS = false
    public init() {}

    /// Whether any TLS setting is given.
    public var isEmpty: Bool { certFile == nil && keyFile == nil && trustedCAFile == nil && !autoTLS }
}

/// Everything a Vigil server is started with. Names follow etcd's flags.
public struct Configuration: Sendable {
    /// `--name`
    public var name = "default"
    /// `--data-dir`
    public var dataDir = "default.vigil"
    /// `--listen-client-urls`
    public var listenClientURLs = ["http://127.0.0.1:2379"]
    /// `--advertise-client-urls` (defaults to the listen URLs)
    public var advertiseClientURLs: [String]? = nil
    /// `--initial-advertise-peer-urls`
    public var initialAdvertisePeerURLs = ["http://localhost:2380"]
    /// `--initial-cluster-token`
    public var initialClusterToken = "etcd-cluster"
    /// `--max-request-bytes`, `--max-txn-ops`
    public var limits = Limits()
    /// `--max-concurrent-streams`: HTTP/2 streams one connection may have open (etcd's default:
    /// no limit); streams past it are refused and counted in /metrics.
    public var maxConcurrentStreams: UInt32 = .max
    /// `--quota-backend-bytes` (0 = etcd's default of 2 GiB)
    public var quotaBackendBytes: Int64 = 0
    /// `--unsafe-no-fsync`
    public var unsafeNoFsync = false
    /// `--experimental-watch-progress-notify-interval` in milliseconds (etcd's default: 10 minutes).
    public var watchProgressNotifyIntervalMs: UInt64 = 600_000
    /// How often idle SSE watch streams get a keep-alive comment (`--sse-keepalive-interval`).
    public var sseKeepAliveIntervalMs: UInt64 = 15_000
    /// Revisions of compacted history removed per loop turn (a few milliseconds of work).
    public var compactionBatchRevisions = 2_500
    /// `--auto-compaction-mode` ("periodic" or "revision"; empty = off) and
    /// `--auto-compaction-retention` ("1h", "30m", "1000"; for periodic a bare number is hours).
    public var autoCompactionMode = ""
    public var autoCompactionRetention = "0"
    /// How often revision-mode auto-compaction checks.
    public var autoCompactionCheckMs: UInt64 = 300_000

    /// Parses a Go-style duration with one unit: "10m", "5s", "100ms", "1h".
    public static func durationMs(_ s: String) -> UInt64? {
        for (unit, factor) in [("ms", 1.0), ("h", 3_600_000.0), ("m", 60_000.0), ("s", 1000.0)] where s.hasSuffix(unit)
        {
            guard let n = Double(s.dropLast(unit.count)), n >= 0 else { return nil }
            return UInt64(n * factor)
        }
        return nil
    }
    /// A snapshot file (`etcdctl snapshot save`) to start from when the data directory is empty.
    public var restoreSnapshot: String?
    /// How long an HTTP/1.1 request may take to arrive in full (slow or half-sent requests get 408).
    public var httpReadTimeoutMs: UInt64 = 10_000
    /// `--auth-token-ttl`, `--bcrypt-cost`.
    public var auth = AuthConfig()
    /// The watch hub's ring and slow-stream bounds.
    public var watch = WatchHubConfig()
    /// `--cert-file`, `--key-file`, `--trusted-ca-file`, `--client-cert-auth`, `--client-crl-file`,
    /// `--auto-tls`: TLS of the `https://` client listeners.
    public var clientTLS = TLSFiles()
    /// `--cipher-suites` (Go's names).
    public var cipherSuites: [String] = []
    /// The `--peer-*` TLS flags: checked at start (a single member has no peer traffic).
    public var peerTLS = TLSFiles()
    /// `--listen-metrics-urls`: more listeners serving only `/metrics`, `/health`, `/livez` and
    /// `/readyz` (plain HTTP, or HTTPS with the client certificate).
    public var listenMetricsURLs: [String] = []
    /// `--cors`: origins the plain HTTP answers allow (etcd's default: `*`, every origin); empty:
    /// no CORS headers.
    public var corsOrigins: [String] = ["*"]
    /// A TLS handshake must finish within this time.
    public var tlsHandshakeTimeoutMs: UInt64 = 10_000
    /// For embedding programs with a swift-metrics backend: every this many seconds the server's
    /// metrics (those of `/metrics`) are handed to the swift-metrics facade. nil: never.
    public var metricsExportInterval: Double?

    public init() {}

    /// The quota in force: 0 means etcd's default of 2 GiB.
    /// Mirror mode (`vigil grpc-proxy start`): follow an etcd cluster instead of keeping a store
    /// of one's own.
    public var mirror: MirrorSettings?

    public var effectiveQuota: Int64 { quotaBackendBytes > 0 ? quotaBackendBytes : 2 << 30 }

    /// One client listener: `http://host:port` or `https://host:port`.
    public struct ListenAddress: Sendable {
        public var host: String
        public var port: Int
        public var secure: Bool
    }

    /// The addresses to listen on, from `--listen-client-urls`; an `https://` URL needs a
    /// certificate (`--cert-file`/`--key-file` or `--auto-tls`).
    public func listenAddresses() throws -> [ListenAddress] {
        try addresses(listenClientURLs)
    }

    /// The `--listen-metrics-urls` addresses.
    public func metricsAddresses() throws -> [ListenAddress] { try addresses(listenMetricsURLs) }

    private func addresses(_ urls: [String]) throws -> [ListenAddress] {
        try urls.map { url in
            let a = try Self.parseURL(url)
            if a.secure && clientTLS.certFile == nil && !clientTLS.autoTLS {
                throw ConfigurationError(
                    "TLS key/cert (--cert-file, --key-file) must be provided for client url \(url) with HTTPS scheme")
            }
            return a
        }
    }

    struct BadURL: Error, CustomStringConvertible {
        let url: String
        var description: String { "invalid URL \"\(url)\": expected http://host:port or https://host:port" }
    }

    static func parseURL(_ url: String) throws -> ListenAddress {
        var rest = Substring(url)
        var secure = false
        if rest.hasPrefix("http://") {
            rest = rest.dropFirst(7)
        } else if rest.hasPrefix("https://") {
            rest = rest.dropFirst(8)
            secure = true
        } else if rest.contains("://") {
            throw BadURL(url: url)
        }
        if let slash = rest.firstIndex(of: "/") { rest = rest[..<slash] }
        guard let colon = rest.lastIndex(of: ":"), let port = Int(rest[rest.index(after: colon)...]),
            (0...65535).contains(port)
        else { throw BadURL(url: url) }
        var host = String(rest[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        if host == "localhost" { host = "127.0.0.1" }
        if host.isEmpty { host = "0.0.0.0" }
        return ListenAddress(host: host, port: port, secure: secure)
    }
}

/// A configuration that cannot be served.
public struct ConfigurationError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

extension Configuration {
    /// `--auth-token`: `simple` (the default, options ignored as etcd does) or
    /// `jwt,pub-key=…,priv-key=…,sign-method=…,ttl=…` (the keys are read now).
    public mutating func setAuthToken(_ spec: String) throws {
        let kind = spec.split(separator: ",", maxSplits: 1).first.map(String.init) ?? ""
        switch kind {
        case "simple":
            auth.jwt = nil
        case "jwt":
            let options = spec.dropFirst(3).drop { $0 == "," }
            do {
                auth.jwt = JWTIssuer(signer: try JWTSigner.parse(options: String(options)))
            } catch {
                throw ConfigurationError("--auth-token: \(error.description)")
            }
        default:
            throw ConfigurationError("--auth-token \(spec): unknown token type \"\(kind)\" (simple or jwt)")
        }
    }
}

/// etcd's JWT tokens as the auth store's issuer.
struct JWTIssuer: TokenIssuer {
    let signer: JWTSigner
    func issue(username: String, revision: UInt64) -> String? { signer.sign(username: username, revision: revision) }
    func check(_ token: String) -> (username: String, revision: UInt64)? { signer.verify(token) }
}

/// `vigil grpc-proxy start`'s settings: which cluster to follow, what of it, how to reach it.
public struct MirrorSettings: Sendable {
    /// The upstream members (`--endpoints`).
    public var endpoints: [String]
    /// Only keys under this prefix are copied (`--mirror-prefix`; empty: all).
    public var prefix = ""
    /// etcd's `--namespace`: clients see upstream's keys under it as the whole key space.
    public var namespace = ""
    /// `SO_REUSEPORT` on the listeners, so that several mirror processes share one address.
    public var reusePort = false
    /// Upstream TLS (`--cacert`, `--cert`, `--key`, `--insecure-skip-tls-verify`).
    public var caFile: String?
    public var certFile: String?
    public var keyFile: String?
    public var insecureSkipVerify = false
    public var useTLS: Bool { caFile != nil || certFile != nil || insecureSkipVerify }

    public init(endpoints: [String]) { self.endpoints = endpoints }
}
