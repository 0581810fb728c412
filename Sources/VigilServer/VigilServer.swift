import EtcdAPI
import EtcdProto
import EventLoop
import Foundation
import GRPC
import HTTP1
import HTTP2
import LMDBBackend
import Logging
import MVCC
import WatchHub

/// The loop-confined part of a running server: store, services, listeners and connections.
final class VigilServerCore {
    let loop: EventLoop
    let config: Configuration
    let logger: Logger
    let store: KVStore
    let backend: LMDBBackend
    let commits: CommitCoordinator
    let services: EtcdServices
    var limits: Limits { config.limits }
    let http2Settings: HTTP2Settings
    private(set) var listeners: [TCPListener] = []
    private var connections: Set<ObjectIdentifier> = []
    private var connectionObjects: [ObjectIdentifier: ClientConnection] = [:]
    lazy var http1Handler: any HTTP1Handler = PlainHTTPHandler(core: self)

    init(loop: EventLoop, config: Configuration, logger: Logger) throws {
        self.loop = loop
        self.config = config
        self.logger = logger
        var h2 = HTTP2Settings()
        h2.maxConcurrentStreams = config.maxConcurrentStreams
        http2Settings = h2
        let dir = config.dataDir
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        if let snap = config.restoreSnapshot {
            try Self.restore(snapshot: snap, into: dir + "/member", logger: logger)
        }
        let mapSize = Int(max(config.effectiveQuota * 2, 8 << 30))
        backend = try LMDBBackend(path: dir + "/member", mapSize: mapSize, noSync: config.unsafeNoFsync)
        let (records, meta) = try backend.load()
        let blobs = try backend.loadBlobs()
        store = KVStore(records: records, meta: meta)
        commits = CommitCoordinator(loop: loop, store: store, backend: backend, logger: logger)
        let memberID = MemberIDs.memberID(peerURLs: config.initialAdvertisePeerURLs, clusterToken: config.initialClusterToken)
        let identity = MemberIdentity(
            clusterID: MemberIDs.clusterID(memberIDs: [memberID]), memberID: memberID, name: config.name,
            peerURLs: config.initialAdvertisePeerURLs,
            clientURLs: config.advertiseClientURLs ?? config.listenClientURLs)
        let ctx = ServerContext(store: store, identity: identity, limits: config.limits, gate: commits)
        let backend = self.backend
        ctx.dbSize = { Int64(backend.lastSizes.allocated) }
        ctx.dbSizeInUse = { Int64(backend.lastSizes.inUse) }
        ctx.quotaBytes = config.effectiveQuota
        var watchConfig = config.watch
        watchConfig.fragmentBytes = config.limits.maxReceiveMessageBytes
        ctx.offload = { work, done in ThreadPool.submit(on: loop, work: work, done: done) }
        services = EtcdServices(context: ctx, watchConfig: watchConfig, meta: meta, blobs: blobs, authConfig: config.auth,
                                now: { loop.nowMilliseconds })
        ctx.maintenance = self
        services.onGatewayFailure = { [unowned self] s in metrics.observe(s) }
        let hub = services.watch.hub
        let lessor = services.lessor
        commits.onPublish.append { events, _ in lessor.observe(events) }
        commits.onPublish.append { events, revision in hub.publish(events, revision: revision) }
        commits.onCommitted.append { revision in hub.advance(to: revision) }
        loop.addBeforeSleep { [unowned self] in catchUpWatchers() }
        loop.addBeforeSleep { [unowned self] in compactInSteps() }
        loop.measureTurns { [unowned self] ns in metrics.turn(nanoseconds: ns) }
        logger.info("store loaded", metadata: ["revision": "\(store.currentRevision)",
                                               "compact-revision": "\(store.compactRevision)",
                                               "keys": "\(store.liveKeyCount)"])
    }

    /// Puts a snapshot file in place as the data file of an empty member directory; a trailing
    /// SHA-256 (as the Snapshot stream ends) is checked and dropped.
    static func restore(snapshot: String, into member: String, logger: Logger) throws {
        let target = member + "/data.mdb"
        if FileManager.default.fileExists(atPath: target) {
            logger.warning("--restore-snapshot ignored: the data directory already holds data", metadata: ["file": "\(target)"])
            return
        }
        var data = try Data(contentsOf: URL(fileURLWithPath: snapshot))
        if data.count > 32 {
            var sha = SHA256Digest()
            sha.update(data.prefix(data.count - 32))
            if Data(sha.finish()) == data.suffix(32) { data = data.prefix(data.count - 32) }
        }
        try FileManager.default.createDirectory(atPath: member, withIntermediateDirectories: true)
        try data.write(to: URL(fileURLWithPath: target))
        logger.info("restored snapshot", metadata: ["file": "\(snapshot)", "bytes": "\(data.count)"])
    }

    func listen() throws -> [Int] {
        var ports: [Int] = []
        for (host, port) in try config.listenAddresses() {
            let l = try TCPListener(loop: loop, host: host, port: port) { [unowned self] tcp in
                let c = ClientConnection(tcp: tcp, server: self)
                connectionObjects[ObjectIdentifier(c)] = c
                c.start()
            }
            listeners.append(l)
            ports.append(l.port)
        }
        return ports
    }

    /// The gRPC handler for a path, with the call's deadline enforced.
    func route(_ path: String) -> ((ServerCall) -> Void)? {
        guard let handler = services.route(path) else { return nil }
        return { [unowned self] call in
            metrics.callStarted(path)
            let started = DispatchTime.now().uptimeNanoseconds
            var timer: LoopTimer?
            if let ms = call.timeoutMs {
                timer = LoopTimer(loop: loop, timeoutMs: ms) { [weak call] in
                    guard let call, !call.isFinished else { return }
                    call.finish(GRPCStatus(.deadlineExceeded, "context deadline exceeded"))
                }
            }
            call.onEnded = { [unowned self, unowned call] in
                timer?.cancel()
                let seconds = Double(DispatchTime.now().uptimeNanoseconds - started) / 1e9
                metrics.callEnded(path, code: call.finalStatus?.code ?? .cancelled, seconds: seconds)
                metrics.observe(call.finalStatus)
            }
            handler(call)
        }
    }

    private var catchUpTimer: LoopTimer?
    private var progressTimer: LoopTimer?
    var metrics = ServerMetrics()
    /// The HTTP/2 connections' shared output buffer (see `ClientConnection.flush`).
    var output: [UInt8] = []
    private var compactionTimer: LoopTimer?
    private var autoCompactor: AutoCompactor?

    func startAutoCompaction() throws {
        guard let mode = try AutoCompactor.mode(config) else { return }
        autoCompactor = AutoCompactor(loop: loop, services: services, mode: mode, logger: logger)
        autoCompactor?.start()
    }

    /// Removes compacted history a slice per loop turn; while some remains, a zero timeout keeps
    /// the loop turning (requests are served between slices).
    private func compactInSteps() {
        guard store.compactionPending else { return }
        if !services.context.compactionStep(maxRevisions: config.compactionBatchRevisions), compactionTimer == nil {
            compactionTimer = LoopTimer(loop: loop, timeoutMs: 0) { [unowned self] in compactionTimer = nil }
        }
    }

    private var leaseTimer: LoopTimer?
    private var leaseBacklogTimer: LoopTimer?

    /// Lease expiry: every 100 ms, revoke expired leases a bounded batch at a time; while a backlog
    /// remains (a mass expiry), the next batch runs on the next loop turn so requests interleave.
    func startLeaseTimer() {
        leaseTimer = LoopTimer(loop: loop, timeoutMs: 100, repeatMs: 100) { [unowned self] in expireLeases() }
        leaseTimer?.unref()
    }

    private func expireLeases() {
        guard leaseBacklogTimer == nil, services.lessor.expireStep() else { return }
        leaseBacklogTimer = LoopTimer(loop: loop, timeoutMs: 0) { [unowned self] in
            leaseBacklogTimer = nil
            expireLeases()
        }
    }

    /// Lets lagging or parked watchers catch up, a bounded step per loop turn; while work remains,
    /// a zero timeout keeps the loop from sleeping.
    private func catchUpWatchers() {
        let hub = services.watch.hub
        guard hub.catchUpPending else { return }
        hub.catchUp()
        if hub.catchUpPending && catchUpTimer == nil {
            catchUpTimer = LoopTimer(loop: loop, timeoutMs: 0) { [unowned self] in catchUpTimer = nil }
        }
    }

    /// Periodic progress notifications, every interval plus up to 10% jitter (as etcd).
    func startProgressTimer() {
        let base = config.watchProgressNotifyIntervalMs
        let jitter = base / 10 > 0 ? UInt64.random(in: 0...(base / 10)) : 0
        progressTimer = LoopTimer(loop: loop, timeoutMs: base + jitter) { [unowned self] in
            progressTimer = nil
            services.watch.hub.progressTick(streams: services.watch.openStreams)
            startProgressTimer()
        }
        progressTimer?.unref()
    }

    /// Prometheus text exposition of the server's gauges and counters (etcd's names where one exists).
    func metricsText() -> String {
        let hub = services.watch.hub
        let streams = services.watch.openStreams
        var out = ""
        func metric(_ name: String, _ type: String, _ help: String, _ value: some Numeric) {
            out += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n\(name) \(value)\n"
        }
        metric("etcd_debugging_mvcc_current_revision", "gauge", "The current revision of the store.", store.currentRevision)
        metric("etcd_debugging_mvcc_compact_revision", "gauge", "The last compaction revision of the store.", store.compactRevision)
        metric("etcd_debugging_mvcc_keys_total", "gauge", "Total number of keys.", store.liveKeyCount)
        metric("etcd_mvcc_db_total_size_in_bytes", "gauge", "Total size of the underlying database in bytes.", backend.sizeInUse)
        metric("etcd_server_quota_backend_bytes", "gauge", "Current backend storage quota size in bytes.", config.effectiveQuota)
        metric("etcd_debugging_mvcc_watch_stream_total", "gauge", "Total number of watch streams.", hub.streamCount)
        metric("etcd_debugging_mvcc_watcher_total", "gauge", "Total number of watchers.", hub.watcherCount)
        metric("etcd_debugging_mvcc_slow_watcher_total", "gauge", "Watchers catching up or parked.", hub.unsyncedCount)
        metric("etcd_debugging_mvcc_events_total", "counter", "Events sent to watchers.", hub.stats.eventsSent)
        metric("vigil_watch_responses_total", "counter", "Watch responses sent.", hub.stats.responsesSent)
        metric("vigil_watch_parked_total", "counter", "Times a watcher was parked because its stream was slow.", hub.stats.parked)
        metric("vigil_watch_ring_events", "gauge", "Events held by the watch event ring.", hub.ringEvents)
        metric("vigil_watch_ring_bytes", "gauge", "Approximate bytes held by the watch event ring.", hub.ringBytes)
        metric("vigil_watch_stream_queued_bytes_max", "gauge", "Largest number of unsent bytes queued on one watch stream.",
               streams.map(\.queuedBytes).max() ?? 0)
        metric("vigil_backend_commits_total", "counter", "Group commits made durable.", commits.commits)
        let lessor = services.lessor
        metric("vigil_lease_total", "gauge", "Leases alive.", lessor.count)
        metric("etcd_debugging_lease_granted_total", "counter", "The total number of granted leases.", lessor.stats.granted)
        metric("etcd_debugging_lease_revoked_total", "counter", "The total number of revoked leases.", lessor.stats.revoked)
        metric("etcd_debugging_lease_renewed_total", "counter", "The number of renewed leases seen by the leader.", lessor.stats.renewed)
        out += metrics.text()
        return out
    }

    func connectionClosed(_ c: ClientConnection) {
        connectionObjects[ObjectIdentifier(c)] = nil
    }

    /// Stops accepting connections.
    func shutdown() {
        for l in listeners { l.close() }
        listeners.removeAll()
        progressTimer?.cancel()
        progressTimer = nil
        catchUpTimer?.cancel()
        catchUpTimer = nil
        leaseTimer?.cancel()
        leaseTimer = nil
        autoCompactor?.stop()
        autoCompactor = nil
        compactionTimer?.cancel()
        compactionTimer = nil
        leaseBacklogTimer?.cancel()
        leaseBacklogTimer = nil
    }

    /// Closes listeners and every client connection.
    func closeAll() {
        shutdown()
        for c in Array(connectionObjects.values) { c.close() }
        connectionObjects.removeAll()
    }
}

extension VigilServerCore: MaintenanceBackend {
    func defragment(_ done: @escaping ((any Error)?) -> Void) {
        let backend = self.backend
        var failure: (any Error)?
        let started = loop.nowMilliseconds
        commits.exclusive({
            do { try backend.defragment() } catch { failure = error }
        }, done: { [logger, loop] in
            logger.info("defragmented", metadata: ["took_ms": "\(loop.nowMilliseconds - started)",
                                                   "db_size": "\(backend.lastSizes.allocated)"])
            done(failure)
        })
    }

    func hash(_ done: @escaping (Result<UInt32, any Error>) -> Void) {
        let backend = self.backend
        var result: Result<UInt32, any Error> = .failure(EtcdError.notCapable)
        commits.exclusive({ result = Result { try backend.hash() } }, done: { done(result) })
    }

    func snapshot(_ done: @escaping (Result<String, any Error>) -> Void) {
        let backend = self.backend
        let file = config.dataDir + "/member/snapshot-\(UInt64.random(in: 0...UInt64.max)).db"
        var result: Result<String, any Error> = .failure(EtcdError.notCapable)
        commits.exclusive({
            result = Result {
                try backend.copy(to: file)
                return file
            }
        }, done: { done(result) })
    }
}

/// HTTP/1.1 on the client port: the JSON gateway under `/v3/` (and `/v3beta/`), `/health`,
/// `/version` and `/metrics`.
final class PlainHTTPHandler: HTTP1Handler {
    unowned let core: VigilServerCore
    init(core: VigilServerCore) { self.core = core }

    func handle(_ request: HTTP1Request, _ responder: HTTP1Responder) {
        let path = request.path
        if Gateway.handles(path) {
            core.services.gateway.handle(method: request.method, path: path, body: request.body,
                                         headers: request.headers, HTTP1GatewayResponder(responder))
            return
        }
        responder.respond(plain(request))
    }

    func plain(_ request: HTTP1Request) -> HTTP1Response {
        let get = request.method == "GET" || request.method == "HEAD"
        switch request.path {
        case "/health":
            guard get else { return .error(status: 405, grpcCode: 12, message: "Method Not Allowed") }
            // Unhealthy while an alarm is active, unless the query excludes it (?exclude=NOSPACE).
            let query = request.url.split(separator: "?", maxSplits: 1).dropFirst().first.map(String.init) ?? ""
            let excluded = Set(query.split(separator: "&").compactMap { p -> String? in
                let kv = p.split(separator: "=", maxSplits: 1)
                return kv.count == 2 && kv[0] == "exclude" ? String(kv[1]) : nil
            })
            let alarms = core.services.context.alarms.active
                .map { $0.alarm == .nospace ? "NOSPACE" : "CORRUPT" }.filter { !excluded.contains($0) }
            if let first = alarms.first {
                return HTTP1Response(status: 503, body: Array(#"{"health":"false","reason":"ALARM \#(first)"}"#.utf8))
            }
            return HTTP1Response(status: 200, body: Array(#"{"health":"true"}"#.utf8))
        case "/metrics":
            guard get else { return .error(status: 405, grpcCode: 12, message: "Method Not Allowed") }
            return HTTP1Response(status: 200, contentType: "text/plain; version=0.0.4", body: Array(core.metricsText().utf8))
        case "/version":
            guard get else { return .error(status: 405, grpcCode: 12, message: "Method Not Allowed") }
            return HTTP1Response(status: 200, body: Array(#"{"etcdserver":"\#(EtcdServices.serverVersion)","etcdcluster":"3.4.0"}"#.utf8))
        default:
            return .error(status: 404, grpcCode: 5, message: "Not Found")
        }
    }
}

/// Non-gRPC HTTP/2 requests on one connection (h2c; one per connection, as stream ids are): the same gateway and plain endpoints.
final class PlainHTTP2Requests: PlainHTTP2Handler {
    unowned let core: VigilServerCore
    private var open: [Int32: HTTP2GatewayResponder] = [:]
    init(core: VigilServerCore) { self.core = core }

    func handle(stream: Int32, headers: [HeaderField], body: [UInt8], session: HTTP2Session, flush: @escaping () -> Void) {
        let method = headers.first { $0.name == ":method" }?.value ?? "GET"
        let url = headers.first { $0.name == ":path" }?.value ?? "/"
        let out = HTTP2GatewayResponder(session: session, stream: stream, flush: flush)
        let request = HTTP1Request(method: method, url: url, headers: headers.filter { !$0.name.hasPrefix(":") }, body: body)
        if Gateway.handles(request.path) {
            open[stream] = out
            core.services.gateway.handle(method: method, path: request.path, body: body, headers: request.headers, out)
        } else {
            let r = (core.http1Handler as? PlainHTTPHandler)?.plain(request)
                ?? HTTP1Response.error(status: 404, grpcCode: 5, message: "Not Found")
            out.respond(status: r.status, body: r.body, contentType: r.headers.first?.value ?? "application/json")
        }
    }

    func streamClosed(_ stream: Int32) {
        guard let out = open.removeValue(forKey: stream) else { return }
        out.closed()
    }

    func streamDrained(_ stream: Int32) { open[stream]?.drained() }

    /// The connection went away: every stream still answering hears it.
    func connectionClosed() {
        let all = open.values
        open.removeAll()
        for out in all { out.closed() }
    }
}

/// The gateway's answers written on an HTTP/2 stream.
final class HTTP2GatewayResponder: GatewayResponder {
    let session: HTTP2Session
    let stream: Int32
    let flush: () -> Void
    private var done = false
    var onClose: (() -> Void)?

    init(session: HTTP2Session, stream: Int32, flush: @escaping () -> Void) {
        self.session = session
        self.stream = stream
        self.flush = flush
    }

    func respond(status: Int, body: [UInt8]) { respond(status: status, body: body, contentType: "application/json") }

    func respond(status: Int, body: [UInt8], contentType: String) {
        guard !done else { return }
        done = true
        session.respond(stream, headers: [(":status", String(status)), ("content-type", contentType)], endStream: false)
        session.send(body, on: stream)
        session.finish(stream, trailers: [])
        flush()
    }

    func startStream() {
        session.respond(stream, headers: [(":status", "200"), ("content-type", "application/json")], endStream: false)
        flush()
    }

    func send(_ chunk: [UInt8]) {
        guard !done else { return }
        session.send(chunk, on: stream)
        flush()
    }

    func finish() {
        guard !done else { return }
        done = true
        session.finish(stream, trailers: [])
        flush()
    }

    var queuedBytes: Int { session.queuedBytes(stream) }

    private var onDrained: (() -> Void)?

    func notifyWhenDrained(_ body: @escaping () -> Void) {
        onDrained = body
        session.notifyWhenDrained(stream)
    }

    func drained() {
        let cb = onDrained
        onDrained = nil
        cb?()
    }

    func closed() {
        done = true
        let cb = onClose
        onClose = nil
        cb?()
    }
}

/// The gateway's answers written through an HTTP/1.1 responder.
final class HTTP1GatewayResponder: GatewayResponder {
    let r: HTTP1Responder
    init(_ r: HTTP1Responder) { self.r = r }
    func respond(status: Int, body: [UInt8]) { r.respond(HTTP1Response(status: status, body: body)) }
    func startStream() { r.startStream() }
    func send(_ chunk: [UInt8]) { r.send(chunk) }
    func finish() { r.finish() }
    var queuedBytes: Int { r.queuedBytes }
    var onClose: (() -> Void)? {
        get { r.onClose }
        set { r.onClose = newValue }
    }
    func notifyWhenDrained(_ body: @escaping () -> Void) { r.notifyWhenDrained(body) }
}

/// A Vigil server: an etcd v3–compatible key-value store on one libuv loop.
///
/// `run()` serves on the calling thread until `stop()`; `start()` serves on a thread of its own
/// (for embedding) and returns once the listeners are bound.
public final class VigilServer: @unchecked Sendable {
    public let configuration: Configuration
    private let logger: Logger
    private let lock = NSLock()
    private var inbox: [() -> Void] = []
    private var wakeup: Wakeup?
    private var thread: Thread?
    private let finished = DispatchSemaphore(value: 0)
    /// Ports bound, in the order of `listenClientURLs` (useful with port 0).
    public private(set) var ports: [Int] = []

    public init(configuration: Configuration, logger: Logger = Logger(label: "vigil")) {
        self.configuration = configuration
        self.logger = logger
    }

    /// Serves on the calling thread until `stop()` or SIGINT/SIGTERM.
    public func run(onReady: (([Int]) -> Void)? = nil) throws {
        // A client that goes away while we write must not kill the process: write errors are
        // handled per connection.
        signal(SIGPIPE, SIG_IGN)
        let loop = try EventLoop()
        let core = try VigilServerCore(loop: loop, config: configuration, logger: logger)
        let wake = Wakeup(loop: loop) { [unowned self] in drainInbox() }
        wake.unref()
        var signals: [SignalWatcher] = []
        var stopping = false
        func stopLoop() {
            guard !stopping else { return }
            stopping = true
            core.shutdown()
            loop.stop()
        }
        lock.withLock { wakeup = wake }
        stopLoopMarker = stopLoop
        for sig in [SIGINT, SIGTERM] {
            signals.append(SignalWatcher(loop: loop, signal: sig) { [logger] s in
                logger.info("received signal, shutting down", metadata: ["signal": "\(s)"])
                stopLoop()
            })
        }
        try core.startAutoCompaction()
        ports = try core.listen()
        core.startProgressTimer()
        core.startLeaseTimer()
        logger.info("ready to serve client requests")
        for (url, port) in zip(configuration.listenClientURLs, ports) {
            logger.notice("serving insecure client requests on \(url) (port \(port)), this is strongly discouraged!")
        }
        self.core = core
        onReady?(ports)
        drainInbox()
        loop.run()
        // Close everything, then let an in-flight group commit (and the ones it chains) finish.
        core.closeAll()
        for s in signals { s.close() }
        lock.withLock { wakeup = nil }
        wake.close()
        loop.shutdown()
        loop.drain()
        self.core = nil
        stopLoopMarker = nil
        logger.info("stopped")
    }

    private var core: VigilServerCore?
    private var stopLoopMarker: (() -> Void)?

    /// Starts serving on a new thread; returns the bound ports once ready, or throws the start error.
    @discardableResult
    public func start() throws -> [Int] {
        let ready = DispatchSemaphore(value: 0)
        let result = Box<Result<[Int], any Error>>(.success([]))
        let t = Thread { [self] in
            do {
                try run { ports in
                    result.value = .success(ports)
                    ready.signal()
                }
            } catch {
                result.value = .failure(error)
                ready.signal()
            }
            finished.signal()
        }
        t.stackSize = 8 << 20
        thread = t
        t.start()
        ready.wait()
        return try result.value.get()
    }

    /// Stops the server (from any thread) and, if it runs on its own thread, waits for it to end.
    public func stop() {
        submit { [self] in stopLoopMarker?() }
        if thread != nil {
            finished.wait()
            thread = nil
        }
    }

    /// Runs `body` on the loop (thread-safe).
    func submit(_ body: @escaping () -> Void) {
        lock.withLock {
            inbox.append(body)
            wakeup?.signal()
        }
    }

    private func drainInbox() {
        let work = lock.withLock { () -> [() -> Void] in
            let w = inbox
            inbox.removeAll()
            return w
        }
        for w in work { w() }
    }

    /// Writes `key` from inside the process (for embedding programs); waits until it is durable.
    /// Returns the revision of the write.
    public func put(_ key: [UInt8], _ value: [UInt8]) throws -> Int64 {
        var req = Etcdserverpb_PutRequest()
        req.key = Data(key)
        req.value = Data(value)
        let done = DispatchSemaphore(value: 0)
        let result = Box<Result<Int64, any Error>>(.failure(EtcdError.stopped))
        submit { [self] in
            guard let core else { done.signal(); return }
            do {
                let (resp, rev) = try core.services.kv.put(req)
                core.commits.whenDurable(rev) {
                    result.value = .success(resp.header.revision)
                    done.signal()
                }
            } catch {
                result.value = .failure(error)
                done.signal()
            }
        }
        done.wait()
        return try result.value.get()
    }

    /// Reads `key` at the latest durable revision (for embedding programs).
    public func get(_ key: [UInt8]) throws -> [UInt8]? {
        var req = Etcdserverpb_RangeRequest()
        req.key = Data(key)
        let done = DispatchSemaphore(value: 0)
        let result = Box<Result<[UInt8]?, any Error>>(.failure(EtcdError.stopped))
        submit { [self] in
            defer { done.signal() }
            guard let core else { return }
            result.value = Result { try core.services.kv.range(req).kvs.first.map { [UInt8]($0.value) } }
        }
        done.wait()
        return try result.value.get()
    }
}

/// A mutable cell handed between the loop thread and a waiting caller (guarded by a semaphore).
final class Box<T>: @unchecked Sendable {
    var value: T
    init(_ value: T) { self.value = value }
}
