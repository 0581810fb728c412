import EtcdAPI
import EtcdProto
import EventLoop
import Foundation
import GRPC
import HTTP2
import MVCC
import SwiftProtobuf
import VigilClient
import VigilCore
import WatchHub

/// Where each etcd method goes on a mirror: Range and Watch are served here (Range after a
/// linearizable point unless serializable; ranges the mirror does not hold, or older than it holds,
/// go upstream); every other unary call goes upstream with the caller's token and comes back only
/// once the mirror has applied the revision of its answer; keep-alives of all clients share one
/// upstream stream; Snapshot and Observe are relayed.
public enum MirrorRouting {
    public static func install(_ mirror: Mirror, on services: EtcdServices) {
        let kv = services.kv
        let store = services.context.store
        services.replace(.range) { [unowned mirror] method, request, info, reply in
            guard let r = request as? Etcdserverpb_RangeRequest else { return reply.fail(.malformedRequest) }
            if r.key.isEmpty { return reply.fail(.emptyKey) }
            let held = mirror.covers(key: r.key.bytes, end: r.rangeEnd.bytes) && !mirror.upstreamAuth
            if !held || (r.revision > 0 && r.revision < store.compactRevision) {
                return forward(mirror, method, request, info, reply)
            }
            let local = {
                do throws(EtcdError) { reply.ok(try kv.range(r)) } catch { reply.fail(error) }
            }
            if r.serializable { return local() }
            mirror.barrier { result in
                switch result {
                case .success: local()
                case .failure(let e): reply.fail(e)
                }
            }
        }
        for m in EtcdMethod.all where m.kind == .unary && m != .range {
            services.replace(m) { [unowned mirror] method, request, info, reply in
                // Under a namespace an empty key would name the namespace itself upstream: the
                // request is checked here first, as etcd's namespace client does.
                if !mirror.namespace.isEmpty {
                    do throws(EtcdError) {
                        switch request {
                        case let r as Etcdserverpb_PutRequest: try kv.validatePut(r)
                        case let r as Etcdserverpb_DeleteRangeRequest: try kv.validateDelete(r)
                        case let r as Etcdserverpb_TxnRequest: try kv.validate(txn: r)
                        default: break
                        }
                    } catch { return reply.fail(error) }
                }
                forward(mirror, method, request, info, reply)
            }
        }
        services.watch.holds = { [unowned mirror] w in mirror.covers(key: w.key, end: w.rangeEnd) }
        services.watch.refusal = { [unowned mirror] _ in
            mirror.upstreamAuth ? "vigil mirror: upstream has auth enabled; watch the cluster directly" : nil
        }
        services.watch.olderHistory = { [unowned mirror] watcher, through, send, done in
            let replay = HistoryReplay(mirror: mirror, watcher: watcher, through: through, send: send, done: done)
            replay.start()
            return { replay.stop() }
        }
        let keepAlives = KeepAliveMux(mirror.upstream)
        services.keepAliveOverride = { r, credentials, done in keepAlives.renew(r, token: credentials.token, done) }
        for m in [EtcdMethod.snapshot, .observe] {
            services.replace(stream: m) { [unowned mirror] call in RelayCall(mirror.upstream, call) }
        }
        services.replace(stream: .rangeStream) { [unowned mirror, unowned services] call in
            MirrorRangeStream(mirror: mirror, services: services, call: call)
        }
    }

    /// Sends a unary call upstream as it came and answers with upstream's answer, error code and
    /// message untouched; a successful one once the mirror has applied its revision.
    static func forward(
        _ mirror: Mirror, _ method: UnaryMethod, _ request: any SwiftProtobuf.Message, _ info: RequestInfo,
        _ reply: any ReplySink
    ) {
        let ns = mirror.namespace
        let bytes: [UInt8]
        do { bytes = try ns.request(request).serializedBytes() } catch { return reply.fail(.malformedRequest) }
        let metadata: [HeaderField] = info.token.map { [("token", $0)] } ?? []
        mirror.upstream.unary(method.method.path, bytes, metadata: metadata) { [weak mirror] result in
            switch result {
            case .failure(let status):
                reply.fail(.relayed(status.code, status.message))
            case .success(let answer):
                guard let mirror else { return reply.fail(.stopped) }
                let response: any SwiftProtobuf.Message
                do { response = ns.response(try method.responseType.init(serializedBytes: answer)) } catch {
                    return reply.fail(.internal("vigil mirror: undecodable upstream answer: \(error)"))
                }
                let revision = Mirror.headerRevision(answer)
                mirror.whenApplied(revision) { applied in
                    guard applied else { return reply.fail(Mirror.notApplied(revision)) }
                    if method.method == .compact, let c = request as? Etcdserverpb_CompactionRequest {
                        mirror.compactHere(c.revision)
                    }
                    if method.method == .authEnable { mirror.upstreamAuth = true }
                    if method.method == .authDisable { mirror.upstreamAuth = false }
                    reply.ok(response)
                }
            }
        }
    }
}

extension Mirror {
    /// Upstream compacted at `revision` through this mirror: its history goes here too.
    func compactHere(_ revision: Int64) {
        if revision > store.compactRevision && revision <= store.currentRevision { try? store.compact(revision) }
    }
}

/// Lease keep-alives of every client on one upstream LeaseKeepAlive stream: each request is sent
/// as it comes; answers, which carry the lease ID, go to the oldest request waiting for that ID.
final class KeepAliveMux {
    private let upstream: Upstream
    private var call: ClientCall?
    private var pending: [Int64: [(Result<Etcdserverpb_LeaseKeepAliveResponse, EtcdError>) -> Void]] = [:]

    init(_ upstream: Upstream) { self.upstream = upstream }

    func renew(
        _ r: Etcdserverpb_LeaseKeepAliveRequest, token: String?,
        _ done: @escaping (Result<Etcdserverpb_LeaseKeepAliveResponse, EtcdError>) -> Void
    ) {
        upstream.withConnection { [self] c in
            guard let c else {
                return done(.failure(.relayed(Upstream.unreachable.code, Upstream.unreachable.message)))
            }
            let call = stream(on: c)
            guard !call.isClosed else {
                self.call = nil
                return done(.failure(.relayed(Upstream.unreachable.code, Upstream.unreachable.message)))
            }
            pending[r.id, default: []].append(done)
            call.send(r)
        }
    }

    private func stream(on c: GRPCClientConnection) -> ClientCall {
        if let call, !call.isClosed, call.connection === c { return call }
        var made: ClientCall?
        made = c.open(
            EtcdMethod.leaseKeepAlive.path,
            onMessage: { [weak self] bytes in
                guard let self, let resp = try? Etcdserverpb_LeaseKeepAliveResponse(serializedBytes: bytes),
                    var waiting = pending[resp.id], !waiting.isEmpty
                else { return }
                let done = waiting.removeFirst()
                pending[resp.id] = waiting.isEmpty ? nil : waiting
                done(.success(resp))
            },
            onClose: { [weak self] status in
                guard let self, call === made else { return }
                call = nil
                let failed = pending
                pending = [:]
                let error = EtcdError.relayed(status.code == .ok ? .unavailable : status.code, status.message)
                for (_, list) in failed { for done in list { done(.failure(error)) } }
            })
        call = made
        return made!
    }
}

/// A streaming call relayed upstream as it is: messages both ways, half-close, cancel, status.
final class RelayCall: CallHandler {
    private let upstream: Upstream
    private var outbound: ClientCall?
    private var queued: [[UInt8]] = []
    private var halfClosed = false
    private var opening = false
    private weak var downstream: ServerCall?

    init(_ upstream: Upstream, _ call: ServerCall) {
        self.upstream = upstream
        downstream = call
        open(call)
    }

    private func open(_ call: ServerCall) {
        opening = true
        let metadata: [HeaderField] =
            (call.metadata("token") ?? call.metadata("authorization")).map {
                [("token", $0)]
            } ?? []
        let path = call.path
        upstream.withConnection { [weak self] c in
            guard let self else { return }
            opening = false
            guard let c else { return downstream?.finish(Upstream.unreachable) ?? () }
            let out = c.open(
                path, metadata: metadata,
                onMessage: { [weak self] bytes in self?.downstream?.send(bytes) },
                onClose: { [weak self] status in self?.downstream?.finish(status) })
            outbound = out
            for m in queued { out.send(m) }
            queued = []
            if halfClosed { out.closeSend() }
        }
    }

    func call(_ call: ServerCall, received message: [UInt8]) {
        if let outbound { outbound.send(message) } else { queued.append(message) }
    }

    func callHalfClosed(_ call: ServerCall) {
        halfClosed = true
        outbound?.closeSend()
    }

    func callEnded(_ call: ServerCall) {
        outbound?.cancel()
        outbound = nil
    }
}

/// A RangeStream on a mirror: served from the copy when it holds the range (after a linearizable
/// point unless serializable), else relayed upstream as it came (etcd before 3.7 answers
/// Unimplemented, as it would to the client directly).
final class MirrorRangeStream: CallHandler {
    private unowned let mirror: Mirror
    private unowned let services: EtcdServices
    private var chosen: (any CallHandler)?

    init(mirror: Mirror, services: EtcdServices, call: ServerCall) {
        self.mirror = mirror
        self.services = services
    }

    func call(_ call: ServerCall, received message: [UInt8]) {
        if let chosen { return chosen.call(call, received: message) }
        let store = services.context.store
        let r = try? Etcdserverpb_RangeRequest(serializedBytes: message)
        let held =
            r.map {
                mirror.covers(key: $0.key.bytes, end: $0.rangeEnd.bytes) && !mirror.upstreamAuth
                    && !($0.revision > 0 && $0.revision < store.compactRevision)
            } ?? false
        let handler: any CallHandler
        if held, let r {
            let mirror = self.mirror
            handler = services.rangeStream(
                credentials: call.credentials,
                gate: r.serializable
                    ? nil
                    : { _, done in
                        mirror.barrier { result in
                            if case .failure(let e) = result { done(e) } else { done(nil) }
                        }
                    })
        } else {
            handler = RelayCall(mirror.upstream, call)
        }
        chosen = handler
        handler.call(call, received: message)
    }

    func callHalfClosed(_ call: ServerCall) { chosen?.callHalfClosed(call) }
    func callDrained(_ call: ServerCall) { chosen?.callDrained(call) }
    func callEnded(_ call: ServerCall) { chosen?.callEnded(call) }
}

/// History older than a mirror holds, for one new watcher: a watch of its own upstream from the
/// watcher's start revision, relayed up to the mirror's first revision (`through`); then the hub
/// takes over. With `through` `Int64.max` (a range outside the mirror's prefix) it relays for the
/// watcher's whole life. A lost connection resumes after the last revision relayed; a compacted
/// start is passed on as upstream gave it.
final class HistoryReplay {
    private unowned let mirror: Mirror
    private var upstream: Upstream { mirror.upstream }
    private var loop: EventLoop { mirror.loop }
    private var namespace: Namespace { mirror.namespace }
    private let watcher: WatchCreate
    private let through: Int64
    private let send: ([Event], Int64) -> Void
    private let done: (OlderHistoryEnd) -> Void
    private var next: Int64
    private var call: UpstreamWatch?
    private var finished = false
    private var retryTimer: LoopTimer?

    init(
        mirror: Mirror, watcher: WatchCreate, through: Int64,
        send: @escaping ([Event], Int64) -> Void, done: @escaping (OlderHistoryEnd) -> Void
    ) {
        self.mirror = mirror
        self.watcher = watcher
        self.through = through
        self.send = send
        self.done = done
        next = watcher.startRevision
    }

    func start() {
        guard !finished else { return }
        upstream.withConnection { [weak self] c in
            guard let self, !finished else { return }
            guard let c else { return retry() }
            open(on: c)
        }
    }

    func stop() {
        finished = true
        quietTimer?.cancel()
        quietTimer = nil
        retryTimer?.cancel()
        retryTimer = nil
        call?.cancel()
        call = nil
    }

    private func retry() {
        guard !finished, retryTimer == nil else { return }
        call?.cancel()
        call = nil
        retryTimer = LoopTimer(loop: loop, timeoutMs: 200) { [weak self] in
            self?.retryTimer = nil
            self?.start()
        }
    }

    private func open(on c: GRPCClientConnection) {
        call = UpstreamWatch(
            on: c,
            UpstreamWatch.create(
                namespace.key(watcher.key), namespace.end(watcher.rangeEnd), from: next,
                prevKV: watcher.prevKV),
            onResponse: { [weak self] resp in self?.received(resp) },
            onEnd: { [weak self] _ in self?.retry() })
        if call == nil { retry() }
    }

    private func received(_ resp: Etcdserverpb_WatchResponse) {
        quietTimer?.cancel()
        quietTimer = nil
        // A refused create comes as created and canceled at once: canceled is looked at first.
        if resp.canceled {
            if resp.compactRevision > 0 { return finish(.compacted(resp.compactRevision)) }
            if !resp.cancelReason.isEmpty { return finish(.canceled(resp.cancelReason)) }
            return retry()
        }
        if resp.created {
            // Resumed after a reconnection from here if no event came before.
            if next == 0 { next = resp.header.revision + 1 }
            return through == .max ? () : waitQuiet()
        }
        let events = resp.events
        var older: [Event] = []
        var passed = false
        for e in events {
            if e.kv.modRevision > through {
                passed = true
                break
            }
            older.append(
                Event(
                    kind: e.type == .delete ? .delete : .put, kv: mirror.local(e.kv),
                    prevKV: e.hasPrevKv ? mirror.local(e.prevKv) : nil))
        }
        if let last = older.last {
            next = last.kv.modRevision + 1
            // Never a header past where the hub's own answers will start.
            send(older, min(resp.header.revision, through))
        }
        // Done once past `through` (events come in revision order), or once a catch-up answer up
        // to `through` was etcd's last batch (it splits catch-ups at 1,000 revisions). Progress
        // answers prove nothing: etcd 3.4 gives them before a watcher has caught up.
        let revisions = Set(events.map(\.kv.modRevision)).count
        if passed || (!events.isEmpty && revisions < Self.etcdBatchRevisions && resp.header.revision >= through) {
            return finish(.complete)
        }
        if through != .max { waitQuiet() }
    }

    /// etcd's watchBatchMaxRevs.
    static let etcdBatchRevisions = 1_000
    /// No answer for this long: etcd (which syncs a watcher every 100 ms) had nothing more.
    static let quietMs: UInt64 = 1_000
    private var quietTimer: LoopTimer?

    /// With no event in the range, etcd sends nothing at all: silence ends the replay.
    private func waitQuiet() {
        quietTimer?.cancel()
        quietTimer = LoopTimer(loop: loop, timeoutMs: Self.quietMs) { [weak self] in
            self?.quietTimer = nil
            self?.finish(.complete)
        }
    }

    private func finish(_ end: OlderHistoryEnd) {
        guard !finished else { return }
        stop()
        done(end)
    }
}
