import Auth
import EtcdAPI
import EventLoop
import Foundation
import GRPC
import HTTP2
import LMDBBackend
import Logging
import MVCC
import Passwords
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
    var limits: Limits { config.limits }
    /// The largest plain HTTP body: JSON carries bytes in base64, so a request at the gRPC limit
    /// is allowed once encoded.
    var plainBodyLimit: Int { config.limits.maxReceiveMessageBytes / 3 * 4 + 64 * 1024 }
    let http2Settings: HTTP2Settings
    var metrics = ServerMetrics()
    /// Plain HTTP (gateway and endpoints) for both transports.
    private(set) lazy var plain = PlainEndpoints(core: self)
    /// The HTTP/2 connections' shared output buffer (see `ClientConnection.flush`).
    var output: [UInt8] = []
    private(set) var listeners: [TCPListener] = []
    private var connections: [ObjectIdentifier: ClientConnection] = [:]
    private var background: BackgroundWork?
    /// `--auto-compaction-*`, checked at start.
    private let autoCompaction: AutoCompactor.Mode?

    init(loop: EventLoop, config: Configuration, logger: Logger) throws {
        self.loop = loop
        self.config = config
        self.logger = logger
        autoCompaction = try AutoCompactor.mode(config)
        var h2 = HTTP2Settings()
        h2.maxConcurrentStreams = config.maxConcurrentStreams
        http2Settings = h2
        let dir = config.dataDir
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        if let snap = config.restoreSnapshot {
            try SnapshotRestore.restore(snapshot: snap, into: dir + "/member", logger: logger)
        }
        let mapSize = Int(max(config.effectiveQuota * 2, 8 << 30))
        backend = try LMDBBackend(path: dir + "/member", mapSize: mapSize, noSync: config.unsafeNoFsync)
        let (records, meta) = try backend.load()
        let blobs = try backend.loadBlobs()
        store = KVStore(records: records, meta: meta)
        commits = CommitCoordinator(loop: loop, store: store, backend: backend, logger: logger)
        maintenance = BackendMaintenance(
            loop: loop, backend: backend, commits: commits, logger: logger, snapshotDirectory: dir + "/member")
        let memberID = MemberIDs.memberID(
            peerURLs: config.initialAdvertisePeerURLs, clusterToken: config.initialClusterToken)
        let identity = MemberIdentity(
            clusterID: MemberIDs.clusterID(memberIDs: [memberID]), memberID: memberID, name: config.name,
            peerURLs: config.initialAdvertisePeerURLs,
            clientURLs: config.advertiseClientURLs ?? config.listenClientURLs)
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
        for (host, port) in try config.listenAddresses() {
            let l = try TCPListener(loop: loop, host: host, port: port) { [unowned self] tcp in
                let c = ClientConnection(tcp: tcp, server: self)
                connections[ObjectIdentifier(c)] = c
                c.start()
            }
            listeners.append(l)
            ports.append(l.port)
        }
        background = BackgroundWork(core: self, autoCompaction: autoCompaction)
        return ports
    }

    /// The handler of a gRPC call on `path`, wrapped with its deadline and metrics.
    func route(_ path: String) -> ((ServerCall) -> any CallHandler)? {
        loop.assertInLoop()
        guard let make = services.route(path) else { return nil }
        return { [unowned self] call in MeteredCall(make(call), call: call, server: self) }
    }

    func connectionClosed(_ c: ClientConnection) {
        connections[ObjectIdentifier(c)] = nil
    }

    /// Stops accepting connections and the background work.
    func shutdown() {
        for l in listeners { l.close() }
        listeners.removeAll()
        background?.stop()
        background = nil
    }

    /// Closes listeners and every client connection, and starts committing what is pending.
    func closeAll() {
        shutdown()
        for c in Array(connections.values) { c.close() }
        connections.removeAll()
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
