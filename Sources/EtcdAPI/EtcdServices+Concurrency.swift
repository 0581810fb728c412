import EtcdProto
import Foundation
import GRPC
import MVCC
import SwiftProtobuf
import VigilCore

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

/// Where one Lock or Campaign stands: it may be abandoned (cancel, deadline) at any step.
private final class QueueEntry {
    let prefix: [UInt8]
    var lease: Int64 = 0
    var key: [UInt8] = []
    /// The key's create revision, once it is queued.
    var createRevision: Int64 = 0
    var queued = false
    var abandoned = false
    var finished = false
    var listener: Recipes.Listener?
    init(prefix: [UInt8]) { self.prefix = prefix }
}

extension EtcdServices {
    /// etcd's `concurrency.NewSession(WithLease(lease))` as its Lock and Election servers open
    /// one per call: the caller's lease, or with lease 0 a new lease of `Recipes.sessionTTL`
    /// seconds that nothing keeps alive (each such caller queues on a key of its own).
    private func session(_ lease: Int64, _ info: RequestInfo, _ done: @escaping (Result<Int64, EtcdError>) -> Void) {
        guard lease == 0 else { return done(.success(lease)) }
        var grant = Etcdserverpb_LeaseGrantRequest()
        grant.ttl = Recipes.sessionTTL
        inner(.leaseGrant, grant, info) { (r: Result<Etcdserverpb_LeaseGrantResponse, EtcdError>) in
            done(r.map(\.id))
        }
    }

    /// Queues the caller under `prefix` with a key `prefix<lease in hex>` held by its session's
    /// lease (unless that key is there already: the same session queues once), then waits until
    /// it is the oldest key. `queued` gets the txn's answer and the session (a Campaign proclaims
    /// a new value there, or gives up); `done` gets the revision the wait ended at. etcd's
    /// `Mutex.Lock` / `Election.Campaign` steps; a caller that leaves before its turn has its key
    /// deleted, whichever step it left at.
    fileprivate func enqueue(
        prefix: [UInt8], lease: Int64, value: [UInt8], info: RequestInfo,
        abandon: (@escaping () -> Void) -> Void,
        queued: @escaping (Etcdserverpb_TxnResponse, QueueEntry, @escaping (EtcdError?) -> Void) -> Void = { $2(nil) },
        _ done: @escaping (Result<(entry: QueueEntry, revision: Int64), EtcdError>) -> Void
    ) {
        let entry = QueueEntry(prefix: prefix)
        abandon { [unowned self] in
            guard !entry.finished else { return }
            entry.abandoned = true
            leaveQueue(entry, info)
        }
        session(lease, info) { [unowned self] result in
            guard !entry.abandoned else { return }
            switch result {
            case .failure(let e): return done(.failure(e))
            case .success(let id): entry.lease = id
            }
            entry.key = Recipes.queueKey(prefix, entry.lease)
            var txn = Etcdserverpb_TxnRequest()
            txn.compare = [createRevision(entry.key, is: 0)]
            var owner = Etcdserverpb_RequestOp()
            owner.requestRange = firstCreated(prefix)
            txn.success = [putOp(entry.key, value, lease: entry.lease), owner]
            txn.failure = [getOp(entry.key), owner]
            inner(.txn, txn, info) { [unowned self] (result: Result<Etcdserverpb_TxnResponse, EtcdError>) in
                let resp: Etcdserverpb_TxnResponse
                switch result {
                case .failure(let e): return entry.abandoned ? () : done(.failure(e))
                case .success(let r): resp = r
                }
                entry.queued = true
                entry.createRevision = resp.header.revision
                if !resp.succeeded, let mine = resp.responses.first?.responseRange.kvs.first {
                    entry.createRevision = mine.createRevision
                }
                // Left while the txn ran: the key it made goes now.
                if entry.abandoned { return leaveQueue(entry, info) }
                queued(resp, entry) { [unowned self] failed in
                    if let failed { return entry.abandoned ? () : done(.failure(failed)) }
                    guard !entry.abandoned else { return }
                    let first = resp.responses.last?.responseRange.kvs.first
                    if first == nil || first?.createRevision == entry.createRevision
                        || Failpoint.hit("lockIgnoreQueue") != nil
                    {
                        entry.finished = true
                        return done(.success((entry, resp.header.revision)))
                    }
                    waitForOlder(entry, done)
                }
            }
        }
    }

    /// Waits until no key under the prefix is older than the entry's: each time a durable write
    /// under the prefix may have freed it, it looks at the keys at that revision.
    private func waitForOlder(
        _ entry: QueueEntry, _ done: @escaping (Result<(entry: QueueEntry, revision: Int64), EtcdError>) -> Void
    ) {
        let recipes = self.recipes
        let check = { (committed: Int64) in
            guard entry.listener != nil, !entry.finished else { return }
            let kvs = recipes.keys(under: entry.prefix, at: committed)
            guard !kvs.contains(where: { $0.createRevision < entry.createRevision }) else { return }
            entry.finished = true
            if let l = entry.listener { recipes.remove(l) }
            entry.listener = nil
            // Its own key went too (its lease ended): as etcd 3.5's Mutex.Lock.
            guard kvs.contains(where: { $0.key == entry.key && $0.createRevision == entry.createRevision }) else {
                return done(.failure(.sessionExpired))
            }
            done(.success((entry, committed)))
        }
        let l = Recipes.Listener(prefix: entry.prefix) { committed, _ in check(committed) }
        entry.listener = l
        recipes.add(l)
        // Older keys may have gone between the txn and now.
        check(context.store.committedRevision)
    }

    /// A caller that gave up waiting gives up its place (etcd's client deletes its key).
    private func leaveQueue(_ entry: QueueEntry, _ info: RequestInfo) {
        if let l = entry.listener { recipes.remove(l) }
        entry.listener = nil
        guard entry.queued else { return }
        var txn = Etcdserverpb_TxnRequest()
        txn.compare = [createRevision(entry.key, is: entry.createRevision)]
        txn.success = [deleteOp(entry.key)]
        inner(.txn, txn, info) { (_: Result<Etcdserverpb_TxnResponse, EtcdError>) in }
    }

    // MARK: Lock

    func registerLock() {
        recipe(.lock) { [unowned self] (r: V3lockpb_LockRequest, info, reply: Reply<V3lockpb_LockResponse>) in
            enqueue(
                prefix: r.name.bytes + [UInt8(ascii: "/")], lease: r.lease, value: [], info: info,
                abandon: { reply.whenAbandoned($0) }
            ) { [unowned self] result in
                switch result {
                case .failure(let e): reply.fail(e.passedOnByClient)
                case .success(let got):
                    var resp = V3lockpb_LockResponse()
                    resp.header = context.header(got.revision)
                    resp.key = Data(got.entry.key)
                    reply.ok(resp)
                }
            }
        }
        recipe(.unlock) { [unowned self] (r: V3lockpb_UnlockRequest, info, reply: Reply<V3lockpb_UnlockResponse>) in
            var d = Etcdserverpb_DeleteRangeRequest()
            d.key = r.key
            inner(.deleteRange, d, info) { (result: Result<Etcdserverpb_DeleteRangeResponse, EtcdError>) in
                switch result {
                case .failure(let e): reply.fail(e.passedOnByClient)
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
            var header = Etcdserverpb_ResponseHeader()
            enqueue(
                prefix: r.name.bytes + [UInt8(ascii: "/")], lease: r.lease, value: r.value.bytes, info: info,
                abandon: { reply.whenAbandoned($0) },
                queued: { [unowned self] resp, entry, next in
                    // etcd answers with the header of the txn that queued the campaign.
                    header = resp.header
                    guard !resp.succeeded, let mine = resp.responses.first?.responseRange.kvs.first,
                        mine.value.bytes != r.value.bytes
                    else { return next(nil) }
                    // A campaign again with another value proclaims it first (etcd's Campaign),
                    // and gives up if that fails.
                    proclaim(entry.key, entry.createRevision, entry.lease, r.value.bytes, info) {
                        [unowned self] result in
                        switch result {
                        case .success(let t) where t.succeeded: next(nil)
                        case .success:
                            resign(entry.key, entry.createRevision, info)
                            next(.electionNotLeader)
                        case .failure(let e):
                            resign(entry.key, entry.createRevision, info)
                            next(e)
                        }
                    }
                }
            ) { result in
                switch result {
                case .failure(let e): reply.fail(e.passedOnByClient)
                case .success(let got):
                    var resp = V3electionpb_CampaignResponse()
                    resp.header = header
                    resp.leader.name = r.name
                    resp.leader.key = Data(got.entry.key)
                    resp.leader.rev = got.entry.createRevision
                    resp.leader.lease = got.entry.lease
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
            // etcd's Proclaim runs in a session of the leader's lease (a new one for lease 0) and
            // puts the value with it.
            session(r.leader.lease, info) { [unowned self] lease in
                switch lease {
                case .failure(let e): return reply.fail(e.passedOnByClient)
                case .success(let lease):
                    proclaim(r.leader.key.bytes, r.leader.rev, lease, r.value.bytes, info) { result in
                        switch result {
                        case .failure(let e): reply.fail(e.passedOnByClient)
                        case .success(let t) where !t.succeeded: reply.fail(.electionNotLeader)
                        case .success(let t):
                            var resp = V3electionpb_ProclaimResponse()
                            resp.header = t.header
                            reply.ok(resp)
                        }
                    }
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
            resign(r.leader.key.bytes, r.leader.rev, info) { result in
                switch result {
                case .failure(let e): reply.fail(e.passedOnByClient)
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
                case .failure(let e): reply.fail(e.passedOnByClient)
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

    /// Puts `value` to the leader's key with `lease` if the key still has the create revision it
    /// won with.
    private func proclaim(
        _ key: [UInt8], _ rev: Int64, _ lease: Int64, _ value: [UInt8], _ info: RequestInfo,
        _ done: @escaping (Result<Etcdserverpb_TxnResponse, EtcdError>) -> Void
    ) {
        var txn = Etcdserverpb_TxnRequest()
        txn.compare = [createRevision(key, is: rev)]
        txn.success = [putOp(key, value, lease: lease)]
        inner(.txn, txn, info, done)
    }

    /// Deletes the leader's key if it still has the create revision it won with.
    private func resign(
        _ key: [UInt8], _ rev: Int64, _ info: RequestInfo,
        _ done: @escaping (Result<Etcdserverpb_TxnResponse, EtcdError>) -> Void = { _ in }
    ) {
        var txn = Etcdserverpb_TxnRequest()
        txn.compare = [createRevision(key, is: rev)]
        txn.success = [deleteOp(key)]
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
