import EtcdAPI
import EtcdProto
import EventLoop
import Foundation
import Logging
import ServiceLifecycle
import SwiftProtobuf
// The in-process API answers with the client library's types (KeyValue, WatchSequence, …).
@_exported import VigilClient
import VigilCore
import WatchHub

/// A Vigil server: an etcd v3–compatible key-value store on one libuv loop.
///
/// `run()` serves on the calling thread until `stop()`; `start()` serves on a thread of its own
/// (for embedding) and returns once the listeners are bound. Other threads reach the loop only
/// through `submit`, one wakeup.
public final class VigilServer: @unchecked Sendable {
    /// Vigil's own version.
    public static let version = "0.7.0"
    /// The etcd version Vigil answers as (Status, `/version`, `--version`).
    public static var etcdVersion: String { EtcdServices.serverVersion }

    public let configuration: Configuration
    private let logger: Logger
    /// Guards `inbox` and `stopLoop` (touched from any thread).
    private let lock = NSLock()
    /// The way into the loop while it serves.
    private var inbox: LoopInbox?
    private var stopLoop: (() -> Void)?
    /// Entered while a server thread of ours runs (any number of callers may wait for its end).
    private let running = DispatchGroup()
    /// Guarded by `lock`: a stop was asked for; the server thread ended; tasks waiting for that.
    private var stopRequested = false
    private var ended = false
    private var endWaiters: [CheckedContinuation<Void, Never>] = []
    /// The running core, touched on its loop only.
    private var core: LoopBound<VigilServerCore?>?
    /// Ports bound, in the order of `listenClientURLs` (useful with port 0).
    public private(set) var ports: [Int] = []

    public init(configuration: Configuration, logger: Logger = Logger(label: "vigil")) {
        self.configuration = configuration
        self.logger = logger
    }

    /// Serves on the calling thread until `stop()` or, with `handleSignals`, SIGINT/SIGTERM.
    public func run(handleSignals: Bool = true, onReady: (([Int]) -> Void)? = nil) throws {
        // A client that goes away while we write must not kill the process: write errors are
        // handled per connection.
        signal(SIGPIPE, SIG_IGN)
        let loop = try EventLoop()
        let core = try VigilServerCore(loop: loop, config: configuration, logger: logger)
        if let mirror = core.mirror {
            // Serve nothing before the copy is loaded: a client would see an empty store.
            var loaded = false
            logger.info("mirror: loading from upstream \(mirror.options.endpoints)")
            mirror.start { loaded = true }
            loop.run(forAtMost: 1e9) { [self] in loaded || lock.withLock { stopRequested } }
            if !loaded {
                core.closeAll()
                loop.shutdown()
                loop.drain()
                throw EtcdClientError.closed
            }
        }
        do {
            ports = try core.start()
        } catch {
            // Nothing was reachable from other threads yet: close what was opened and fail.
            core.closeAll()
            loop.shutdown()
            loop.drain()
            throw error
        }
        let inbox = LoopInbox(loop: loop)
        var signals: [SignalWatcher] = []
        var stopping = false
        let stop = {
            guard !stopping else { return }
            stopping = true
            core.shutdown()
            loop.stop()
        }
        for sig in handleSignals ? [SIGINT, SIGTERM] : [] {
            signals.append(
                SignalWatcher(loop: loop, signal: sig) { [logger] s in
                    logger.info("received signal, shutting down", metadata: ["signal": "\(s)"])
                    stop()
                })
        }
        self.core = LoopBound(core, loop: loop)
        let stopNow = lock.withLock {
            self.inbox = inbox
            stopLoop = stop
            return stopRequested
        }
        if stopNow { stop() }
        logger.info("ready to serve client requests")
        for (url, port) in zip(configuration.listenClientURLs, ports) {
            if url.hasPrefix("https://") {
                logger.notice("serving client requests on \(url) (port \(port))")
            } else {
                logger.notice(
                    "serving insecure client requests on \(url) (port \(port)), this is strongly discouraged!")
            }
        }
        onReady?(ports)
        loop.run()
        // Close everything, then let an in-flight group commit (and the ones it chains, with what
        // was still pending) finish.
        lock.withLock {
            self.inbox = nil
            stopLoop = nil
        }
        core.closeAll()
        for s in signals { s.close() }
        self.core = nil
        inbox.close()  // calls that came too late hear that the server stopped
        loop.shutdown()
        loop.drain()
        logger.info("stopped")
    }

    /// Starts serving on a new thread; returns the bound ports once ready, or throws the start
    /// error. With `handleSignals`, SIGINT and SIGTERM stop it.
    @discardableResult
    public func start(handleSignals: Bool = true) throws -> [Int] {
        let ready = DispatchSemaphore(value: 0)
        let result = Handoff<Result<[Int], any Error>>(.success([]))
        launch(handleSignals: handleSignals) { r in
            result.value = r
            ready.signal()
        }
        ready.wait()
        return try result.value.get()
    }

    /// Runs the server on a thread of its own; `ready` gets the ports or the start error.
    private func launch(handleSignals: Bool, ready: @escaping @Sendable (Result<[Int], any Error>) -> Void) {
        let t = Thread { [self] in
            do {
                try run(handleSignals: handleSignals) { ports in ready(.success(ports)) }
            } catch {
                ready(.failure(error))
            }
            let waiting = lock.withLock {
                ended = true
                let w = endWaiters
                endWaiters = []
                return w
            }
            for w in waiting { w.resume() }
            running.leave()
        }
        t.stackSize = 8 << 20
        lock.withLock { ended = false }
        running.enter()
        t.start()
    }

    /// Stops the server (from any thread) and, if it runs on its own thread, waits for it to end.
    public func stop() {
        requestStop()
        running.wait()
        lock.withLock { stopRequested = false }  // a later start() serves again
    }

    /// Asks the server to stop, without waiting (from any thread).
    public func requestStop() {
        lock.withLock { stopRequested = true }
        submit { [self] in lock.withLock { stopLoop }?() }
    }

    /// Returns once the server's thread has ended.
    private func ended() async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let now = lock.withLock {
                if ended { return true }
                endWaiters.append(c)
                return false
            }
            if now { c.resume() }
        }
    }

    /// Runs `body` on the loop (thread-safe; the one way in from other threads). False when the
    /// server is not serving: `body` will not run.
    @discardableResult
    func submit(_ body: @escaping () -> Void) -> Bool {
        lock.withLock { inbox }?.submit(body) ?? false
    }

    /// Runs `body` with the core on the loop and waits for the answer it passes on; `body` returns
    /// what stops its work if the task is cancelled.
    private func perform<T: Sendable>(
        _ body: @escaping (VigilServerCore, @escaping (Result<T, any Error>) -> Void) -> (() -> Void)?
    ) async throws -> T {
        guard let inbox = lock.withLock({ inbox }) else { throw EtcdClientError.closed }
        return try await inbox.perform(closed: EtcdClientError.closed) { [self] done in
            guard let core = core?.value else {
                done(.failure(EtcdClientError.closed))
                return nil
            }
            return body(core, done)
        }
    }

    // MARK: The in-process API
    //
    // The operations of etcd's API without a socket, answered with the client library's types.
    // They run on the loop as a client's requests do (in mirror mode, writes are forwarded to
    // the cluster), as root: the program embedding the server is trusted.

    /// Reads a range of keys.
    public func get(_ range: KeyRange, _ options: RangeOptions = RangeOptions()) async throws -> RangeResult {
        let resp: Etcdserverpb_RangeResponse = try await call(.range, EtcdMessages.range(range, options))
        return EtcdMessages.result(resp)
    }

    /// Reads one key (nil: it does not exist).
    public func get(_ key: String, _ options: RangeOptions = RangeOptions()) async throws -> KeyValue? {
        try await get(.key(key), options).kvs.first
    }

    /// Writes a key; returns once it is durable (in mirror mode: once upstream has it and the
    /// mirror applied it).
    @discardableResult
    public func put(_ key: [UInt8], _ value: [UInt8], _ options: PutOptions = PutOptions()) async throws -> PutResult {
        let resp: Etcdserverpb_PutResponse = try await call(.put, EtcdMessages.put(key, value, options))
        return EtcdMessages.result(resp)
    }

    @discardableResult
    public func put(_ key: String, _ value: String, _ options: PutOptions = PutOptions()) async throws -> PutResult {
        try await put(Array(key.utf8), Array(value.utf8), options)
    }

    @discardableResult
    public func delete(_ range: KeyRange, prevKV: Bool = false) async throws -> DeleteResult {
        let resp: Etcdserverpb_DeleteRangeResponse = try await call(
            .deleteRange, EtcdMessages.delete(range, prevKV: prevKV))
        return EtcdMessages.result(resp)
    }

    public func txn(_ txn: Txn) async throws -> TxnResult {
        let resp: Etcdserverpb_TxnResponse = try await call(.txn, EtcdMessages.txn(txn))
        return EtcdMessages.result(resp)
    }

    public func grantLease(ttl: Int64, id: Int64 = 0) async throws -> Lease {
        let resp: Etcdserverpb_LeaseGrantResponse = try await call(
            .leaseGrant, EtcdMessages.leaseGrant(ttl: ttl, id: id))
        return Lease(id: resp.id, ttl: resp.ttl)
    }

    public func revokeLease(_ id: Int64) async throws {
        let _: Etcdserverpb_LeaseRevokeResponse = try await call(.leaseRevoke, EtcdMessages.leaseRevoke(id))
    }

    public func timeToLive(_ id: Int64, keys: Bool = false) async throws -> LeaseInfo {
        let resp: Etcdserverpb_LeaseTimeToLiveResponse = try await call(
            .leaseTimeToLive, EtcdMessages.timeToLive(id, keys: keys))
        return EtcdMessages.result(resp)
    }

    /// One keep-alive: the lease's new TTL. Throws `EtcdClientError.leaseExpired` when the lease
    /// is gone (as the client does).
    public func keepAliveOnce(_ id: Int64) async throws -> Int64 {
        try await perform { core, done in
            core.keepAlive(id) { result in
                switch result {
                case .success(let ttl) where ttl <= 0: done(.failure(EtcdClientError.leaseExpired(id)))
                default: done(result.mapError { $0 })
                }
            }
            return nil
        }
    }

    /// Keeps a lease alive until the task is cancelled (`CancellationError`) or the lease ends
    /// (`EtcdClientError.leaseExpired`): renewed on the loop a third of the way through each TTL.
    public func keepAlive(_ id: Int64) async throws {
        let _: Bool = try await perform { core, done in
            let keeper = LocalLeaseKeeper(core: core, id: id) { done(.failure($0)) }
            keeper.renew()
            return { keeper.stop() }
        }
    }

    /// Watches a range, fed by the watch hub as a gRPC stream is: returns once the watch is made;
    /// the sequence ends when its task is cancelled or its iterator is dropped. A consumer that
    /// stops reading is parked by the hub once 1 MiB is unread, and catches up from the event
    /// ring (or the store) when it reads again, so memory stays bounded.
    public func watch(_ range: KeyRange, _ options: WatchOptions = WatchOptions()) async throws -> WatchSequence {
        let create = try EtcdMessages.watchCreate(range, options)
        guard let inbox = lock.withLock({ inbox }) else { throw EtcdClientError.closed }
        let stream = LoopFedStream<WatchFeed>(inbox: inbox, lowWater: 256 * 1024)
        let _: Bool = try await perform { core, done in
            let w = InProcessWatch(core: core, stream: stream) { done($0.map { true }.mapError { $0 }) }
            w.start(create)
            return { w.close() }
        }
        return WatchSequence(stream)
    }

    /// Runs a unary method as a client's request would run (a mirror forwards writes), as root.
    private func call<Req: SwiftProtobuf.Message, Resp: SwiftProtobuf.Message>(
        _ method: EtcdMethod, _ req: Req
    ) async throws -> Resp {
        let size = (try? req.serializedBytes() as [UInt8])?.count ?? 0
        return try await perform { core, done in
            guard let m = core.services.unary(method) else {
                done(.failure(EtcdClientError.rpc(code: GRPCCode.unimplemented.rawValue, message: "no \(method)")))
                return nil
            }
            m.serve(
                req, RequestInfo(token: nil, commonName: VigilServerCore.inProcessUser, size: size),
                AnswerSink { result in
                    switch result {
                    case .success(let r as Resp): done(.success(r))
                    case .success:
                        done(.failure(EtcdClientError.rpc(code: GRPCCode.internal.rawValue, message: "bad answer")))
                    case .failure(let e): done(.failure(EtcdClientError(e.status)))
                    }
                })
            return nil
        }
    }
}

/// A unary method's answer, handed to a closure.
private final class AnswerSink: ReplySink {
    let done: (Result<any SwiftProtobuf.Message, EtcdError>) -> Void
    init(_ done: @escaping (Result<any SwiftProtobuf.Message, EtcdError>) -> Void) { self.done = done }
    func ok(_ response: any SwiftProtobuf.Message) { done(.success(response)) }
    func fail(_ error: EtcdError) { done(.failure(error)) }
}

extension VigilServerCore {
    /// The user in-process calls run as (with auth on): root.
    static let inProcessUser = "root"

    func keepAlive(_ id: Int64, _ done: @escaping (Result<Int64, EtcdClientError>) -> Void) {
        services.keepAlive(
            EtcdMessages.keepAlive(id), credentials: Credentials(token: nil, commonName: Self.inProcessUser)
        ) { result in
            done(result.map(\.ttl).mapError { EtcdClientError($0.status) })
        }
    }
}

/// Renews one lease from inside the process until stopped or the lease is gone.
final class LocalLeaseKeeper {
    private unowned let core: VigilServerCore
    private let id: Int64
    private let failed: (EtcdClientError) -> Void
    private var timer: LoopTimer?
    private var stopped = false

    init(core: VigilServerCore, id: Int64, failed: @escaping (EtcdClientError) -> Void) {
        self.core = core
        self.id = id
        self.failed = failed
    }

    func renew() {
        guard !stopped else { return }
        core.inProcessKeepers[ObjectIdentifier(self)] = self
        core.keepAlive(id) { [weak self] result in
            guard let self, !stopped else { return }
            switch result {
            case .failure(let e): finish(e)
            case .success(let ttl) where ttl <= 0: finish(.leaseExpired(id))
            case .success(let ttl):
                timer = LoopTimer(loop: core.loop, timeoutMs: UInt64(max(ttl * 1000 / 3, 500))) { [weak self] in
                    self?.timer = nil
                    self?.renew()
                }
            }
        }
    }

    /// Ends it: its caller hears `e`.
    func finish(_ e: EtcdClientError) {
        guard !stopped else { return }
        stop()
        failed(e)
    }

    func stop() {
        stopped = true
        timer?.cancel()
        timer = nil
        core.inProcessKeepers[ObjectIdentifier(self)] = nil
    }
}

/// An in-process watch: a watch session of its own on the hub, whose responses (encoded once for
/// gRPC, shared with the gRPC streams) go to an async consumer through a bounded stream. The
/// consumer decodes them; the hub parks the session while the consumer lags.
final class InProcessWatch: WatchSink {
    let encoder: any WatchEncoder
    private let stream: LoopFedStream<WatchFeed>
    private var session: WatchSession?
    private var created: ((Result<Void, EtcdClientError>) -> Void)?
    private unowned let core: VigilServerCore

    init(
        core: VigilServerCore, stream: LoopFedStream<WatchFeed>,
        created: @escaping (Result<Void, EtcdClientError>) -> Void
    ) {
        self.core = core
        self.stream = stream
        self.created = created
        encoder = core.services.watch.grpcEncoder
    }

    func start(_ create: Etcdserverpb_WatchCreateRequest) {
        let session = core.services.watch.open(
            self, credentials: Credentials(token: nil, commonName: VigilServerCore.inProcessUser))
        self.session = session
        core.inProcessWatches[ObjectIdentifier(self)] = self
        stream.onCancel = { [weak self] in self?.close() }
        stream.onDrained = { [weak self] in self?.session?.drained() }
        var req = Etcdserverpb_WatchRequest()
        req.createRequest = create
        session.receive(req)
    }

    func send(_ message: [UInt8]) {
        if let c = created {
            // The answer to the create: decoded here, once.
            guard message.count >= 5, let resp = try? Etcdserverpb_WatchResponse(serializedBytes: message[5...]) else {
                return
            }
            created = nil
            if resp.created && !resp.canceled { return c(.success(())) }
            close()
            return c(
                .failure(
                    resp.compactRevision > 0
                        ? .compacted(revision: resp.compactRevision) : .watchCanceled(resp.cancelReason)))
        }
        stream.push(.response(message), size: message.count)
    }

    var queuedBytes: Int { stream.queuedBytes }

    func notifyWhenDrained() { stream.notifyWhenDrained() }

    /// The consumer went away, or the server stops: the session closes.
    func close() {
        session?.close()
        session = nil
        core.inProcessWatches[ObjectIdentifier(self)] = nil
        stream.finish(throwing: EtcdClientError.closed)
        if let c = created {
            created = nil
            c(.failure(.closed))
        }
    }
}

/// swift-service-lifecycle: run in a `ServiceGroup`, the server stops gracefully (open calls
/// answered, pending writes committed) on the group's shutdown signals or when its task is
/// cancelled. The `vigil` command itself runs this way.
extension VigilServer: Service {
    public func run() async throws {
        // The handler covers the start too: a mirror loading its copy stops when asked.
        try await withTaskCancellationOrGracefulShutdownHandler {
            do {
                let _: [Int] = try await withCheckedThrowingContinuation { c in
                    launch(handleSignals: false) { c.resume(with: $0) }
                }
            } catch {
                await ended()
                if lock.withLock({ stopRequested }) { return }  // stopped while starting: not a failure
                throw error
            }
            await ended()
        } onCancelOrGracefulShutdown: { [self] in
            requestStop()
        }
    }
}
