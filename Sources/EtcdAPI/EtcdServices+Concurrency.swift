import EtcdProto
import Foundation
import GRPC
import MVCC
import SwiftProtobuf
import VigilCore

/// etcd's Lock and Election services: its `concurrency` recipes run inside the server, on the
/// loop, with the caller's credentials (every step is a KV request of this server, checked as
/// the caller's own would be).
///
/// A lock or an election `name` is a queue of keys `name/<lease in hex>`, each held by a lease;
/// the key with the lowest create revision holds the lock (or leads). A waiting Lock or Campaign
/// is answered once every older key is gone, checked when a commit deleted a key under the name
/// (lease expiry included); if its own key went too (its lease ended), it fails with
/// `session expired`. A caller that gives up waiting (cancel, deadline) gives up its place: its
/// key is deleted, as etcd's client does.
final class Recipes: StoreObserver {
    private unowned let services: EtcdServices
    private var store: KVStore { services.context.store }
    /// Waiters by prefix: a Lock or Campaign waiting for older keys, an Observe for any change.
    private var waiters: [ObjectIdentifier: PrefixWaiter] = [:]
    private var anyDirty = false

    init(services: EtcdServices) {
        self.services = services
        services.context.store.addObserver(self)
    }

    final class PrefixWaiter {
        let prefix: [UInt8]
        var dirty = false
        let changed: () -> Void
        init(prefix: [UInt8], changed: @escaping () -> Void) {
            self.prefix = prefix
            self.changed = changed
        }
    }

    func add(_ w: PrefixWaiter) { waiters[ObjectIdentifier(w)] = w }
    func remove(_ w: PrefixWaiter) { waiters[ObjectIdentifier(w)] = nil }

    func store(_ store: KVStore, wrote events: [Event], at revision: Int64) {
        guard !waiters.isEmpty else { return }
        for e in events {
            for w in waiters.values where !w.dirty && e.kv.key.starts(with: w.prefix) {
                w.dirty = true
                anyDirty = true
            }
        }
    }

    /// Waiters look again once what they were told of is durable.
    func store(_ store: KVStore, committedThrough revision: Int64) {
        guard anyDirty else { return }
        anyDirty = false
        for w in Array(waiters.values) where w.dirty {
            w.dirty = false
            w.changed()
        }
    }

    /// The keys under `prefix` at the committed revision.
    func keys(under prefix: [UInt8]) -> [KeyValue] {
        (try? store.range(prefix, KeyRange.prefixEnd(prefix)))?.kvs ?? []
    }

    /// etcd's queue key: `<name>/<lease in hex>`.
    static func queueKey(_ prefix: [UInt8], _ lease: Int64) -> [UInt8] {
        prefix + Array(String(UInt64(bitPattern: lease), radix: 16).utf8)
    }
}

// MARK: - Running KV requests from inside

/// The answer of a request this server makes to itself.
private final class InnerReply: ReplySink {
    let done: (Result<any SwiftProtobuf.Message, EtcdError>) -> Void
    init(_ done: @escaping (Result<any SwiftProtobuf.Message, EtcdError>) -> Void) { self.done = done }
    func ok(_ response: any SwiftProtobuf.Message) { done(.success(response)) }
    func fail(_ error: EtcdError) { done(.failure(error)) }
}

extension EtcdServices {
    /// Runs a unary KV method for the caller of `info` (its credentials, checked as always).
    func inner<Req: SwiftProtobuf.Message, Resp: SwiftProtobuf.Message>(
        _ method: EtcdMethod, _ req: Req, _ info: RequestInfo, _ done: @escaping (Result<Resp, EtcdError>) -> Void
    ) {
        guard let unary = unary(method) else { return done(.failure(.internal("no method \(method)"))) }
        var i = info
        i.size = (try? req.serializedBytes() as [UInt8])?.count ?? 0
        unary.serve(
            req, i,
            InnerReply { result in
                switch result {
                case .success(let m):
                    if let r = m as? Resp { done(.success(r)) } else { done(.failure(.internal("wrong response"))) }
                case .failure(let e): done(.failure(e))
                }
            })
    }

    /// Registers a method that needs the request's credentials (it runs KV requests for the caller).
    func recipe<Req: SwiftProtobuf.Message, Resp: SwiftProtobuf.Message>(
        _ method: EtcdMethod, handle body: @escaping (Req, RequestInfo, Reply<Resp>) throws(EtcdError) -> Void
    ) {
        let unary = UnaryMethod(method: method, requestType: Req.self, responseType: Resp.self) { any, info, sink in
            let reply = Reply<Resp>(sink)
            guard let req = any as? Req else { return reply.fail(.internal("grpc: wrong request type")) }
            do throws(EtcdError) { try body(req, info, reply) } catch { reply.fail(error) }
        }
        register(unary)
    }
}

// MARK: - Ops

private func putOp(
    _ key: [UInt8], _ value: [UInt8], lease: Int64 = 0, ignoreLease: Bool = false
)
    -> Etcdserverpb_RequestOp
{
    var p = Etcdserverpb_PutRequest()
    p.key = Data(key)
    p.value = Data(value)
    p.lease = lease
    p.ignoreLease = ignoreLease
    var op = Etcdserverpb_RequestOp()
    op.requestPut = p
    return op
}

private func getOp(_ key: [UInt8]) -> Etcdserverpb_RequestOp {
    var r = Etcdserverpb_RangeRequest()
    r.key = Data(key)
    var op = Etcdserverpb_RequestOp()
    op.requestRange = r
    return op
}

/// The oldest key under a prefix (etcd's `WithFirstCreate`).
private func firstCreated(_ prefix: [UInt8]) -> Etcdserverpb_RangeRequest {
    var r = Etcdserverpb_RangeRequest()
    r.key = Data(prefix)
    r.rangeEnd = Data(KeyRange.prefixEnd(prefix))
    r.sortTarget = .create
    r.sortOrder = .ascend
    r.limit = 1
    return r
}

private func deleteOp(_ key: [UInt8]) -> Etcdserverpb_RequestOp {
    var d = Etcdserverpb_DeleteRangeRequest()
    d.key = Data(key)
    var op = Etcdserverpb_RequestOp()
    op.requestDeleteRange = d
    return op
}

private func createRevision(_ key: [UInt8], is rev: Int64) -> Etcdserverpb_Compare {
    var c = Etcdserverpb_Compare()
    c.key = Data(key)
    c.target = .create
    c.result = .equal
    c.createRevision = rev
    return c
}

extension EtcdServices {
    /// Queues `key` (held by `lease`, with `value`) under `prefix` unless it is there already, then
    /// waits until it is the oldest: `done` gets the key's create revision and the revision the
    /// wait ended at. Etcd's `Mutex.Lock` / `Election.Campaign` steps; a caller that leaves while
    /// waiting has its key deleted.
    fileprivate func enqueue(
        prefix: [UInt8], key: [UInt8], lease: Int64, value: [UInt8], proclaim: Bool, info: RequestInfo,
        abandon: @escaping (@escaping () -> Void) -> Void,
        _ done: @escaping (Result<(createRevision: Int64, revision: Int64), EtcdError>) -> Void
    ) {
        var txn = Etcdserverpb_TxnRequest()
        txn.compare = [createRevision(key, is: 0)]
        var owner = Etcdserverpb_RequestOp()
        owner.requestRange = firstCreated(prefix)
        txn.success = [putOp(key, value, lease: lease), owner]
        txn.failure = [getOp(key), owner]
        inner(.txn, txn, info) { [unowned self] (result: Result<Etcdserverpb_TxnResponse, EtcdError>) in
            let resp: Etcdserverpb_TxnResponse
            switch result {
            case .failure(let e): return done(.failure(e))
            case .success(let r): resp = r
            }
            var myRev = resp.header.revision
            if !resp.succeeded, let mine = resp.responses.first?.responseRange.kvs.first {
                myRev = mine.createRevision
                // A campaign again with another value proclaims it (etcd's Campaign).
                if proclaim && mine.value.bytes != value {
                    var p = Etcdserverpb_TxnRequest()
                    p.compare = [createRevision(key, is: myRev)]
                    p.success = [putOp(key, value, ignoreLease: true)]
                    inner(.txn, p, info) { (_: Result<Etcdserverpb_TxnResponse, EtcdError>) in }
                }
            }
            let first = resp.responses.last?.responseRange.kvs.first
            if first == nil || first?.createRevision == myRev {
                return done(.success((myRev, resp.header.revision)))
            }
            waitForOlder(prefix: prefix, key: key, myRev: myRev, info: info, abandon: abandon, done)
        }
    }

    private func waitForOlder(
        prefix: [UInt8], key: [UInt8], myRev: Int64, info: RequestInfo,
        abandon: @escaping (@escaping () -> Void) -> Void,
        _ done: @escaping (Result<(createRevision: Int64, revision: Int64), EtcdError>) -> Void
    ) {
        let recipes = self.recipes
        var waiter: Recipes.PrefixWaiter?
        let check = { [unowned self] in
            guard let w = waiter else { return }
            let kvs = recipes.keys(under: prefix)
            guard !kvs.contains(where: { $0.createRevision < myRev }) else { return }
            recipes.remove(w)
            waiter = nil
            guard kvs.contains(where: { $0.key == key }) else { return done(.failure(.sessionExpired)) }
            done(.success((myRev, context.store.committedRevision)))
        }
        let w = Recipes.PrefixWaiter(prefix: prefix, changed: check)
        waiter = w
        recipes.add(w)
        abandon { [unowned self] in
            guard let w = waiter else { return }
            recipes.remove(w)
            waiter = nil
            var txn = Etcdserverpb_TxnRequest()
            txn.success = [deleteOp(key)]
            inner(.txn, txn, info) { (_: Result<Etcdserverpb_TxnResponse, EtcdError>) in }
        }
        // Older keys may have gone between the txn and now.
        check()
    }

    // MARK: Lock

    func registerLock() {
        recipe(.lock) { [unowned self] (r: V3lockpb_LockRequest, info, reply: Reply<V3lockpb_LockResponse>) in
            let prefix = r.name.bytes + [UInt8(ascii: "/")]
            let key = Recipes.queueKey(prefix, r.lease)
            enqueue(
                prefix: prefix, key: key, lease: r.lease, value: [], proclaim: false, info: info,
                abandon: { reply.whenAbandoned($0) }
            ) { [unowned self] result in
                switch result {
                case .failure(let e): reply.fail(e)
                case .success(let got):
                    var resp = V3lockpb_LockResponse()
                    resp.header = context.header(got.revision)
                    resp.key = Data(key)
                    reply.ok(resp)
                }
            }
        }
        recipe(.unlock) { [unowned self] (r: V3lockpb_UnlockRequest, info, reply: Reply<V3lockpb_UnlockResponse>) in
            var d = Etcdserverpb_DeleteRangeRequest()
            d.key = r.key
            inner(.deleteRange, d, info) { (result: Result<Etcdserverpb_DeleteRangeResponse, EtcdError>) in
                switch result {
                case .failure(let e): reply.fail(e)
                case .success(let dr):
                    var resp = V3lockpb_UnlockResponse()
                    resp.header = dr.header
                    reply.ok(resp)
                }
            }
        }
    }

    // MARK: Election

    func registerElection() {
        recipe(.campaign) {
            [unowned self] (r: V3electionpb_CampaignRequest, info, reply: Reply<V3electionpb_CampaignResponse>) in
            let prefix = r.name.bytes + [UInt8(ascii: "/")]
            let key = Recipes.queueKey(prefix, r.lease)
            enqueue(
                prefix: prefix, key: key, lease: r.lease, value: r.value.bytes, proclaim: true, info: info,
                abandon: { reply.whenAbandoned($0) }
            ) { [unowned self] result in
                switch result {
                case .failure(let e): reply.fail(e)
                case .success(let got):
                    var resp = V3electionpb_CampaignResponse()
                    resp.header = context.header(got.revision)
                    resp.leader.name = r.name
                    resp.leader.key = Data(key)
                    resp.leader.rev = got.createRevision
                    resp.leader.lease = r.lease
                    reply.ok(resp)
                }
            }
        }
        recipe(.proclaim) {
            [unowned self] (
                r: V3electionpb_ProclaimRequest, info, reply: Reply<V3electionpb_ProclaimResponse>
            )
                throws(EtcdError) in
            guard r.hasLeader else { throw .missingLeaderKey }
            asLeader(r.leader, putOp(r.leader.key.bytes, r.value.bytes, ignoreLease: true), info) { result in
                switch result {
                case .failure(let e): reply.fail(e)
                case .success(let t) where !t.succeeded: reply.fail(.electionNotLeader)
                case .success(let t):
                    var resp = V3electionpb_ProclaimResponse()
                    resp.header = t.header
                    reply.ok(resp)
                }
            }
        }
        recipe(.resign) {
            [unowned self] (
                r: V3electionpb_ResignRequest, info, reply: Reply<V3electionpb_ResignResponse>
            )
                throws(EtcdError) in
            guard r.hasLeader else { throw .missingLeaderKey }
            // Not leading any more is no error for Resign (etcd's).
            asLeader(r.leader, deleteOp(r.leader.key.bytes), info) { result in
                switch result {
                case .failure(let e): reply.fail(e)
                case .success(let t):
                    var resp = V3electionpb_ResignResponse()
                    resp.header = t.header
                    reply.ok(resp)
                }
            }
        }
        recipe(.leader) {
            [unowned self] (r: V3electionpb_LeaderRequest, info, reply: Reply<V3electionpb_LeaderResponse>) in
            inner(.range, firstCreated(r.name.bytes + [UInt8(ascii: "/")]), info) {
                (result: Result<Etcdserverpb_RangeResponse, EtcdError>) in
                switch result {
                case .failure(let e): reply.fail(e)
                case .success(let rr):
                    guard let kv = rr.kvs.first else { return reply.fail(.electionNoLeader) }
                    var resp = V3electionpb_LeaderResponse()
                    resp.header = rr.header
                    resp.kv = kv
                    reply.ok(resp)
                }
            }
        }
        stream(.observe) { [unowned self] call in ObserveCall(services: self, credentials: call.credentials) }
    }

    /// Runs `op` if `leader` still leads (its key has the create revision it won with).
    private func asLeader(
        _ leader: V3electionpb_LeaderKey, _ op: Etcdserverpb_RequestOp, _ info: RequestInfo,
        _ done: @escaping (Result<Etcdserverpb_TxnResponse, EtcdError>) -> Void
    ) {
        var txn = Etcdserverpb_TxnRequest()
        txn.compare = [createRevision(leader.key.bytes, is: leader.rev)]
        txn.success = [op]
        inner(.txn, txn, info, done)
    }

    /// Follows the leader of election `name` for the caller: once started, `send` gets the current
    /// leader (if any), then every change of leader or of its value, in order. Refused if the
    /// caller may not read the election's keys. The observation lasts until `cancel()`.
    public func observe(
        name: [UInt8], credentials: Credentials, send: @escaping (V3electionpb_LeaderResponse) -> Void
    ) throws(EtcdError) -> ElectionObservation {
        let prefix = name + [UInt8(ascii: "/")]
        if auth.enabled {
            let caller = try auth.caller(token: credentials.token, commonName: credentials.commonName)
            try auth.check(caller, .read, key: prefix, rangeEnd: KeyRange.prefixEnd(prefix))
        }
        return ElectionObservation(recipes: recipes, context: context, prefix: prefix, send: send)
    }
}

/// One Observe: sends the leader's key and value whenever either changes.
public final class ElectionObservation {
    private let recipes: Recipes
    private let context: ServerContext
    private let send: (V3electionpb_LeaderResponse) -> Void
    private var waiter: Recipes.PrefixWaiter?
    private var last: (key: [UInt8], modRevision: Int64)?

    init(
        recipes: Recipes, context: ServerContext, prefix: [UInt8],
        send: @escaping (V3electionpb_LeaderResponse) -> Void
    ) {
        self.recipes = recipes
        self.context = context
        self.send = send
        let w = Recipes.PrefixWaiter(prefix: prefix) { [weak self] in self?.look() }
        waiter = w
        recipes.add(w)
    }

    /// Sends the current leader, if any; changes follow by themselves.
    public func start() { look() }

    private func look() {
        guard let w = waiter else { return }
        guard let leader = recipes.keys(under: w.prefix).min(by: { $0.createRevision < $1.createRevision }) else {
            return
        }
        if let last, last.key == leader.key && last.modRevision == leader.modRevision { return }
        last = (leader.key, leader.modRevision)
        var resp = V3electionpb_LeaderResponse()
        resp.header = context.header(context.store.committedRevision)
        resp.kv = leader.proto
        send(resp)
    }

    /// Ends the observation.
    public func cancel() {
        guard let w = waiter else { return }
        recipes.remove(w)
        waiter = nil
    }
}

/// An Observe call over gRPC: one LeaderRequest, then LeaderResponses until the caller leaves.
final class ObserveCall: CallHandler {
    private unowned let services: EtcdServices
    private let credentials: Credentials
    private var observation: ElectionObservation?

    init(services: EtcdServices, credentials: Credentials) {
        self.services = services
        self.credentials = credentials
    }

    func call(_ call: ServerCall, received message: [UInt8]) {
        guard observation == nil else { return }
        guard let req = try? V3electionpb_LeaderRequest(serializedBytes: message) else {
            return call.finish(EtcdError.malformedRequest.status)
        }
        do throws(EtcdError) {
            observation = try services.observe(name: req.name.bytes, credentials: credentials) { [weak call] resp in
                try? call?.send(resp)
            }
            observation?.start()
        } catch {
            call.finish(error.status)
        }
    }

    func callEnded(_ call: ServerCall) {
        observation?.cancel()
        observation = nil
    }
}
