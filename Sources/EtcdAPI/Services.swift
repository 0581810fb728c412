import EtcdProto
import Foundation
import GRPC
import MVCC
import SwiftProtobuf
import WatchHub

/// Routes gRPC method paths (`/etcdserverpb.<Service>/<Method>`) to the services.
public final class EtcdServices {
    public let context: ServerContext
    public let kv: KVService
    public let watch: WatchService
    public let lessor: Lessor
    public let auth: AuthStore
    private var routes: [String: (ServerCall) -> Void] = [:]
    /// The same unary methods for the JSON gateway, by gRPC path: JSON body in, reply through `out`.
    private(set) var jsonRoutes: [String: (_ body: [UInt8], _ token: String?, _ out: @escaping (Int, [UInt8]) -> Void) -> Void] = [:]
    /// Sees every gateway request that failed (the server counts refusals from it).
    public var onGatewayFailure: ((GRPCStatus) -> Void)?
    /// Server version reported by Status.
    public static let serverVersion = "3.4.23"

    /// - Parameters:
    ///   - meta: the backend's meta entries (persisted leases are restored from them).
    ///   - blobs: the backend's named values (auth users and roles).
    ///   - now: the loop's clock in milliseconds (lease expiry, token expiry).
    public init(context: ServerContext, watchConfig: WatchHubConfig = WatchHubConfig(), meta: [String: Int64] = [:],
                blobs: [String: [UInt8]] = [:], authConfig: AuthConfig = AuthConfig(),
                now: @escaping () -> UInt64 = { DispatchTime.now().uptimeNanoseconds / 1_000_000 }) {
        self.context = context
        self.kv = KVService(context: context)
        let lessor = Lessor(context: context, meta: meta, now: now)
        self.lessor = lessor
        let auth = AuthStore(store: context.store, meta: meta, blobs: blobs, config: authConfig, now: now)
        self.auth = auth
        auth.leaseKeys = { [unowned lessor] in lessor.keys($0) }
        auth.offload = { [unowned context] work, done in context.offload(work, done) }
        auth.prepareDecoy()
        self.watch = WatchService(context: context, config: watchConfig, auth: auth)
        context.leaseExists = { [unowned lessor] in lessor.exists($0) }
        context.alarms.restore(meta)
        registerKV()
        registerLease()
        let watch = self.watch
        routes["/etcdserverpb.Watch/Watch"] = { call in watch.handle(call) }
        registerMaintenanceAndCluster()
        registerAuth()
    }

    /// The handler for a path, nil if unknown (answered UNIMPLEMENTED).
    public func route(_ path: String) -> ((ServerCall) -> Void)? { routes[path] }

    /// Adds or replaces a handler (later services plug in here).
    public func register(_ path: String, _ handler: @escaping (ServerCall) -> Void) { routes[path] = handler }

    /// The auth token of a gRPC call (`token` metadata, or `authorization` as the gateway sends it).
    static func token(_ call: ServerCall) -> String? { call.metadata("token") ?? call.metadata("authorization") }

    /// Checks that the sender of `token` may make this request (nothing to check while auth is
    /// disabled).
    func authorize<Req>(_ access: Access<Req>, _ req: Req, token: @autoclosure () -> String?) throws(EtcdError) {
        if case .open = access { return }
        if case .when(let needed, _) = access, !needed(req) { return }
        guard auth.enabled, let caller = try auth.caller(token: token()) else { return }
        switch access {
        case .open, .authenticated: return
        case .admin: try auth.requireAdmin(caller)
        case .keys(let check): if !caller.isRoot { try check(caller, req) }
        case .when(_, let check): if !caller.isRoot { try check(caller, req) }
        }
    }

    /// Registers a unary method: decode one request, check who may make it, run `body`, which
    /// replies through `Reply`.
    /// `validate` runs first: etcd checks a request's shape and size before who sent it.
    public func unary<Req: SwiftProtobuf.Message, Resp: SwiftProtobuf.Message>(
        _ path: String, access: Access<Req>, validate: ((Req, Int) throws(EtcdError) -> Void)? = nil,
        _ body: @escaping (Req, Int, Reply<Resp>) throws(EtcdError) -> Void
    ) {
        routes[path] = { [unowned self] call in
            var seen = false
            call.onMessage = { [unowned self] bytes in
                // A unary call carries one request; more on the same stream are ignored.
                guard !seen else { return }
                seen = true
                let req: Req
                do { req = try Req(serializedBytes: bytes) } catch {
                    call.finish(GRPCStatus(.internal, "grpc: error unmarshalling request: \(error)"))
                    return
                }
                let reply = Reply<Resp>(call)
                do throws(EtcdError) {
                    try validate?(req, bytes.count)
                    try authorize(access, req, token: Self.token(call))
                    try body(req, bytes.count, reply)
                } catch { reply.fail(error) }
            }
        }
        jsonRoutes[path] = { [unowned self] json, token, out in
            let reply = Reply<Resp>(json: out, failed: onGatewayFailure)
            let req: Req
            do {
                req = try Req(jsonUTF8Data: Data(json.isEmpty ? Array("{}".utf8) : json))
            } catch {
                reply.fail(GRPCStatus(.invalidArgument, "\(error)"))
                return
            }
            // The request limit applies to the request as the gRPC API would see it.
            let size = (try? req.serializedBytes() as [UInt8])?.count ?? json.count
            do throws(EtcdError) {
                try validate?(req, size)
                try authorize(access, req, token: token)
                try body(req, size, reply)
            } catch { reply.fail(error) }
        }
    }

    func checkSize(_ n: Int) throws(EtcdError) {
        if n > context.limits.maxRequestBytes { throw .requestTooLarge }
    }

    private func registerKV() {
        let kv = self.kv
        let gate = context.gate
        let auth = self.auth
        unary("/etcdserverpb.KV/Range", access: .keys { c, r throws(EtcdError) in try auth.check(c, .read, key: r.key.bytes, rangeEnd: r.rangeEnd.bytes) },
              validate: { r, _ throws(EtcdError) in if r.key.isEmpty { throw .emptyKey } }) { (r: Etcdserverpb_RangeRequest, _, reply: Reply<Etcdserverpb_RangeResponse>) throws(EtcdError) in
            reply.ok(try kv.range(r))
        }
        unary("/etcdserverpb.KV/Put", access: .keys { c, r throws(EtcdError) in try auth.check(c, put: r) },
              validate: { [unowned self] r, n throws(EtcdError) in try checkSize(n); try kv.validatePut(r) }) { [unowned self] (r: Etcdserverpb_PutRequest, n, reply: Reply<Etcdserverpb_PutResponse>) throws(EtcdError) in
            let (resp, rev) = try kv.put(r)
            gate.whenDurable(rev) { reply.ok(resp) }
        }
        unary("/etcdserverpb.KV/DeleteRange", access: .keys { c, r throws(EtcdError) in try auth.check(c, deleteRange: r) },
              validate: { [unowned self] r, n throws(EtcdError) in try checkSize(n); try kv.validateDelete(r) }) { [unowned self] (r: Etcdserverpb_DeleteRangeRequest, n, reply: Reply<Etcdserverpb_DeleteRangeResponse>) throws(EtcdError) in
            let (resp, rev) = try kv.deleteRange(r)
            gate.whenDurable(rev) { reply.ok(resp) }
        }
        unary("/etcdserverpb.KV/Txn", access: .keys { c, r throws(EtcdError) in try auth.check(c, txn: r) },
              validate: { [unowned self] r, n throws(EtcdError) in try checkSize(n); try kv.validate(txn: r) }) { [unowned self] (r: Etcdserverpb_TxnRequest, n, reply: Reply<Etcdserverpb_TxnResponse>) throws(EtcdError) in
            let (resp, _) = try kv.txn(r, validated: true)
            // A txn may have read state that is not durable yet: answer once all of it is.
            gate.whenDurable(context.store.currentRevision) { reply.ok(resp) }
        }
        unary("/etcdserverpb.KV/Compact", access: .admin, validate: { [unowned self] _, n throws(EtcdError) in try checkSize(n) }) { [unowned self] (r: Etcdserverpb_CompactionRequest, n, reply: Reply<Etcdserverpb_CompactionResponse>) throws(EtcdError) in
            let rev = try kv.compact(r)
            var resp = Etcdserverpb_CompactionResponse()
            resp.header = context.header(rev)
            if r.physical {
                context.whenCompacted { reply.ok(resp) }
            } else {
                reply.ok(resp)
            }
        }
    }

    private func registerLease() {
        let ctx = context
        let lessor = self.lessor
        let auth = self.auth
        unary("/etcdserverpb.Lease/LeaseGrant", access: .authenticated) { (r: Etcdserverpb_LeaseGrantRequest, _, reply: Reply<Etcdserverpb_LeaseGrantResponse>) throws(EtcdError) in
            let (id, ttl) = try lessor.grant(id: r.id, ttl: r.ttl)
            var resp = Etcdserverpb_LeaseGrantResponse()
            resp.id = id
            resp.ttl = ttl
            resp.header = ctx.header(ctx.store.currentRevision)
            ctx.gate.whenFlushed { reply.ok(resp) }
        }
        let revoke = { (r: Etcdserverpb_LeaseRevokeRequest, _: Int, reply: Reply<Etcdserverpb_LeaseRevokeResponse>) throws(EtcdError) in
            let rev = try lessor.revoke(r.id)
            var resp = Etcdserverpb_LeaseRevokeResponse()
            resp.header = ctx.header(rev)
            ctx.gate.whenFlushed { reply.ok(resp) }
        }
        unary("/etcdserverpb.Lease/LeaseRevoke", access: .keys { c, r throws(EtcdError) in try auth.checkLeaseKeys(c, r.id, .write) }, revoke)
        // Without keys, no check at all (etcd 3.4).
        unary("/etcdserverpb.Lease/LeaseTimeToLive", access: .when({ $0.keys }) { c, r throws(EtcdError) in
            try auth.checkLeaseKeys(c, r.id, .read)
        }) { (r: Etcdserverpb_LeaseTimeToLiveRequest, _, reply: Reply<Etcdserverpb_LeaseTimeToLiveResponse>) in
            var resp = Etcdserverpb_LeaseTimeToLiveResponse()
            resp.header = ctx.header(ctx.store.committedRevision)
            resp.id = r.id
            if let t = lessor.timeToLive(r.id) {
                resp.ttl = t.remaining
                resp.grantedTtl = t.granted
                if r.keys { resp.keys = t.keys.map { Data($0) } }
            } else {
                resp.ttl = -1
            }
            reply.ok(resp)
        }
        unary("/etcdserverpb.Lease/LeaseLeases", access: .keys { c, _ throws(EtcdError) in
            for id in lessor.all() { try auth.checkLeaseKeys(c, id, .read) }
        }) { (_: Etcdserverpb_LeaseLeasesRequest, _, reply: Reply<Etcdserverpb_LeaseLeasesResponse>) in
            var resp = Etcdserverpb_LeaseLeasesResponse()
            resp.header = ctx.header(ctx.store.committedRevision)
            resp.leases = lessor.all().map { id in
                var s = Etcdserverpb_LeaseStatus()
                s.id = id
                return s
            }
            reply.ok(resp)
        }
        // A bidirectional stream: each request renews one lease and is answered with its TTL
        // (0 when the lease is unknown or expired, which is not an error).
        routes["/etcdserverpb.Lease/LeaseKeepAlive"] = { [unowned self] call in
            let token = Self.token(call)
            call.onMessage = { [unowned call] bytes in
                guard let r = try? Etcdserverpb_LeaseKeepAliveRequest(serializedBytes: bytes) else {
                    call.finish(GRPCStatus(.internal, "grpc: error unmarshalling request"))
                    return
                }
                do throws(EtcdError) {
                    let resp = try self.keepAliveResponse(r, token: token)
                    if let bytes: [UInt8] = try? resp.serializedBytes() { call.send(bytes) }
                } catch { call.finish(error.status) }
            }
            call.onHalfClose = { [unowned call] in call.finish(.ok) }
        }
    }

    /// Renews a lease for a keep-alive request (TTL 0: unknown or expired, not an error) once the
    /// sender may write the lease's keys.
    func keepAliveResponse(_ r: Etcdserverpb_LeaseKeepAliveRequest, token: String?) throws(EtcdError)
        -> Etcdserverpb_LeaseKeepAliveResponse {
        try authorize(Access<Etcdserverpb_LeaseKeepAliveRequest>.keys { [auth] c, r throws(EtcdError) in try auth.checkLeaseKeys(c, r.id, .write) },
                      r, token: token)
        var resp = Etcdserverpb_LeaseKeepAliveResponse()
        resp.id = r.id
        resp.ttl = lessor.renew(r.id)
        resp.header = context.header(context.store.committedRevision)
        return resp
    }

    /// The HTTP/JSON gateway over these services.
    public private(set) lazy var gateway = Gateway(services: self)

    private func member() -> Etcdserverpb_Member {
        var m = Etcdserverpb_Member()
        m.id = context.identity.memberID
        m.name = context.identity.name
        m.peerUrls = context.identity.peerURLs
        m.clientUrls = context.identity.clientURLs
        return m
    }

    private func registerMaintenanceAndCluster() {
        let ctx = context
        unary("/etcdserverpb.Maintenance/Status", access: .authenticated) { (_: Etcdserverpb_StatusRequest, _, reply: Reply<Etcdserverpb_StatusResponse>) in
            var resp = Etcdserverpb_StatusResponse()
            resp.header = ctx.header(ctx.store.committedRevision)
            resp.version = EtcdServices.serverVersion
            resp.leader = ctx.identity.memberID
            resp.raftTerm = ctx.identity.raftTerm
            resp.raftIndex = UInt64(max(ctx.store.committedRevision, 0))
            resp.raftAppliedIndex = resp.raftIndex
            resp.dbSize = ctx.dbSize()
            resp.dbSizeInUse = ctx.dbSizeInUse()
            resp.errors = ctx.alarms.statusErrors
            reply.ok(resp)
        }
        let auth = self.auth
        unary("/etcdserverpb.Maintenance/Alarm", access: .keys { c, r throws(EtcdError) in
            if r.action != .get { try auth.requireAdmin(c) }
        }) { (r: Etcdserverpb_AlarmRequest, _, reply: Reply<Etcdserverpb_AlarmResponse>) in
            var resp = Etcdserverpb_AlarmResponse()
            resp.header = ctx.header(ctx.store.committedRevision)
            switch r.action {
            case .get:
                resp.alarms = ctx.alarms.active.filter { r.alarm == .none || $0.alarm == r.alarm }
            case .activate:
                if r.alarm != .none { resp.alarms = [ctx.alarms.activate(r.alarm, member: r.memberID)] }
            case .deactivate:
                if let a = ctx.alarms.deactivate(r.alarm) { resp.alarms = [a] }
            default:
                break
            }
            ctx.gate.whenFlushed { reply.ok(resp) }
        }
        unary("/etcdserverpb.Maintenance/Defragment", access: .admin) { (_: Etcdserverpb_DefragmentRequest, _, reply: Reply<Etcdserverpb_DefragmentResponse>) throws(EtcdError) in
            guard let m = ctx.maintenance else { throw .notCapable }
            m.defragment { error in
                if let error { reply.fail(EtcdError(.internal, "etcdserver: defragment failed: \(error)")) } else {
                    reply.ok(Etcdserverpb_DefragmentResponse())
                }
            }
        }
        unary("/etcdserverpb.Maintenance/Hash", access: .admin) { (_: Etcdserverpb_HashRequest, _, reply: Reply<Etcdserverpb_HashResponse>) throws(EtcdError) in
            guard let m = ctx.maintenance else { throw .notCapable }
            let rev = ctx.store.currentRevision
            m.hash { result in
                switch result {
                case .success(let h):
                    var resp = Etcdserverpb_HashResponse()
                    resp.header = ctx.header(rev)
                    resp.hash = h
                    reply.ok(resp)
                case .failure(let e): reply.fail(EtcdError(.internal, "etcdserver: hash failed: \(e)"))
                }
            }
        }
        unary("/etcdserverpb.Maintenance/HashKV", access: .admin) { (r: Etcdserverpb_HashKVRequest, _, reply: Reply<Etcdserverpb_HashKVResponse>) throws(EtcdError) in
            var resp = Etcdserverpb_HashKVResponse()
            do throws(MVCCError) { resp.hash = try ctx.store.hashKV(revision: r.revision) } catch { throw EtcdError.from(error) }
            resp.compactRevision = max(ctx.store.compactRevision, 0)
            resp.header = ctx.header(ctx.store.currentRevision)
            reply.ok(resp)
        }
        unary("/etcdserverpb.Maintenance/MoveLeader", access: .admin) { (r: Etcdserverpb_MoveLeaderRequest, _, reply: Reply<Etcdserverpb_MoveLeaderResponse>) throws(EtcdError) in
            // One member: it is the leader already; any other target is not a member.
            guard r.targetID == ctx.identity.memberID else { throw .badLeaderTransferee }
            var resp = Etcdserverpb_MoveLeaderResponse()
            resp.header = ctx.header(ctx.store.committedRevision)
            reply.ok(resp)
        }
        routes["/etcdserverpb.Maintenance/Snapshot"] = { [unowned self] call in
            var seen = false
            call.onMessage = { [unowned self] _ in
                guard !seen else { return }
                seen = true
                do throws(EtcdError) {
                    try authorize(Access<Etcdserverpb_SnapshotRequest>.admin, Etcdserverpb_SnapshotRequest(), token: Self.token(call))
                } catch { return call.finish(error.status) }
                guard let m = ctx.maintenance else { return call.finish(EtcdError.notCapable.status) }
                m.snapshot { result in
                    switch result {
                    case .success(let path): SnapshotSender(call: call, path: path).start()
                    case .failure(let e): call.finish(GRPCStatus(.internal, "etcdserver: snapshot failed: \(e)"))
                    }
                }
            }
        }
        unary("/etcdserverpb.Cluster/MemberList", access: .open) { [unowned self] (_: Etcdserverpb_MemberListRequest, _, reply: Reply<Etcdserverpb_MemberListResponse>) in
            var resp = Etcdserverpb_MemberListResponse()
            var h = ctx.header(0)
            h.revision = 0
            resp.header = h
            resp.members = [member()]
            reply.ok(resp)
        }
        // Membership cannot change: this is a one-member cluster with no peers.
        let fixed = EtcdError(.failedPrecondition, "etcdserver: membership of a single-member vigil cluster cannot change")
        unary("/etcdserverpb.Cluster/MemberAdd", access: .admin) { (_: Etcdserverpb_MemberAddRequest, _, _: Reply<Etcdserverpb_MemberAddResponse>) throws(EtcdError) in
            throw fixed
        }
        unary("/etcdserverpb.Cluster/MemberRemove", access: .admin) { (r: Etcdserverpb_MemberRemoveRequest, _, _: Reply<Etcdserverpb_MemberRemoveResponse>) throws(EtcdError) in
            throw r.id == ctx.identity.memberID ? EtcdError.memberNotEnoughStarted : EtcdError.memberNotFound
        }
        unary("/etcdserverpb.Cluster/MemberUpdate", access: .admin) { (r: Etcdserverpb_MemberUpdateRequest, _, _: Reply<Etcdserverpb_MemberUpdateResponse>) throws(EtcdError) in
            throw r.id == ctx.identity.memberID ? fixed : EtcdError.memberNotFound
        }
        unary("/etcdserverpb.Cluster/MemberPromote", access: .admin) { (r: Etcdserverpb_MemberPromoteRequest, _, _: Reply<Etcdserverpb_MemberPromoteResponse>) throws(EtcdError) in
            throw r.id == ctx.identity.memberID ? EtcdError.memberNotLearner : EtcdError.memberNotFound
        }
    }
}

/// Who may call a method while auth is enabled.
public enum Access<Req> {
    /// Anyone, with or without a token (Authenticate, MemberList).
    case open
    /// Any user with a valid token.
    case authenticated
    /// Users holding the root role.
    case admin
    /// Users whose roles grant the keys the request touches (root skips the check).
    case keys((Caller, Req) throws(EtcdError) -> Void)
    /// Like `keys`, for requests that need it (for the others: `open`).
    case when((Req) -> Bool, (Caller, Req) throws(EtcdError) -> Void)
}

/// Streams a snapshot file as etcd does: 32 KiB blobs with the bytes remaining after each, then a
/// last message holding the SHA-256 of everything sent; waits for the client's window between
/// chunks, so a large store never sits in memory.
final class SnapshotSender {
    let call: ServerCall
    let path: String
    private var file: FileHandle?
    private var remaining: UInt64 = 0
    private var sha = SHA256()
    private static let chunk = 32 * 1024

    init(call: ServerCall, path: String) {
        self.call = call
        self.path = path
    }

    func start() {
        guard let f = FileHandle(forReadingAtPath: path),
              let size = (try? FileManager.default.attributesOfItem(atPath: path)[.size] as? NSNumber)?.uint64Value else {
            call.finish(GRPCStatus(.internal, "etcdserver: snapshot file missing"))
            return
        }
        file = f
        remaining = size
        call.onDrained = { [self] in pump() }
        call.onEnded = { [self] in cleanup() }
        pump()
    }

    private func pump() {
        guard let file, !call.isFinished else { return cleanup() }
        // Keep about 1 MiB in flight; continue when the client has taken it.
        while call.queuedBytes < 1 << 20 {
            let data = file.readData(ofLength: Self.chunk)
            if data.isEmpty {
                var last = Etcdserverpb_SnapshotResponse()
                last.blob = Data(sha.finish())
                if let b: [UInt8] = try? last.serializedBytes() { call.send(b) }
                call.finish(.ok)
                cleanup()
                return
            }
            sha.update(data)
            remaining -= UInt64(data.count)
            var r = Etcdserverpb_SnapshotResponse()
            r.remainingBytes = remaining
            r.blob = data
            if let b: [UInt8] = try? r.serializedBytes() { call.send(b) }
        }
        call.notifyWhenDrained()
    }

    private func cleanup() {
        try? file?.close()
        file = nil
        unlink(path)
    }
}

/// Answers a unary call once: a message and OK, or an error status — over gRPC, or as the JSON
/// gateway's HTTP status and body.
public final class Reply<Resp: SwiftProtobuf.Message> {
    let call: ServerCall?
    let json: ((Int, [UInt8]) -> Void)?
    let failed: ((GRPCStatus) -> Void)?
    init(_ call: ServerCall) {
        self.call = call
        json = nil
        failed = nil
    }
    init(json: @escaping (Int, [UInt8]) -> Void, failed: ((GRPCStatus) -> Void)? = nil) {
        call = nil
        self.json = json
        self.failed = failed
    }

    public func ok(_ resp: Resp) {
        if let call {
            do {
                call.send(try resp.serializedBytes())
                call.finish(.ok)
            } catch {
                call.finish(GRPCStatus(.internal, "grpc: error while marshaling: \(error)"))
            }
        } else if let json {
            do {
                json(200, Array(try resp.jsonString(options: Gateway.jsonOptions).utf8))
            } catch {
                fail(GRPCStatus(.internal, "grpc: error while marshaling: \(error)"))
            }
        }
    }

    public func fail(_ e: EtcdError) { fail(e.status) }

    func fail(_ s: GRPCStatus) {
        failed?(s)
        if let call { call.finish(s) } else { json?(Gateway.httpStatus(s.code), Gateway.errorBody(s)) }
    }
}
