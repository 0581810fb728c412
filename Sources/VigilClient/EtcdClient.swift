import EtcdProto
import EventLoop
import Foundation
import GRPC
import HTTP2
import SwiftProtobuf
import TLS
import VigilCore

/// An etcd v3 client for Swift programs, with async/await: KV, transactions, watches as
/// `AsyncSequence`, leases, locks and elections, auth and TLS, several endpoints with failover.
/// It talks to etcd or Vigil alike.
///
/// ```swift
/// let client = try EtcdClient(endpoints: ["127.0.0.1:2379"])
/// try await client.put("config/mode", "fast")
/// let watch = try await client.watch(.prefix("config/"))
/// for try await batch in watch {
///     for e in batch.events { print(e.kind, e.kv.keyString, e.kv.valueString) }
/// }
/// ```
///
/// Calls run on one event loop thread of the client's own (the same loop and HTTP/2 code Vigil
/// serves with); every method may be called from any task.
public final class EtcdClient: Sendable {
    /// TLS settings: the CA file the servers' certificates chain to (nil: the system's), a
    /// client certificate and its key, or no verification at all.
    public typealias TLSConfiguration = TLSContext.ClientConfig

    public struct Configuration: Sendable {
        /// `host:port`, `http://host:port` or `https://host:port`, tried in turn.
        public var endpoints: [String]
        /// With a user, the client authenticates on each connection and sends the token.
        public var username: String?
        public var password: String?
        /// TLS settings (an `https://` endpoint without them uses the system's CAs).
        public var tls: TLSConfiguration?
        /// Bytes of watch events received and not yet read past which the client stops reading
        /// watch responses (the server then holds them), until the consumer catches up.
        public var watchBufferBytes = 4 << 20

        public init(endpoints: [String]) { self.endpoints = endpoints }
    }

    public let configuration: Configuration
    private let thread: LoopThread
    private let core: LoopBound<ClientCore>

    public convenience init(endpoints: [String]) throws {
        try self.init(Configuration(endpoints: endpoints))
    }

    public init(_ configuration: Configuration) throws {
        let endpoints = configuration.endpoints.compactMap(UpstreamEndpoint.parse)
        guard !endpoints.isEmpty, endpoints.count == configuration.endpoints.count else {
            throw EtcdClientError.invalidArgument("bad endpoints: \(configuration.endpoints)")
        }
        var tls = configuration.tls
        if tls == nil && configuration.endpoints.contains(where: { $0.hasPrefix("https://") }) {
            tls = TLSContext.ClientConfig()
        }
        self.configuration = configuration
        thread = try LoopThread(name: "etcd-client")
        let made = Made()
        let ready = DispatchSemaphore(value: 0)
        let loop = thread.loop
        thread.inbox.submit {
            made.result = Result {
                let context = try tls.map { c throws(TLSError) in try TLSContext.client(c) }
                return LoopBound(
                    ClientCore(loop: loop, endpoints: endpoints, tls: context, configuration: configuration), loop: loop
                )
            }
            ready.signal()
        }
        ready.wait()
        do {
            core = try made.result!.get()
        } catch {
            thread.shutdown()
            throw error
        }
    }

    private final class Made: @unchecked Sendable {
        var result: Result<LoopBound<ClientCore>, any Error>?
    }

    deinit { close() }

    /// Closes the connections; calls in flight and watches end with `EtcdClientError.closed`.
    public func close() {
        let core = core
        thread.shutdown { core.value.close() }
    }

    // MARK: KV

    /// Reads a range of keys.
    public func get(_ range: KeyRange, _ options: RangeOptions = RangeOptions()) async throws -> RangeResult {
        let resp: Etcdserverpb_RangeResponse = try await call(.range, EtcdMessages.range(range, options), retry: true)
        return EtcdMessages.result(resp)
    }

    /// Reads one key (nil: it does not exist).
    public func get(_ key: String, _ options: RangeOptions = RangeOptions()) async throws -> KeyValue? {
        try await get(.key(key), options).kvs.first
    }

    /// Writes a key.
    @discardableResult
    public func put(_ key: [UInt8], _ value: [UInt8], _ options: PutOptions = PutOptions()) async throws -> PutResult {
        let resp: Etcdserverpb_PutResponse = try await call(.put, EtcdMessages.put(key, value, options), retry: false)
        return EtcdMessages.result(resp)
    }

    @discardableResult
    public func put(_ key: String, _ value: String, _ options: PutOptions = PutOptions()) async throws -> PutResult {
        try await put(Array(key.utf8), Array(value.utf8), options)
    }

    /// Deletes a range of keys.
    @discardableResult
    public func delete(_ range: KeyRange, prevKV: Bool = false) async throws -> DeleteResult {
        let resp: Etcdserverpb_DeleteRangeResponse = try await call(
            .deleteRange, EtcdMessages.delete(range, prevKV: prevKV), retry: false)
        return EtcdMessages.result(resp)
    }

    /// Runs a transaction (one revision for all its writes).
    public func txn(_ txn: Txn) async throws -> TxnResult {
        let resp: Etcdserverpb_TxnResponse = try await call(.txn, EtcdMessages.txn(txn), retry: false)
        return EtcdMessages.result(resp)
    }

    /// Drops the history before `revision`.
    public func compact(_ revision: Int64, physical: Bool = false) async throws {
        var req = Etcdserverpb_CompactionRequest()
        req.revision = revision
        req.physical = physical
        let _: Etcdserverpb_CompactionResponse = try await call(.compact, req, retry: false)
    }

    // MARK: Watch

    /// Watches a range. Returns once the server has made the watch: from then on every change is
    /// delivered, in revision order, once each, also across reconnections (the watch resumes
    /// after the last revision delivered, on another endpoint if need be). The sequence throws
    /// `EtcdClientError.compacted` when the revisions it needs are gone, and ends when its
    /// task is cancelled or its iterator is dropped (the server's watch is then canceled).
    public func watch(_ range: KeyRange, _ options: WatchOptions = WatchOptions()) async throws -> WatchSequence {
        let create = try EtcdMessages.watchCreate(range, options)
        let stream = LoopFedStream<WatchFeed>(inbox: thread.inbox, lowWater: configuration.watchBufferBytes / 4)
        let core = core
        let limit = configuration.watchBufferBytes
        try await thread.inbox.perform(closed: EtcdClientError.closed) {
            (done: @escaping (Result<Bool, any Error>) -> Void) in
            let w = ClientWatch(core: core.value, create: create, stream: stream, limit: limit)
            w.start { done($0.map { true }.mapError { $0 }) }
            return { w.end(.closed) }
        }
        return WatchSequence(stream)
    }

    // MARK: Leases

    /// Grants a lease of `ttl` seconds (`id` 0: the server picks one).
    public func grantLease(ttl: Int64, id: Int64 = 0) async throws -> Lease {
        let resp: Etcdserverpb_LeaseGrantResponse = try await call(
            .leaseGrant, EtcdMessages.leaseGrant(ttl: ttl, id: id), retry: false)
        if !resp.error.isEmpty { throw EtcdClientError.rpc(code: GRPCCode.unknown.rawValue, message: resp.error) }
        return Lease(id: resp.id, ttl: resp.ttl)
    }

    /// Revokes a lease: its keys are deleted.
    public func revokeLease(_ id: Int64) async throws {
        let _: Etcdserverpb_LeaseRevokeResponse = try await call(
            .leaseRevoke, EtcdMessages.leaseRevoke(id), retry: false)
    }

    /// A lease's remaining time (and its keys, with `keys`).
    public func timeToLive(_ id: Int64, keys: Bool = false) async throws -> LeaseInfo {
        let resp: Etcdserverpb_LeaseTimeToLiveResponse = try await call(
            .leaseTimeToLive, EtcdMessages.timeToLive(id, keys: keys), retry: true)
        return EtcdMessages.result(resp)
    }

    /// The ids of all leases.
    public func leases() async throws -> [Int64] {
        let resp: Etcdserverpb_LeaseLeasesResponse = try await call(
            .leaseLeases, Etcdserverpb_LeaseLeasesRequest(), retry: true)
        return resp.leases.map(\.id)
    }

    /// Keeps a lease alive until the calling task is cancelled (it then throws
    /// `CancellationError`) or the lease ends (`EtcdClientError.leaseExpired`): a keep-alive a
    /// third of the way through each TTL, on one stream, resumed on another endpoint if the
    /// connection is lost. Run it as a task: `let keeper = Task { try await client.keepAlive(id) }`.
    public func keepAlive(_ id: Int64) async throws {
        let core = core
        let _: Bool = try await thread.inbox.perform(closed: EtcdClientError.closed) { done in
            let k = LeaseKeeper(core: core.value, id: id) { error in done(.failure(error)) }
            k.start()
            return { k.stop() }
        }
    }

    /// One keep-alive: the lease's new TTL.
    public func keepAliveOnce(_ id: Int64) async throws -> Int64 {
        let core = core
        return try await thread.inbox.perform(closed: EtcdClientError.closed) { done in
            let k = LeaseKeeper(core: core.value, id: id, once: true) { error in done(.failure(error)) }
            k.onTTL = { done(.success($0)) }
            k.start()
            return { k.stop() }
        }
    }

    // MARK: Lock and election (etcd's v3lock and v3election services)

    /// Takes the lock `name`, waiting until it is free; held while `lease` lives. Returns the
    /// key that owns it (pass it to `unlock`).
    public func lock(_ name: String, lease: Int64) async throws -> [UInt8] {
        var req = V3lockpb_LockRequest()
        req.name = Data(name.utf8)
        req.lease = lease
        let resp: V3lockpb_LockResponse = try await call(.lock, req, retry: false)
        return [UInt8](resp.key)
    }

    public func unlock(_ key: [UInt8]) async throws {
        var req = V3lockpb_UnlockRequest()
        req.key = Data(key)
        let _: V3lockpb_UnlockResponse = try await call(.unlock, req, retry: false)
    }

    /// Who leads an election (for `proclaim` and `resign`).
    public struct LeaderKey: Sendable, Hashable {
        public var name: [UInt8]
        public var key: [UInt8]
        public var revision: Int64
        public var lease: Int64
    }

    /// Campaigns in election `name` with `value`, waiting until elected.
    public func campaign(_ name: String, lease: Int64, value: String) async throws -> LeaderKey {
        var req = V3electionpb_CampaignRequest()
        req.name = Data(name.utf8)
        req.lease = lease
        req.value = Data(value.utf8)
        let resp: V3electionpb_CampaignResponse = try await call(.campaign, req, retry: false)
        let l = resp.leader
        return LeaderKey(name: [UInt8](l.name), key: [UInt8](l.key), revision: l.rev, lease: l.lease)
    }

    /// Changes the elected value without a new election.
    public func proclaim(_ leader: LeaderKey, value: String) async throws {
        var req = V3electionpb_ProclaimRequest()
        req.leader = leader.proto
        req.value = Data(value.utf8)
        let _: V3electionpb_ProclaimResponse = try await call(.proclaim, req, retry: false)
    }

    public func resign(_ leader: LeaderKey) async throws {
        var req = V3electionpb_ResignRequest()
        req.leader = leader.proto
        let _: V3electionpb_ResignResponse = try await call(.resign, req, retry: false)
    }

    /// The leader's key and value (nil: nobody leads).
    public func leader(_ name: String) async throws -> KeyValue? {
        var req = V3electionpb_LeaderRequest()
        req.name = Data(name.utf8)
        do {
            let resp: V3electionpb_LeaderResponse = try await call(.leader, req, retry: true)
            return resp.hasKv ? KeyValue(resp.kv) : nil
        } catch EtcdClientError.rpc(_, "election: no leader") {
            return nil
        }
    }

    // MARK: Maintenance

    /// The answering member's status.
    public struct Status: Sendable {
        public var header: ResponseHeader
        public var version: String
        public var dbSize: Int64
        public var leader: UInt64
        public var raftIndex: UInt64
    }

    public func status() async throws -> Status {
        let resp: Etcdserverpb_StatusResponse = try await call(.status, Etcdserverpb_StatusRequest(), retry: true)
        return Status(
            header: ResponseHeader(resp.header), version: resp.version, dbSize: resp.dbSize, leader: resp.leader,
            raftIndex: resp.raftIndex)
    }

    // MARK: Calls

    /// A unary call; `retry`: safe to repeat on another endpoint when the connection is lost
    /// (reads). Messages are encoded and decoded on the caller's task, not on the loop.
    func call<Req: SwiftProtobuf.Message, Resp: SwiftProtobuf.Message>(
        _ method: EtcdMethod, _ request: Req, retry: Bool
    ) async throws -> Resp {
        let bytes: [UInt8] = try request.serializedBytes()
        let core = core
        let answer: [UInt8] = try await thread.inbox.perform(closed: EtcdClientError.closed) { done in
            let call = core.value.unary(method.path, bytes, retry: retry) { done($0.mapError { $0 }) }
            // A cancelled task cancels its call on the server too (a waiting Lock or Campaign
            // gives up its place there).
            return { call.cancel() }
        }
        return try Resp(serializedBytes: answer)
    }
}

extension EtcdClient.LeaderKey {
    var proto: V3electionpb_LeaderKey {
        var p = V3electionpb_LeaderKey()
        p.name = Data(name)
        p.key = Data(key)
        p.rev = revision
        p.lease = lease
        return p
    }
}

/// What a watch's stream carries from its loop: batches made there (the client), or watch
/// responses as a server encoded them for gRPC, decoded by the consumer (an in-process watch, so
/// that the server's loop does no work per consumer).
package enum WatchFeed: Sendable {
    case batch(WatchBatch)
    /// One `WatchResponse` in gRPC's message framing.
    case response([UInt8])
}

/// A watch's batches. Iterate it once; dropping the iterator or cancelling the task cancels the watch.
public struct WatchSequence: AsyncSequence, Sendable {
    public typealias Element = WatchBatch
    private let handle: Handle

    package init(_ stream: LoopFedStream<WatchFeed>) { handle = Handle(stream) }

    /// Cancels the watch when the last copy of the sequence or its iterator goes away.
    final class Handle: Sendable {
        let stream: LoopFedStream<WatchFeed>
        init(_ stream: LoopFedStream<WatchFeed>) { self.stream = stream }
        deinit { stream.cancel() }
    }

    public struct AsyncIterator: AsyncIteratorProtocol {
        let handle: Handle
        private var fragments = WatchFragments()
        init(handle: Handle) { self.handle = handle }

        public mutating func next() async throws -> WatchBatch? {
            while let feed = try await handle.stream.next() {
                switch feed {
                case .batch(let b): return b
                case .response(let framed):
                    guard framed.count >= 5, let part = try? Etcdserverpb_WatchResponse(serializedBytes: framed[5...])
                    else {
                        throw EtcdClientError.rpc(
                            code: GRPCCode.internal.rawValue, message: "undecodable watch response")
                    }
                    if part.compactRevision > 0 || part.canceled {
                        handle.stream.cancel()  // the watch is over: let its server side go now
                        throw part.compactRevision > 0
                            ? EtcdClientError.compacted(revision: part.compactRevision)
                            : EtcdClientError.watchCanceled(part.cancelReason)
                    }
                    if part.created { continue }
                    guard let resp = fragments.join(part) else { continue }
                    return WatchBatch(header: ResponseHeader(resp.header), events: resp.events.map(WatchEvent.init))
                }
            }
            return nil
        }
    }

    public func makeAsyncIterator() -> AsyncIterator { AsyncIterator(handle: handle) }

    /// Cancels the watch now.
    public func cancel() { handle.stream.cancel() }
}

extension EtcdClientError {
    /// A gRPC status as the client's error.
    public init(_ s: GRPCStatus) {
        self = s.code == .unavailable ? .unavailable(s.message) : .rpc(code: s.code.rawValue, message: s.message)
    }
}

/// The client's state on its loop: two cluster connections, one for unary calls and keep-alives,
/// one for watches.
final class ClientCore {
    let loop: EventLoop
    let calls: Upstream
    let watches: Upstream
    private let username: String?
    private let password: String?
    private(set) var closed = false
    /// What runs until its consumer or the client stops: watches and lease keepers.
    var live: [ObjectIdentifier: ClientWatch] = [:]
    var keepers: [ObjectIdentifier: LeaseKeeper] = [:]
    /// Re-authentications under way, by connection: the calls that wait for each.
    private var authenticating: [ObjectIdentifier: [(GRPCStatus?) -> Void]] = [:]

    init(loop: EventLoop, endpoints: [UpstreamEndpoint], tls: TLSContext?, configuration: EtcdClient.Configuration) {
        self.loop = loop
        username = configuration.username
        password = configuration.password
        calls = Upstream(loop: loop, endpoints: endpoints, tls: tls)
        watches = Upstream(loop: loop, endpoints: endpoints, tls: tls)
        if username != nil {
            for u in [calls, watches] {
                u.prepare = { [unowned self] c, done in authenticate(c, done) }
            }
        }
    }

    func close() {
        closed = true
        for w in Array(live.values) { w.end(.closed) }
        for k in Array(keepers.values) { k.finish(.closed) }
        calls.stop()
        watches.stop()
    }

    static let invalidToken = "etcdserver: invalid auth token"

    /// Whether `s` says the token expired (simple tokens do after 5 idle minutes, JWTs at their TTL).
    func tokenExpired(_ s: GRPCStatus) -> Bool {
        username != nil && s.code == .unauthenticated && s.message == Self.invalidToken
    }

    /// Gets a token for the user and sends it with every call on `c` from then on; the calls that
    /// ask while one is under way on `c` share it. The old token stays until the new one comes.
    func authenticate(_ c: GRPCClientConnection, _ done: @escaping (GRPCStatus?) -> Void) {
        let id = ObjectIdentifier(c)
        if authenticating[id] != nil {
            authenticating[id]!.append(done)
            return
        }
        authenticating[id] = [done]
        var req = Etcdserverpb_AuthenticateRequest()
        req.name = username ?? ""
        req.password = password ?? ""
        let saved = c.metadata
        c.metadata = []
        c.unary(EtcdMethod.authenticate.path, req) {
            [weak self] (r: Result<Etcdserverpb_AuthenticateResponse, GRPCStatus>) in
            var error: GRPCStatus?
            switch r {
            case .success(let resp): c.metadata = [("token", resp.token)]
            case .failure(let s):
                c.metadata = saved
                error = s
            }
            let waiting = self?.authenticating.removeValue(forKey: id) ?? []
            for w in waiting { w(error) }
        }
        c.metadata = saved
    }

    /// A unary call with raw bytes. Repeated (if `retry`: reads) on the next connection when the
    /// connection is lost, or after a pause when the server answers UNAVAILABLE (a member without
    /// a leader is left for another); once more after a new token when the token expired.
    /// Returns the call's handle, whose `cancel()` ends it on the server too.
    @discardableResult
    func unary(
        _ path: String, _ bytes: [UInt8], retry: Bool, _ done: @escaping (Result<[UInt8], EtcdClientError>) -> Void
    ) -> PendingCall {
        let pending = PendingCall()
        attempt(path, bytes, retry: retry, pending: pending, tries: 0, reauthenticated: false, done)
        return pending
    }

    private func attempt(
        _ path: String, _ bytes: [UInt8], retry: Bool, pending: PendingCall, tries: Int, reauthenticated: Bool,
        _ done: @escaping (Result<[UInt8], EtcdClientError>) -> Void
    ) {
        guard !closed else { return done(.failure(.closed)) }
        guard !pending.cancelled else {
            return done(.failure(.rpc(code: GRPCCode.cancelled.rawValue, message: "canceled")))
        }
        calls.withConnection { [weak self] c in
            guard let self else { return done(.failure(.closed)) }
            guard let c else { return done(.failure(closed ? .closed : EtcdClientError(calls.failure))) }
            guard !pending.cancelled else {
                return done(.failure(.rpc(code: GRPCCode.cancelled.rawValue, message: "canceled")))
            }
            pending.call = c.unary(path, bytes) { [weak self] result in
                guard let self else { return done(.failure(.closed)) }
                pending.call = nil
                switch result {
                case .success(let answer): done(.success(answer))
                case .failure(let s) where tokenExpired(s) && !reauthenticated:
                    authenticate(c) { [weak self] error in
                        guard let self else { return done(.failure(.closed)) }
                        if let error { return done(.failure(EtcdClientError(error))) }
                        attempt(path, bytes, retry: retry, pending: pending, tries: tries, reauthenticated: true, done)
                    }
                case .failure(let s) where s.code == .unavailable && retry && tries < 2 * calls.endpoints.count:
                    let again: () -> Void = { [weak self] in
                        self?.attempt(
                            path, bytes, retry: retry, pending: pending, tries: tries + 1,
                            reauthenticated: reauthenticated, done)
                    }
                    if c.isClosed { return again() }  // the next connection takes it
                    // The member answered UNAVAILABLE ("leader changed", "request timed out"):
                    // the connection serves the other calls still. A member without a leader is
                    // left for another.
                    if s.message.contains("no leader") { calls.drop(s.message) }
                    pending.timer = LoopTimer(loop: loop, timeoutMs: 100 * UInt64(tries + 1)) { again() }
                case .failure(let s):
                    done(.failure(closed ? .closed : EtcdClientError(s)))
                }
            }
        }
    }
}

/// A unary call in flight, across its attempts: cancelling it resets the current one on the server.
final class PendingCall {
    var call: ClientCall?
    var timer: LoopTimer?
    private(set) var cancelled = false
    func cancel() {
        cancelled = true
        timer?.cancel()
        timer = nil
        call?.cancel()
        call = nil
    }
}

/// One watch on the loop: a stream of its own on the watch connection, resumed after the last
/// revision it delivered whenever that stream is lost. A consumer that lags more than `limit`
/// bytes has its server watch canceled (nothing is buffered past that, and the other watches on
/// the connection go on); once it has read down, the watch is made again from the next revision,
/// so it gets the events it missed from the server's history.
final class ClientWatch {
    private unowned let core: ClientCore
    private let create: Etcdserverpb_WatchCreateRequest
    private let stream: LoopFedStream<WatchFeed>
    private let limit: Int
    /// The next revision to deliver (0: from whenever the server makes the watch).
    private var next: Int64
    private var call: UpstreamWatch?
    private var created: ((Result<Void, EtcdClientError>) -> Void)?
    private var retryTimer: LoopTimer?
    private var pauseMs: UInt64 = 50
    private var ended = false
    /// Canceled on the server until the consumer reads down.
    private var suspended = false
    private var reauthenticated = false

    init(core: ClientCore, create: Etcdserverpb_WatchCreateRequest, stream: LoopFedStream<WatchFeed>, limit: Int) {
        self.core = core
        self.create = create
        self.stream = stream
        self.limit = limit
        next = create.startRevision
    }

    func start(_ created: @escaping (Result<Void, EtcdClientError>) -> Void) {
        self.created = created
        core.live[ObjectIdentifier(self)] = self
        stream.onCancel = { [weak self] in self?.stop() }
        stream.onDrained = { [weak self] in
            guard let self, suspended, !ended else { return }
            suspended = false
            open()
        }
        open()
    }

    private func open() {
        guard !ended, !suspended else { return }
        core.watches.withConnection { [weak self] c in
            guard let self, !ended, !suspended, call == nil else { return }
            guard let c else {
                // No endpoint answers: a watch not made yet fails; a running one keeps trying.
                if created != nil { return end(core.closed ? .closed : EtcdClientError(core.watches.failure)) }
                return reopen()
            }
            var req = create
            req.startRevision = next
            call = UpstreamWatch(
                on: c, req, onResponse: { [weak self] in self?.received($0) },
                onEnd: { [weak self, weak c] in self?.lost($0, on: c) })
            if call == nil { reopen() }
        }
    }

    private func reopen() {
        guard !ended, retryTimer == nil else { return }
        retryTimer = LoopTimer(loop: core.loop, timeoutMs: pauseMs) { [weak self] in
            guard let self else { return }
            retryTimer = nil
            open()
        }
        pauseMs = min(pauseMs * 2, 2_000)
    }

    private func received(_ resp: Etcdserverpb_WatchResponse) {
        guard !suspended else { return }
        if resp.created && !resp.canceled {
            if next == 0 { next = resp.header.revision + 1 }
            pauseMs = 50
            reauthenticated = false
            let c = created
            created = nil
            c?(.success(()))
            return
        }
        if resp.canceled || resp.compactRevision > 0 {
            return end(
                resp.compactRevision > 0
                    ? .compacted(revision: resp.compactRevision) : .watchCanceled(resp.cancelReason))
        }
        if let last = resp.events.last {
            next = last.kv.modRevision + 1
        } else {
            next = max(next, resp.header.revision + 1)
        }
        var size = 64
        for e in resp.events { size += e.kv.key.count + e.kv.value.count + e.prevKv.value.count + 96 }
        stream.push(
            .batch(WatchBatch(header: ResponseHeader(resp.header), events: resp.events.map(WatchEvent.init))),
            size: size)
        if stream.queuedBytes > limit {
            // The consumer lags: stop the server's watch; resume from `next` once it has read down.
            suspended = true
            call?.cancel()
            call = nil
            stream.notifyWhenDrained()
        }
    }

    private func lost(_ status: GRPCStatus, on c: GRPCClientConnection?) {
        call = nil
        guard !ended else { return }
        if core.tokenExpired(status), !reauthenticated, let c, !c.isClosed {
            reauthenticated = true
            return core.authenticate(c) { [weak self] error in
                guard let self else { return }
                if let error { return end(EtcdClientError(error)) }
                open()
            }
        }
        if status.code == .unavailable {
            if let c, !c.isClosed { core.watches.drop(status.message) }
            return reopen()
        }
        end(EtcdClientError(status))
    }

    /// Ends the watch: the consumer hears `error` (or the caller of `watch`, if it was not made
    /// yet); the server's watch is canceled.
    func end(_ error: EtcdClientError) {
        guard !ended else { return }
        let c = created
        created = nil
        stop()
        stream.finish(throwing: error)
        c?(.failure(error))
    }

    /// The consumer went away: cancel the server's watch.
    func stop() {
        ended = true
        retryTimer?.cancel()
        retryTimer = nil
        call?.cancel()
        call = nil
        core.live[ObjectIdentifier(self)] = nil
    }
}

/// Keeps one lease alive on a LeaseKeepAlive stream: a request a third of the way through each
/// TTL; the stream reopened if lost. Ends with `leaseExpired` when the TTL comes back as 0. A
/// connection that leaves a keep-alive unanswered for the lease's TTL is dropped (the lease may
/// have expired on the server meanwhile: the next answer says so).
final class LeaseKeeper {
    private unowned let core: ClientCore
    private let id: Int64
    private let once: Bool
    private let failed: (EtcdClientError) -> Void
    var onTTL: ((Int64) -> Void)?
    private var call: ClientCall?
    private var timer: LoopTimer?
    private var deadline: LoopTimer?
    private var ttlMs: UInt64 = 10_000
    private var stopped = false
    private var lostInRow = 0
    private var reauthenticated = false

    init(core: ClientCore, id: Int64, once: Bool = false, failed: @escaping (EtcdClientError) -> Void) {
        self.core = core
        self.id = id
        self.once = once
        self.failed = failed
    }

    func start() {
        guard !stopped else { return }
        core.keepers[ObjectIdentifier(self)] = self
        core.calls.withConnection { [weak self] c in
            guard let self, !stopped else { return }
            guard let c else { return finish(core.closed ? .closed : EtcdClientError(core.calls.failure)) }
            let opened = c.open(
                EtcdMethod.leaseKeepAlive.path, onMessage: { [weak self] in self?.received($0) },
                onClose: { [weak self, weak c] in self?.closed($0, on: c) })
            guard !opened.isClosed else { return }
            call = opened
            send()
        }
    }

    private func send() {
        call?.send(EtcdMessages.keepAlive(id))
        deadline?.cancel()
        deadline = LoopTimer(loop: core.loop, timeoutMs: ttlMs) { [weak self] in
            guard let self, !stopped else { return }
            deadline = nil
            core.calls.drop("no keep-alive answer for lease \(id) in \(ttlMs) ms")
        }
    }

    private func received(_ bytes: [UInt8]) {
        guard !stopped, let resp = try? Etcdserverpb_LeaseKeepAliveResponse(serializedBytes: bytes) else { return }
        deadline?.cancel()
        deadline = nil
        lostInRow = 0
        reauthenticated = false
        if resp.ttl <= 0 { return finish(.leaseExpired(id)) }
        ttlMs = UInt64(resp.ttl) * 1000
        if once {
            let cb = onTTL
            stop()
            cb?(resp.ttl)
            return
        }
        timer?.cancel()
        timer = LoopTimer(loop: core.loop, timeoutMs: max(ttlMs / 3, 500)) { [weak self] in
            self?.timer = nil
            self?.send()
        }
    }

    private func closed(_ status: GRPCStatus, on c: GRPCClientConnection?) {
        call = nil
        deadline?.cancel()
        deadline = nil
        guard !stopped else { return }
        if core.tokenExpired(status), !reauthenticated, let c, !c.isClosed {
            reauthenticated = true
            return core.authenticate(c) { [weak self] error in
                guard let self else { return }
                if let error { return finish(EtcdClientError(error)) }
                start()
            }
        }
        guard status.code == .unavailable else { return finish(EtcdClientError(status)) }
        // Lost with its connection: open the stream again (on the next endpoint, after a pause).
        lostInRow += 1
        if lostInRow > 2 * core.calls.endpoints.count { return finish(EtcdClientError(status)) }
        timer?.cancel()
        timer = LoopTimer(loop: core.loop, timeoutMs: 100 * UInt64(lostInRow)) { [weak self] in
            self?.timer = nil
            self?.start()
        }
    }

    /// Ends the keeper: its caller hears `error`.
    func finish(_ error: EtcdClientError) {
        guard !stopped else { return }
        stop()
        failed(error)
    }

    func stop() {
        stopped = true
        timer?.cancel()
        timer = nil
        deadline?.cancel()
        deadline = nil
        call?.cancel()
        call = nil
        core.keepers[ObjectIdentifier(self)] = nil
    }
}
