import ArgumentParser
import Foundation
import Logging
import VigilServer

/// `vigil grpc-proxy start`: mirror mode, with etcd's grpc-proxy flags. Vigil follows an etcd
/// cluster (the distributed engine) and serves its clients: reads and watches from its copy,
/// everything else forwarded.
struct GRPCProxyStart: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vigil grpc-proxy start",
        abstract: "Serve an etcd cluster's clients from a copy of its key space followed by watch.")

    @Option(name: .customLong("endpoints"), help: "Comma-separated upstream etcd members (host:port).")
    var endpoints = "127.0.0.1:2379"
    @Option(name: .customLong("listen-addr"), help: "Address to serve clients on (host:port).")
    var listenAddr = "127.0.0.1:23790"
    @Option(name: .customLong("advertise-client-url"), help: "Client URL this proxy advertises.")
    var advertiseClientURL: String?
    @Option(name: .customLong("metrics-addr"), help: "Extra address for /metrics and /health (http://host:port).")
    var metricsAddr: String?
    @Option(name: .customLong("data-dir"), help: "Directory for the copy (rebuilt at each start).")
    var dataDir = "default.proxy"
    @Option(name: .customLong("namespace"), help: "Serve the keys under this prefix as the whole key space.")
    var namespace: String?
    @Option(name: .customLong("mirror-prefix"), help: "Copy only keys under this prefix; others are forwarded.")
    var mirrorPrefix = ""
    @Flag(name: .customLong("reuse-port"), help: "SO_REUSEPORT: several proxies share --listen-addr.")
    var reusePort = false
    @Option(name: .customLong("cacert"), help: "Upstream TLS: CA bundle to verify the members.")
    var cacert: String?
    @Option(name: .customLong("cert"), help: "Upstream TLS: client certificate.")
    var cert: String?
    @Option(name: .customLong("key"), help: "Upstream TLS: client key.")
    var key: String?
    @Flag(
        name: .customLong("insecure-skip-tls-verify"), help: "Upstream TLS without checking the members' certificates.")
    var insecureSkipVerify = false
    @Option(name: .customLong("max-request-bytes"), help: "Maximum client request size in bytes (default 1572864).")
    var maxRequestBytes: Int?
    @Option(name: .customLong("log-level"), help: "debug, info, warn or error.")
    var logLevel = "info"

    func run() async throws {
        var c = Configuration()
        c.name = "vigil-mirror"
        c.dataDir = dataDir
        c.listenClientURLs = [listenAddr.contains("://") ? listenAddr : "http://" + listenAddr]
        if let advertiseClientURL { c.advertiseClientURLs = [advertiseClientURL] }
        if let metricsAddr {
            c.listenMetricsURLs = [metricsAddr.contains("://") ? metricsAddr : "http://" + metricsAddr]
        }
        if let maxRequestBytes {
            guard maxRequestBytes > 0 else { throw ValidationError("--max-request-bytes must be positive") }
            c.limits.maxRequestBytes = maxRequestBytes
        }
        var m = MirrorSettings(
            endpoints: endpoints.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter {
                !$0.isEmpty
            })
        guard !m.endpoints.isEmpty else { throw ValidationError("--endpoints names no member") }
        m.prefix = mirrorPrefix
        m.namespace = namespace ?? ""
        m.reusePort = reusePort
        m.caFile = cacert
        m.certFile = cert
        m.keyFile = key
        m.insecureSkipVerify = insecureSkipVerify
        if (cert == nil) != (key == nil) { throw ValidationError("--cert and --key must be given together") }
        c.mirror = m
        bootstrapTextLogs(try parseLogLevel(logLevel))
        tuneMalloc()
        let logger = Logger(label: "vigil-mirror")
        logger.info("starting vigil grpc-proxy (mirror mode)", metadata: ["endpoints": "\(m.endpoints)"])
        try await serve(VigilServer(configuration: c, logger: logger), logger)
    }
}
