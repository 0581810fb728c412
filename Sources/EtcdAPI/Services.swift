import Auth
import EtcdProto
import Foundation
import GRPC
import Lease
import MVCC
import SwiftProtobuf
import VigilCore
import WatchHub

/// etcd's services over one store: the KV, Watch, Lease, Cluster, Maintenance and Auth handlers,
/// registered by method (`EtcdMethod`). Transports reach them two ways:
/// - gRPC: `route(path)` makes the `CallHandler` of a call;
/// - anything else (the JSON gateway): `unary(method)` for unary methods, `watch.open(…)` and
///   `keepAlive(…)` for the two streams.
///
/// Building one wires the parts: the watch hub and the lease key tracker observe the store, the
/// lessor is handed a range-deleter and a recorder, and the auth store its records. Everything
/// runs on the loop.
public final class EtcdServices {
    public let context: ServerContext
    public let kv: KVService
    public let watch: WatchService
    public let lessor: Lessor
    public let auth: AuthStore
    private let leaseKeys: LeaseKeyTracker
    private var unaryMethods: [String: UnaryMethod] = [:]
    /// Every method's handler maker, by gRPC path.
    private var routes: [String: (ServerCall) -> any CallHandler] = [:]
    /// Server version reported by Status, `/version`, `--version` and the metrics. 3.4.31 is the
    /// first 3.4 release whose progress notifications kube-apiserver trusts (its feature checker
    /// turns RequestWatchProgress, consistent reads from its cache and WatchList on from 3.4.31
    /// and 3.5.13): no notification overtakes a stream's pending events (etcd issues 15220 and
    /// 17507), as Vigil's hub guarantees (`WatchHub.requestProgress`).
    public static let serverVersion = "3.4.31"
    /// The cluster version `/version` reports.
    public static let clusterVersion = "3.4.0"

    public init(_ deps: ServerDependencies) {
        let context = ServerContext(deps)
        self.context = context
        let store = deps.store
        lessor = Lessor(
            clock: deps.clock, memberID: deps.identity.memberID, idEpochMilliseconds: deps.wallClockMilliseconds,
            restored: LeaseRecords.restore(deps.restored.meta),
            deleteKeys: { keys in
                let txn = store.beginWrite()
                for key in keys { txn.deleteRange(key, []) }
                txn.end()
            },
            record: { id, ttl in LeaseRecords.record(id, ttl, in: store) })
        leaseKeys = LeaseKeyTracker(lessor: lessor, store: store)
        kv = KVService(context: context, leaseExists: { [lessor] in lessor.exists($0) })
        auth = AuthStore(
            state: AuthRecordsInStore.restore(meta: deps.restored.meta, blobs: deps.restored.blobs),
            config: deps.auth, clock: deps.clock, records: AuthRecordsInStore(store: store), hasher: deps.hasher,
            offload: deps.offload, leaseKeys: { [lessor] in lessor.keys($0) },
            tokenIndexStart: UInt64(max(store.currentRevision, 0)))
        auth.prepareDecoy()
        watch = WatchService(context: context, config: deps.watch, auth: auth)
        registerKV()
        registerRangeStream()
        registerWatch()
        registerLease()
        registerMaintenance()
        registerCluster()
        registerAuth()
        registerLock()
        registerElection()
    }

    // MARK: Routing

    /// The handler maker for a gRPC path, nil if unknown (answered UNIMPLEMENTED).
    public func route(_ path: String) -> ((ServerCall) -> any CallHandler)? { routes[path] }

    /// The unary method for `method`, nil for a streaming one.
    public func unary(_ method: EtcdMethod) -> UnaryMethod? { unaryMethods[method.path] }

    /// Registers the handler maker of a streaming method.
    func stream(_ method: EtcdMethod, _ make: @escaping (ServerCall) -> any CallHandler) {
        precondition(method.kind != .unary, "\(method) is unary")
        routes[method.path] = make
    }

    /// Checks that the sender may make this request (nothing to check while auth is disabled).
    func authorize<Req>(
        _ access: Access<Req>, _ req: Req, credentials: @autoclosure () -> Credentials
    )
        throws(EtcdError)
    {
        if case .open = access { return }
        if case .when(let needed, _) = access, !needed(req) { return }
        guard auth.enabled else { return }
        let who = credentials()
        guard let caller = try auth.caller(token: who.token, commonName: who.commonName) else { return }
        switch access {
        case .open, .authenticated: return
        case .admin: try auth.requireAdmin(caller)
        case .keys(let check): if !caller.isRoot { try check(caller, req) }
        case .when(_, let check): if !caller.isRoot { try check(caller, req) }
        }
    }

    /// Registers a unary method: check the request's shape (`validate`: etcd checks shape and size
    /// before who sent it), then who may make it, then run `body`, which answers through `Reply`.
    func unary<Req: SwiftProtobuf.Message, Resp: SwiftProtobuf.Message>(
        _ method: EtcdMethod, access: Access<Req>, validate: ((Req, Int) throws(EtcdError) -> Void)? = nil,
        handle body: @escaping (Req, Int, Reply<Resp>) throws(EtcdError) -> Void
    ) {
        precondition(method.kind == .unary, "\(method) is not unary")
        let unary = UnaryMethod(method: method, requestType: Req.self, responseType: Resp.self) {
            [unowned self] any, info, sink in
            let reply = Reply<Resp>(sink)
            guard let req = any as? Req else { return reply.fail(.internal("grpc: wrong request type")) }
            do throws(EtcdError) {
                try validate?(req, info.size)
                try authorize(access, req, credentials: info.credentials)
                try body(req, info.size, reply)
            } catch { reply.fail(error) }
        }
        register(unary)
    }

    func register(_ unary: UnaryMethod) {
        unary.rawNames = RawNames.fields[unary.method]
        unaryMethods[unary.method.path] = unary
        routes[unary.method.path] = { _ in UnaryCall(unary) }
    }

    /// Serves a unary method another way (a mirror forwards writes upstream): `body` gets each
    /// request, decoded as the method's request type, on both transports.
    public func replace(
        _ method: EtcdMethod,
        with body: @escaping (UnaryMethod, any SwiftProtobuf.Message, RequestInfo, any ReplySink) -> Void
    ) {
        guard let old = unaryMethods[method.path] else { preconditionFailure("\(method) is not unary") }
        let new = UnaryMethod(method: method, requestType: old.requestType, responseType: old.responseType) {
            req, info, reply in body(old, req, info, reply)
        }
        register(new)
    }

    /// Serves a streaming method another way (a mirror relays it upstream).
    public func replace(stream method: EtcdMethod, with make: @escaping (ServerCall) -> any CallHandler) {
        stream(method, make)
    }

    /// Renews leases another way (a mirror sends keep-alives upstream): the gRPC stream and the
    /// gateway both go through it.
    public var keepAliveOverride:
        (
            (
                Etcdserverpb_LeaseKeepAliveRequest, Credentials,
                @escaping (Result<Etcdserverpb_LeaseKeepAliveResponse, EtcdError>) -> Void
            ) -> Void
        )?

    /// The Lock and Election recipes' waiters (made on first use).
    lazy var recipes = Recipes(services: self)

}

// MARK: - Leases and the store

/// Keeps each lease's key set in step with the store's writes (etcd's store attaches and detaches
/// keys as it writes; here the store's observer does, so that neither knows the other).
final class LeaseKeyTracker: StoreObserver {
    private unowned let lessor: Lessor

    /// Attaches the keys already in the store and observes it from now on.
    init(lessor: Lessor, store: KVStore) {
        self.lessor = lessor
        if lessor.count > 0, let live = try? store.range([0], [0], keysOnly: true) {
            for kv in live.kvs where kv.lease != 0 { lessor.attach(kv.key, to: kv.lease) }
        }
        store.addObserver(self)
    }

    func store(_ store: KVStore, wrote events: [Event], at revision: Int64) {
        guard lessor.count > 0 else { return }
        for e in events {
            if let p = e.prevKV, p.lease != 0 { lessor.detach(p.key, from: p.lease) }
            if e.kind == .put && e.kv.lease != 0 { lessor.attach(e.kv.key, to: e.kv.lease) }
        }
    }
}

/// Leases in the backend: meta entries `lease/<id>` → TTL, written in the same group commits as
/// the data.
enum LeaseRecords {
    static let prefix = "lease/"

    static func restore(_ meta: [String: Int64]) -> [(id: Int64, ttl: Int64)] {
        meta.compactMap { name, ttl in
            guard name.hasPrefix(prefix), let id = Int64(name.dropFirst(prefix.count)) else { return nil }
            return (id, ttl)
        }
    }

    static func record(_ id: Int64, _ ttl: Int64?, in store: KVStore) {
        if let ttl { store.setMeta(prefix + String(id), ttl) } else { store.removeMeta(prefix + String(id)) }
    }
}
