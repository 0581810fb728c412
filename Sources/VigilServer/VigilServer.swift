import EtcdAPI
import EtcdProto
import EventLoop
import Foundation
import Logging
import MVCC
import SwiftProtobuf
import VigilCore

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
    /// Guards `inbox`, `wakeup` and `stopLoop` (touched from any thread).
    private let lock = NSLock()
    private var inbox: [() -> Void] = []
    private var wakeup: Wakeup?
    private var stopLoop: (() -> Void)?
    private var thread: Thread?
    private let finished = DispatchSemaphore(value: 0)
    /// The running core, touched on its loop only.
    private var core: LoopBound<VigilServerCore?>?
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
        if let mirror = core.mirror {
            // Serve nothing before the copy is loaded: a client would see an empty store.
            var loaded = false
            logger.info("mirror: loading from upstream \(mirror.options.endpoints)")
            mirror.start { loaded = true }
            loop.run(forAtMost: 1e9) { loaded }
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
        let wake = Wakeup(loop: loop) { [unowned self] in drainInbox() }
        wake.unref()
        var signals: [SignalWatcher] = []
        var stopping = false
        let stop = {
            guard !stopping else { return }
            stopping = true
            core.shutdown()
            loop.stop()
        }
        for sig in [SIGINT, SIGTERM] {
            signals.append(
                SignalWatcher(loop: loop, signal: sig) { [logger] s in
                    logger.info("received signal, shutting down", metadata: ["signal": "\(s)"])
                    stop()
                })
        }
        self.core = LoopBound(core, loop: loop)
        lock.withLock {
            wakeup = wake
            stopLoop = stop
        }
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
        drainInbox()
        loop.run()
        // Close everything, then let an in-flight group commit (and the ones it chains, with what
        // was still pending) finish.
        lock.withLock {
            wakeup = nil
            stopLoop = nil
        }
        core.closeAll()
        for s in signals { s.close() }
        wake.close()
        loop.shutdown()
        loop.drain()
        self.core = nil
        drainInbox()  // calls that came too late hear that the server stopped
        logger.info("stopped")
    }

    /// Starts serving on a new thread; returns the bound ports once ready, or throws the start error.
    @discardableResult
    public func start() throws -> [Int] {
        let ready = DispatchSemaphore(value: 0)
        let result = Handoff<Result<[Int], any Error>>(.success([]))
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
        submit { [self] in lock.withLock { stopLoop }?() }
        if thread != nil {
            finished.wait()
            thread = nil
        }
    }

    /// Runs `body` on the loop (thread-safe; the one way in from other threads). False when the
    /// server is not serving: `body` will not run. (Work queued as the loop stops runs once it
    /// has stopped, finding no core.)
    @discardableResult
    func submit(_ body: @escaping () -> Void) -> Bool {
        lock.withLock {
            guard let wakeup else { return false }
            inbox.append(body)
            wakeup.signal()
            return true
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

    /// Runs `body` with the core on the loop and waits for its answer (for the embedding API).
    private func onLoop<T>(
        _ body: @escaping (VigilServerCore, @escaping (Result<T, EtcdError>) -> Void) -> Void
    ) throws -> T {
        let done = DispatchSemaphore(value: 0)
        let result = Handoff<Result<T, EtcdError>>(.failure(.stopped))
        let queued = submit { [self] in
            guard let core = core?.value else {
                done.signal()
                return
            }
            body(core) { r in
                result.value = r
                done.signal()
            }
        }
        guard queued else { throw EtcdError.stopped }
        done.wait()
        return try result.value.get()
    }

    /// Writes `key` from inside the process (for embedding programs); waits until it is durable
    /// (in mirror mode: until upstream has it and the mirror applied it). Returns the revision of
    /// the write.
    public func put(_ key: [UInt8], _ value: [UInt8]) throws -> Int64 {
        var req = Etcdserverpb_PutRequest()
        req.key = Data(key)
        req.value = Data(value)
        let resp: Etcdserverpb_PutResponse = try call(.put, req)
        return resp.header.revision
    }

    /// Reads `key`, linearizably (for embedding programs).
    public func get(_ key: [UInt8]) throws -> [UInt8]? {
        var req = Etcdserverpb_RangeRequest()
        req.key = Data(key)
        let resp: Etcdserverpb_RangeResponse = try call(.range, req)
        return resp.kvs.first.map { [UInt8]($0.value) }
    }

    /// Runs a unary method as a client's request would run (a mirror forwards writes).
    private func call<Req: SwiftProtobuf.Message, Resp: SwiftProtobuf.Message>(
        _ method: EtcdMethod, _ req: Req
    ) throws -> Resp {
        try onLoop { core, answer in
            guard let m = core.services.unary(method) else { return answer(.failure(.internal("no \(method)"))) }
            m.serve(
                req, RequestInfo(token: nil, size: (try? req.serializedBytes() as [UInt8])?.count ?? 0),
                AnswerSink { result in
                    answer(result.flatMap { ($0 as? Resp).map { .success($0) } ?? .failure(.internal("bad answer")) })
                })
        }
    }

    /// Calls `handler` with every change to a key under `prefix` (empty: every key) once it is
    /// durable, in revision order, on the server's loop thread (keep it short). Returns a handle
    /// whose `cancel()` stops it. In mirror mode these are upstream's changes, at its revisions.
    public func watch(
        prefix: [UInt8], _ handler: @escaping @Sendable (WatchEvent) -> Void
    ) throws -> LocalWatchHandle {
        let id: ObjectIdentifier = try onLoop { core, answer in
            let w = LocalWatch(prefix: prefix, handler: handler)
            core.store.addObserver(w)
            core.localWatches[ObjectIdentifier(w)] = w
            answer(.success(ObjectIdentifier(w)))
        }
        return LocalWatchHandle { [weak self] in
            self?.submit { [weak self] in
                guard let core = self?.core?.value, let w = core.localWatches.removeValue(forKey: id) else { return }
                core.store.removeObserver(w)
            }
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

/// A change seen by an in-process watch.
public struct WatchEvent: Sendable {
    public enum Kind: Sendable { case put, delete }
    public var kind: Kind
    public var key: [UInt8]
    /// The new value (empty for a delete).
    public var value: [UInt8]
    /// The revision of the change.
    public var revision: Int64
    /// The key's version after it (0 after a delete).
    public var version: Int64
}

/// Stops an in-process watch.
public final class LocalWatchHandle: Sendable {
    private let stop: @Sendable () -> Void
    init(_ stop: @escaping @Sendable () -> Void) { self.stop = stop }
    public func cancel() { stop() }
}

/// An in-process watcher: the store's changes under a prefix, held until durable.
final class LocalWatch: StoreObserver {
    private let prefix: [UInt8]
    private let handler: (WatchEvent) -> Void
    private var pending: [WatchEvent] = []

    init(prefix: [UInt8], handler: @escaping (WatchEvent) -> Void) {
        self.prefix = prefix
        self.handler = handler
    }

    func store(_ store: KVStore, wrote events: [Event], at revision: Int64) {
        for e in events where e.kv.key.starts(with: prefix) {
            pending.append(
                WatchEvent(
                    kind: e.kind == .put ? .put : .delete, key: e.kv.key, value: e.kv.value, revision: revision,
                    version: e.kv.version))
        }
    }

    func store(_ store: KVStore, committedThrough revision: Int64) {
        guard !pending.isEmpty else { return }
        let n = pending.firstIndex { $0.revision > revision } ?? pending.count
        let ready = pending[..<n]
        pending.removeFirst(n)
        for e in ready { handler(e) }
    }
}
