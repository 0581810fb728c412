import Auth
import CMalloc
import EtcdAPI
import EventLoop
import Foundation
import GRPC
import HTTP2
import LMDBBackend
import Logging
import MVCC
import Mirror
import Passwords
import TLS
import VigilClient
import VigilCore

/// A running server's parts, all confined to its loop: backend, store, group commit, services,
/// background work, listeners and connections. Built and used on the loop only.
///
/// The wiring, in one place: the store is loaded from LMDB; the commit coordinator makes its
/// writes durable; `EtcdServices` builds the handlers (the watch hub and the lease key tracker
/// observe the store); background steppers run compaction, catch-up and lease expiry; listeners
/// hand connections to `ClientConnection`, which routes gRPC calls through `route` and plain HTTP
/// through `PlainEndpoints`.
final class VigilServerCore {
    let loop: EventLoop
    let config: Configuration
    let logger: Logger
    let store: KVStore
    let backend: LMDBBackend
    let commits: CommitCoordinator
    let maintenance: BackendMaintenance
    let services: EtcdServices
    /// In-process watches (`VigilServer.watch`), held here until their consumer goes away.
    var inProcessWatches: [ObjectIdentifier: InProcessWatch] = [:]
    /// In-process keep-alives (`VigilServer.keepAlive`), ended with the server.
    var inProcessKeepers: [ObjectIdentifier: LocalLeaseKeeper] = [:]
    /// Mirror mode's copy of the upstream cluster (nil for a standalone server).
    let mirror: Mirror?
    var limits: Limits { config.limits }
    /// The largest plain HTTP body: JSON carries bytes in base64, so a request at the gRPC limit
    /// is allowed once encoded.
    var plainBodyLimit: Int { config.limits.maxReceiveMessageBytes / 3 * 4 + 64 * 1024 }
    let http2Settings: HTTP2Settings
    var metrics = ServerMetrics()
    /// Plain HTTP (gateway and endpoints) for both transports.
    private(set) lazy var plain = PlainEndpoints(core: self)
    /// The `--listen-metrics-urls` endpoints.
    private(set) lazy var metricsEndpoints = MetricsEndpoints(core: self)
    /// The HTTP/2 connections' shared output buffer (see `ClientConnection.flush`).
    var output: [UInt8] = []
    private(set) var listeners: [TCPListener] = []
    /// The `https://` listeners' TLS context (nil without one).
    let tls: TLSContext?
    /// Refusal reasons already logged (each is logged once, then only counted).
    private var loggedRefusals: Set<EtcdError.Refusal> = []
    private var connections: [ObjectIdentifier: ClientConnection] = [:]
    private var background: BackgroundWork?
    /// The swift-metrics export (`Configuration.metricsExportInterval`).
    private(set) var metricsExport: MetricsFacadeExport?
    /// `--auto-compaction-*`, checked at start.
    private let autoCompaction: AutoCompactor.Mode?

    init(loop: EventLoop, config: Configuration, logger: Logger) throws {
        self.loop = loop
        self.config = config
        self.logger = logger
        autoCompaction = try AutoCompactor.mode(config)
        tls = try Self.makeTLS(config, logger: logger)
        var h2 = HTTP2Settings()
        h2.maxConcurrentStreams = config.maxConcurrentStreams
        http2Settings = h2
        let dir = config.dataDir
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        if let snap = config.restoreSnapshot {
            try SnapshotRestore.restore(
                snapshot: snap, into: dir + "/member", mapSize: Int(max(config.effectiveQuota * 2, 8 << 30)),
                logger: logger)
        }
        let mapSize = Int(max(config.effectiveQuota * 2, 8 << 30))
        if config.mirror != nil {
            // A mirror's copy is loaded from upstream at each start, and upstream keeps it durable.
            try? FileManager.default.removeItem(atPath: dir + "/member")
        }
        backend = try LMDBBackend(
            path: dir + "/member", mapSize: mapSize, noSync: config.unsafeNoFsync || config.mirror != nil, log: true)
        let meta = try backend.loadMeta()
        let blobs = try backend.loadBlobs()
        // The index only: values stay in LMDB until a read needs them.
        let backend = self.backend
        store = try KVStore(meta: meta, source: backend) { add in
            try backend.forEachRecord(values: false) { add($0.rev, $0.key, $0.kv) }
        }
        backend.releaseMappedPages()
        // Loading made a garbage record per stored revision between the index's arrays: hand the
        // freed pages back.
        malloc_trim(0)
        commits = CommitCoordinator(loop: loop, store: store, backend: backend, logger: logger)
        maintenance = BackendMaintenance(
            loop: loop, backend: backend, commits: commits, logger: logger, snapshotDirectory: dir + "/member")
        let memberID = MemberIDs.memberID(
            peerURLs: config.initialAdvertisePeerURLs, clusterToken: config.initialClusterToken)
        var identity = MemberIdentity(
            clusterID: MemberIDs.clusterID(memberIDs: [memberID]), memberID: memberID, name: config.name,
            peerURLs: config.initialAdvertisePeerURLs,
            clientURLs: config.advertiseClientURLs ?? config.listenClientURLs)
        // A mirror answers with its upstream's ids (asked now: the encoders keep them).
        var mirrorSetup: (options: MirrorOptions, tls: TLSContext?)?
        if let m = config.mirror {
            let setup = try Self.mirrorOptions(m)
            let ids = Mirror.identify(loop: loop, options: setup.options, tls: setup.tls) { [logger] line in
                logger.info("mirror: \(line)")
            }
            identity.clusterID = ids.clusterID
            identity.memberID = ids.memberID
            identity.raftTerm = ids.raftTerm
            mirrorSetup = setup
        }
        var watch = config.watch
        watch.fragmentBytes = config.limits.maxReceiveMessageBytes
        services = EtcdServices(
            ServerDependencies(
                store: store, identity: identity, limits: config.limits, quotaBytes: config.effectiveQuota,
                commits: commits, backend: maintenance, clock: LoopClock(loop),
                wallClockMilliseconds: Int64(Date().timeIntervalSince1970 * 1000),
                offload: { work, done in ThreadPool.submit(on: loop, work: work, done: done) },
                hasher: BcryptHasher(), restored: RestoredState(meta: meta, blobs: blobs), watch: watch,
                auth: config.auth))
        maintenance.identity = { [unowned services] in services.context.identity }
        commits.onSpaceFailure = { [unowned services, logger] reason in
            guard let reason else { return }
            // Writes are refused from now on, while the log still has room for those under way.
            logger.error("disk full: raising the NOSPACE alarm", metadata: ["reason": "\(reason)"])
            services.context.alarms.activate(.nospace)
        }
        if let setup = mirrorSetup {
            let mirror = Mirror(loop: loop, store: store, services: services, options: setup.options, tls: setup.tls)
            mirror.log = { [logger] line in logger.info("mirror: \(line)") }
            MirrorRouting.install(mirror, on: services)
            self.mirror = mirror
        } else {
            mirror = nil
        }
        loop.measureTurns { [unowned self] ns in metrics.turn(nanoseconds: ns) }
        logger.info(
            "store loaded",
            metadata: [
                "revision": "\(store.currentRevision)", "compact-revision": "\(store.compactRevision)",
                "keys": "\(store.liveKeyCount)",
            ])
    }

    /// Binds the listeners and starts the background work; returns the ports bound.
    func start() throws -> [Int] {
        var ports: [Int] = []
        for a in try config.listenAddresses() {
            let l = try TCPListener(
                loop: loop, host: a.host, port: a.port, reusePort: config.mirror?.reusePort ?? false
            ) { [unowned self] tcp in
                accept(tcp, secure: a.secure)
            }
            listeners.append(l)
            ports.append(l.port)
        }
        for a in try config.metricsAddresses() {
            let l = try TCPListener(loop: loop, host: a.host, port: a.port) { [unowned self] tcp in
                accept(tcp, secure: a.secure, metricsOnly: true)
            }
            listeners.append(l)
            metricsPorts.append(l.port)
            logger.info("serving metrics", metadata: ["address": "\(a.host):\(l.port)"])
        }
        background = BackgroundWork(core: self, autoCompaction: autoCompaction)
        if let every = config.metricsExportInterval {
            metricsExport = MetricsFacadeExport(loop: loop, intervalSeconds: every) { [unowned self] in metricsText() }
        }
        return ports
    }

    /// Mirror mode: what to follow, and the upstream TLS context.
    private static func mirrorOptions(_ m: MirrorSettings) throws -> (options: MirrorOptions, tls: TLSContext?) {
        var endpoints: [UpstreamEndpoint] = []
        for e in m.endpoints {
            guard let ep = UpstreamEndpoint.parse(e) else {
                throw ConfigurationError("invalid endpoint \"\(e)\": expected host:port")
            }
            endpoints.append(ep)
        }
        guard !endpoints.isEmpty else { throw ConfigurationError("--endpoints names no upstream member") }
        var options = MirrorOptions(endpoints: endpoints)
        options.prefix = Array(m.prefix.utf8)
        options.namespace = Array(m.namespace.utf8)
        var tls: TLSContext?
        if m.useTLS {
            var c = TLSContext.ClientConfig()
            c.caFile = m.caFile
            c.certFile = m.certFile
            c.keyFile = m.keyFile
            c.insecureSkipVerify = m.insecureSkipVerify
            c.requireEmptyCommonName = true
            do { tls = try TLSContext.client(c) } catch { throw ConfigurationError("upstream TLS: \(error)") }
        }
        return (options, tls)
    }

    /// Ports of the `--listen-metrics-urls` listeners.
    private(set) var metricsPorts: [Int] = []

    private func accept(_ tcp: TCPConnection, secure: Bool, metricsOnly: Bool = false) {
        var stream: any ByteStream = tcp
        var tlsStream: TLSStream?
        if secure, let tls {
            do {
                let t = try TLSStream(
                    tcp: tcp, context: tls, loop: loop, handshakeTimeoutMs: config.tlsHandshakeTimeoutMs)
                t.onFailure = { [unowned self] f in tlsFailed(f) }
                stream = t
                tlsStream = t
            } catch {
                logger.error("cannot start TLS", metadata: ["error": "\(error)"])
                tcp.close()
                return
            }
        }
        let c = ClientConnection(stream: stream, tls: tlsStream, server: self, metricsOnly: metricsOnly)
        connections[ObjectIdentifier(c)] = c
        c.start()
    }

    private func tlsFailed(_ f: TLSStream.Failure) {
        switch f {
        case .handshake(let why): refused(.tlsHandshake, "TLS handshake failed: \(why)")
        case .badCertificate(let why): refused(.tlsBadCertificate, "client certificate refused: \(why)")
        case .plaintext: refused(.tlsPlaintext, "plaintext HTTP sent to a TLS listener (use https://)")
        case .timeout: refused(.tlsHandshakeTimeout, "TLS handshake did not finish within the timeout")
        case .renegotiation: refused(.tlsRenegotiation, "a client tried to renegotiate TLS")
        }
    }

    /// Counts a refused connection or request; the first of each reason is logged.
    func refused(_ reason: EtcdError.Refusal, _ message: @autoclosure () -> String) {
        metrics.count(reason)
        if loggedRefusals.insert(reason).inserted {
            logger.warning(
                "\(message()) (logged once; counted in vigil_requests_refused_total{reason=\"\(reason.rawValue)\"})")
        }
    }

    /// The client listeners' TLS context, and a check of the peer TLS files (a single member
    /// has no peer traffic, but an etcd configuration's files must exist and load).
    static func makeTLS(_ config: Configuration, logger: Logger) throws -> TLSContext? {
        let addresses = try config.listenAddresses()
        if !config.peerTLS.isEmpty { _ = try tlsContext(config.peerTLS, [], dir: config.dataDir + "/fixtures/peer") }
        let secure = addresses.filter(\.secure) + (try config.metricsAddresses()).filter(\.secure)
        guard !secure.isEmpty else {
            if !config.clientTLS.isEmpty {
                logger.warning("TLS files are given but no --listen-client-urls is https://: serving plaintext only")
            }
            return nil
        }
        let hosts = secure.map(\.host).map { $0 == "0.0.0.0" || $0 == "::" ? "127.0.0.1" : $0 } + ["localhost"]
        return try tlsContext(
            config.clientTLS, config.cipherSuites, dir: config.dataDir + "/fixtures/client", hosts: hosts,
            logger: logger)
    }

    private static func tlsContext(
        _ files: TLSFiles, _ ciphers: [String], dir: String, hosts: [String] = ["127.0.0.1", "localhost"],
        logger: Logger? = nil
    ) throws -> TLSContext {
        var cert = files.certFile
        var key = files.keyFile
        if cert == nil && files.autoTLS {
            let made = try TLSContext.selfSigned(in: dir, hosts: hosts)
            (cert, key) = (made.cert, made.key)
            logger?.info("using a self-signed certificate (--auto-tls)", metadata: ["cert-file": "\(made.cert)"])
        }
        guard let cert, let key else {
            throw ConfigurationError("TLS needs both a certificate and a key file (--cert-file, --key-file)")
        }
        var c = TLSContext.ServerConfig(certFile: cert, keyFile: key)
        c.trustedCAFile = files.trustedCAFile
        c.clientCertAuth = files.clientCertAuth
        c.crlFile = files.crlFile
        c.cipherSuites = ciphers
        do {
            return try TLSContext.server(c)
        } catch {
            throw ConfigurationError(error.description)
        }
    }

    /// The handler of a gRPC call on `path`, wrapped with its deadline and metrics.
    func route(_ path: String) -> ((ServerCall) -> any CallHandler)? {
        loop.assertInLoop()
        guard let make = services.route(path) else { return nil }
        return { [unowned self] call in MeteredCall(make(call), call: call, server: self) }
    }

    var connectionCount: Int { connections.count }

    func connectionClosed(_ c: ClientConnection) {
        connections[ObjectIdentifier(c)] = nil
    }

    /// Stops accepting connections and the background work.
    func shutdown() {
        mirror?.stop()
        for l in listeners { l.close() }
        listeners.removeAll()
        background?.stop()
        background = nil
        metricsExport?.stop()
    }

    /// Closes listeners and every client connection, and starts committing what is pending.
    func closeAll() {
        shutdown()
        for c in Array(connections.values) { c.close() }
        connections.removeAll()
        for w in Array(inProcessWatches.values) { w.close() }
        for k in Array(inProcessKeepers.values) { k.finish(.closed) }
        commits.flushPending()
    }
}

/// The loop's clock, for the parts that measure time (leases, tokens).
final class LoopClock: MonotonicClock {
    private unowned let loop: EventLoop
    init(_ loop: EventLoop) { self.loop = loop }
    var nowMilliseconds: UInt64 { loop.nowMilliseconds }
}

/// bcrypt through libxcrypt (`Passwords`), as the auth store's hasher.
struct BcryptHasher: PasswordHasher {
    func hash(_ password: String, cost: Int) throws -> String {
        do throws(Passwords.Failure) {
            return try Passwords.hash(password, cost: cost)
        } catch {
            throw error == .unusable
                ? EtcdError.passwordUnusable : EtcdError.internal("etcdserver: password hashing failed")
        }
    }

    func verify(_ password: String, hash: String) -> Bool { Passwords.verify(password, hash: hash) }
}
