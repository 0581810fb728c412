import EtcdProto
import EventLoop
import Foundation
import GRPC
import SwiftProtobuf
import VigilClient
import VigilCore

/// The mix of clients one run drives, all on one loop thread (each client one request at a time,
/// on a connection of its own).
public struct TrafficMix: Codable, Sendable {
    /// etcd-shaped KV clients: gets, lists, stale gets, puts, deletes, multi-op txns,
    /// compare-and-set, puts with a lease and its revoke.
    public var kv = 3
    /// Kubernetes-shaped clients: optimistic create, update and delete (a txn on mod_revision,
    /// put or delete else get), paginated lists at one revision.
    public var kubernetes = 2
    /// Short leases (3 s): keys attached, some kept alive, some revoked, the rest left to expire.
    public var leases = 1
    /// Lock clients on one lock (half with lease 0, half with leases of their own).
    public var lockers = 3
    /// Campaigners on one election, and an observer (Observe and Leader).
    public var campaigners = 2
    /// Watchers opened continuously at ±100 revisions of the head, on keys and prefixes.
    public var watchers = 3
    /// The kube-apiserver's compaction (txn on compact_rev_key, then Compact), every this many ms
    /// (0: none).
    public var compactionIntervalMs: UInt64 = 200
    public init() {}
}

/// Drives the traffic and records its history (loop-confined).
final class Traffic {
    let loop: EventLoop
    let endpoints: () -> [(host: String, port: Int)]
    var history = History()
    let mix: TrafficMix
    private var rng: SeededRandom
    private var nextOp = 0
    private var nextValue = 0
    private(set) var stopping = false
    /// Requests in flight (the run ends when none is left).
    private(set) var inFlight = 0
    private var clients: [AnyObject] = []
    /// The collector's progress: the revision it has seen everything up to.
    var collectorRevision: Int64 = 1
    weak var collector: CollectorClient?
    /// Clients notified when the traffic stops (watch streams close).
    private var onStop: [() -> Void] = []

    init(loop: EventLoop, mix: TrafficMix, seed: UInt64, endpoints: @escaping () -> [(host: String, port: Int)]) {
        self.loop = loop
        self.mix = mix
        self.endpoints = endpoints
        rng = SeededRandom(seed: seed)
    }

    private var connections: [Connection] = []

    func connection() -> Connection {
        let c = Connection(loop: loop, endpoints: endpoints)
        connections.append(c)
        return c
    }

    /// Closes every client's connection (the run is over).
    func closeAll() { for c in connections { c.close() } }

    /// A seed for one client, drawn from the run's.
    func clientSeed() -> UInt64 { rng.next() }

    /// A value no other put of the run writes.
    func uniqueValue(_ client: Int) -> String {
        nextValue += 1
        return "c\(client)-\(nextValue)"
    }

    func whenStopping(_ body: @escaping () -> Void) { onStop.append(body) }

    func start() {
        var n = 0
        func id() -> Int {
            n += 1
            return n
        }
        clients.append(CollectorClient(traffic: self, id: id()))
        for _ in 0..<mix.kv { clients.append(KVClient(traffic: self, id: id())) }
        for _ in 0..<mix.kubernetes { clients.append(KubernetesClient(traffic: self, id: id())) }
        if mix.compactionIntervalMs > 0 { clients.append(CompactionClient(traffic: self, id: id())) }
        for _ in 0..<mix.leases { clients.append(LeaseClient(traffic: self, id: id())) }
        for i in 0..<mix.lockers { clients.append(LockClient(traffic: self, id: id(), leaseZero: i % 2 == 0)) }
        for i in 0..<mix.campaigners {
            clients.append(CampaignClient(traffic: self, id: id(), leaseZero: i % 2 == 0))
        }
        if mix.campaigners > 0 { clients.append(ObserverClient(traffic: self, id: id())) }
        for _ in 0..<mix.watchers { clients.append(WatchClient(traffic: self, id: id())) }
    }

    /// Stops issuing requests; watches end.
    func stop() {
        stopping = true
        let bodies = onStop
        onStop = []
        for b in bodies { b() }
    }

    // MARK: Recording KV operations

    /// Sends `request` and records it with its answer (or its unknown outcome).
    func perform(
        _ conn: Connection, client: Int, _ request: Request, timeoutMs: UInt64 = 2000,
        _ done: @escaping (Operation) -> Void
    ) {
        nextOp += 1
        var op = Operation(
            id: nextOp, client: client, request: request, call: monotonicNanos(), returned: nil, response: nil,
            revision: 0, error: nil)
        inFlight += 1
        let finish = { [self] (o: Operation) in
            inFlight -= 1
            history.operations.append(o)
            done(o)
        }
        func failed(_ f: CallFailure) {
            switch f {
            case .refused(let s):
                op.returned = monotonicNanos()
                op.error = s.message
            case .unknown(let why):
                op.error = why
            }
            finish(op)
        }
        switch request {
        case .range(let key, let end, let revision, let limit):
            var r = Etcdserverpb_RangeRequest()
            r.key = Data(key.utf8)
            r.rangeEnd = Data(end.utf8)
            r.revision = revision
            r.limit = limit
            conn.call(.range, r, timeoutMs: timeoutMs) { (result: Result<Etcdserverpb_RangeResponse, CallFailure>) in
                switch result {
                case .failure(let f): failed(f)
                case .success(let resp):
                    op.returned = monotonicNanos()
                    op.revision = resp.header.revision
                    op.response = .range(kvs: resp.kvs.map(KV.init), count: resp.count, more: resp.more)
                    finish(op)
                }
            }
        case .txn(let compares, let success, let failure):
            var t = Etcdserverpb_TxnRequest()
            t.compare = compares.map(Self.compare)
            t.success = success.map(Self.requestOp)
            t.failure = failure.map(Self.requestOp)
            conn.call(.txn, t, timeoutMs: timeoutMs) { (result: Result<Etcdserverpb_TxnResponse, CallFailure>) in
                switch result {
                case .failure(let f): failed(f)
                case .success(let resp):
                    op.returned = monotonicNanos()
                    op.revision = resp.header.revision
                    op.response = .txn(succeeded: resp.succeeded, results: resp.responses.map(Self.result))
                    finish(op)
                }
            }
        case .leaseGrant(let ttl):
            var g = Etcdserverpb_LeaseGrantRequest()
            g.ttl = ttl
            conn.call(.leaseGrant, g, timeoutMs: timeoutMs) {
                (result: Result<Etcdserverpb_LeaseGrantResponse, CallFailure>) in
                switch result {
                case .failure(let f): failed(f)
                case .success(let resp) where !resp.error.isEmpty:
                    failed(.refused(GRPCStatus(.unknown, resp.error)))
                case .success(let resp):
                    op.returned = monotonicNanos()
                    op.revision = resp.header.revision
                    op.response = .leaseGrant(id: resp.id, ttl: resp.ttl)
                    finish(op)
                }
            }
        case .leaseRevoke(let id):
            var r = Etcdserverpb_LeaseRevokeRequest()
            r.id = id
            conn.call(.leaseRevoke, r, timeoutMs: timeoutMs) {
                (result: Result<Etcdserverpb_LeaseRevokeResponse, CallFailure>) in
                switch result {
                case .failure(let f): failed(f)
                case .success(let resp):
                    op.returned = monotonicNanos()
                    op.revision = resp.header.revision
                    op.response = .leaseRevoke
                    finish(op)
                }
            }
        case .compact(let revision):
            var c = Etcdserverpb_CompactionRequest()
            c.revision = revision
            conn.call(.compact, c, timeoutMs: timeoutMs) {
                (result: Result<Etcdserverpb_CompactionResponse, CallFailure>) in
                switch result {
                case .failure(let f): failed(f)
                case .success(let resp):
                    op.returned = monotonicNanos()
                    op.revision = resp.header.revision
                    op.response = .compact
                    finish(op)
                }
            }
        }
    }

    /// Counts a request that is not a KV operation (locks, keep-alives) as in flight.
    func begin() { inFlight += 1 }
    func end() { inFlight -= 1 }

    static func compare(_ c: Compare) -> Etcdserverpb_Compare {
        var p = Etcdserverpb_Compare()
        p.key = Data(c.key.utf8)
        p.result = .equal
        switch c.target {
        case .version:
            p.target = .version
            p.version = c.number
        case .mod:
            p.target = .mod
            p.modRevision = c.number
        case .create:
            p.target = .create
            p.createRevision = c.number
        case .value:
            p.target = .value
            p.value = Data(c.value.utf8)
        }
        return p
    }

    static func requestOp(_ o: TxnOp) -> Etcdserverpb_RequestOp {
        var r = Etcdserverpb_RequestOp()
        switch o {
        case .get(let k):
            var g = Etcdserverpb_RangeRequest()
            g.key = Data(k.utf8)
            r.requestRange = g
        case .put(let k, let v, let lease):
            var p = Etcdserverpb_PutRequest()
            p.key = Data(k.utf8)
            p.value = Data(v.utf8)
            p.lease = lease
            r.requestPut = p
        case .delete(let k):
            var d = Etcdserverpb_DeleteRangeRequest()
            d.key = Data(k.utf8)
            r.requestDeleteRange = d
        }
        return r
    }

    static func result(_ r: Etcdserverpb_ResponseOp) -> TxnResult {
        switch r.response {
        case .responseRange(let g)?: .got(g.kvs.first.map(KV.init))
        case .responsePut?: .put
        case .responseDeleteRange(let d)?: .deleted(d.deleted)
        default: .put
        }
    }
}

/// A client that issues one request at a time until the traffic stops.
class TrafficClient {
    unowned let traffic: Traffic
    let id: Int
    var rng: SeededRandom
    let conn: Connection

    init(traffic: Traffic, id: Int) {
        self.traffic = traffic
        self.id = id
        rng = SeededRandom(seed: traffic.clientSeed())
        conn = traffic.connection()
    }

    /// Runs `body` after a pause of up to `maxMs` (a failed request waits 50 ms: the server may be
    /// down).
    func next(afterMs maxMs: UInt64 = 3, _ body: @escaping () -> Void) {
        guard !traffic.stopping else { return }
        let ms = maxMs == 0 ? 0 : UInt64.random(in: 0...maxMs, using: &rng)
        if ms == 0 {
            traffic.loop.atEndOfTurn(body)
        } else {
            conn.after(ms: ms, body)
        }
    }
}

/// etcd's robustness "etcd traffic": ten keys, every kind of KV request.
final class KVClient: TrafficClient {
    private let keys = (0..<10).map { "key/\($0)" }
    private var lease: Int64 = 0
    private var lastRevision: Int64 = 0

    override init(traffic: Traffic, id: Int) {
        super.init(traffic: traffic, id: id)
        next(run)
    }

    private func key() -> String { keys.randomElement(using: &rng)! }

    private func run() {
        let value = traffic.uniqueValue(id)
        let done = { [self] (o: Operation) in
            if o.succeeded, case .range(_, _, 0, _) = o.request { lastRevision = o.revision }
            next(afterMs: o.succeeded ? 3 : 50, run)
        }
        switch rng.weighted([15, 8, 5, 25, 6, 10, 10, 5, 2]) {
        case 0: traffic.perform(conn, client: id, .range(key: key(), end: "", revision: 0, limit: 0), done)
        case 1:
            let limit: Int64 = Bool.random(using: &rng) ? 0 : 4
            traffic.perform(conn, client: id, .range(key: "key/", end: "key0", revision: 0, limit: limit), done)
        case 2:
            // A read at an older revision (consistent reads across several calls use these).
            traffic.perform(conn, client: id, .range(key: key(), end: "", revision: lastRevision, limit: 0), done)
        case 3: traffic.perform(conn, client: id, Self.put(key(), value), done)
        case 4: traffic.perform(conn, client: id, .txn(compares: [], success: [.delete(key())], failure: []), done)
        case 5:
            var ops: [TxnOp] = []
            for k in keys.shuffled(using: &rng).prefix(4) {
                switch rng.weighted([50, 35, 15]) {
                case 0: ops.append(.put(k, value: value + "-" + k.dropFirst(4), lease: 0))
                case 1: ops.append(.get(k))
                default: ops.append(.delete(k))
                }
            }
            if !ops.contains(where: { if case .put = $0 { true } else { false } }) {
                ops[0] = .put(ops[0].key, value: value + "-" + ops[0].key.dropFirst(4), lease: 0)
            }
            traffic.perform(conn, client: id, .txn(compares: [], success: ops, failure: []), done)
        case 6:
            // Compare-and-set: read, then put if nothing changed meanwhile.
            let k = key()
            traffic.perform(conn, client: id, .range(key: k, end: "", revision: 0, limit: 0)) { [self] got in
                guard got.succeeded, case .range(let kvs, _, _)? = got.response else { return done(got) }
                let seen = kvs.first?.modRevision ?? 0
                traffic.perform(
                    conn, client: id,
                    .txn(
                        compares: [Compare(key: k, target: .mod, number: seen)],
                        success: [.put(k, value: value, lease: 0)], failure: [.get(k)]), done)
            }
        case 7:
            guard lease == 0 else {
                return traffic.perform(conn, client: id, Self.put(key(), value, lease: lease), done)
            }
            traffic.perform(conn, client: id, .leaseGrant(ttl: 600)) { [self] o in
                if case .leaseGrant(let l, _)? = o.response { lease = l }
                done(o)
            }
        default:
            guard lease != 0 else { return next(run) }
            let l = lease
            lease = 0
            traffic.perform(conn, client: id, .leaseRevoke(id: l), done)
        }
    }

    static func put(_ k: String, _ v: String, lease: Int64 = 0) -> Request {
        .txn(compares: [], success: [.put(k, value: v, lease: lease)], failure: [])
    }
}

/// The kube-apiserver's storage calls on `/registry/pods/`: optimistic creates, updates and
/// deletes, gets, and paginated lists pinned to their first page's revision.
final class KubernetesClient: TrafficClient {
    static let prefix = "/registry/pods/default/"
    /// Known objects and the mod revision last seen for each.
    private var objects: [String: Int64] = [:]

    override init(traffic: Traffic, id: Int) {
        super.init(traffic: traffic, id: id)
        next(run)
    }

    private func run() {
        let done = { [self] (o: Operation) in next(afterMs: o.succeeded ? 3 : 50, run) }
        let choice = objects.count < 4 ? 0 : rng.weighted([5, 60, 8, 12, 15])
        let value = traffic.uniqueValue(id)
        switch choice {
        case 0:
            let k = Self.prefix + "p\(id)-\(Int.random(in: 0..<1000, using: &rng))"
            traffic.perform(
                conn, client: id,
                .txn(
                    compares: [Compare(key: k, target: .mod, number: 0)], success: [.put(k, value: value, lease: 0)],
                    failure: [.get(k)])
            ) { [self] o in
                remember(k, o)
                done(o)
            }
        case 1, 2:
            let (k, rev) = objects.randomElement(using: &rng)!
            let op: TxnOp = choice == 1 ? .put(k, value: value, lease: 0) : .delete(k)
            traffic.perform(
                conn, client: id,
                .txn(compares: [Compare(key: k, target: .mod, number: rev)], success: [op], failure: [.get(k)])
            ) { [self] o in
                remember(k, o)
                done(o)
            }
        case 3:
            let k = objects.keys.randomElement(using: &rng)!
            traffic.perform(conn, client: id, .range(key: k, end: "", revision: 0, limit: 0)) { [self] o in
                if case .range(let kvs, _, _)? = o.response { objects[k] = kvs.first?.modRevision }
                done(o)
            }
        default: list(after: nil, revision: 0, done)
        }
    }

    /// One page of a list (limit 3, continue = last key + "\0"), the next at the first's revision.
    private func list(after: String?, revision: Int64, _ done: @escaping (Operation) -> Void) {
        let start = after.map { $0 + "\0" } ?? Self.prefix
        traffic.perform(
            conn, client: id, .range(key: start, end: KeySpace.prefixEnd(Self.prefix), revision: revision, limit: 3)
        ) { [self] o in
            guard o.succeeded, case .range(let kvs, _, let more)? = o.response else { return done(o) }
            for kv in kvs { objects[kv.key] = kv.modRevision }
            if more, let last = kvs.last, !traffic.stopping {
                list(after: last.key, revision: revision == 0 ? o.revision : revision, done)
            } else {
                done(o)
            }
        }
    }

    private func remember(_ k: String, _ o: Operation) {
        guard case .txn(let ok, let results)? = o.response else { return }
        if ok {
            if case .txn(_, let s, _) = o.request, case .delete = s.first {
                objects[k] = nil
            } else {
                objects[k] = o.revision
            }
        } else if case .got(let kv)? = results.first {
            objects[k] = kv?.modRevision
        }
    }
}

/// The kube-apiserver's compaction: a txn on `compact_rev_key` (version compare), and when it
/// wins, Compact at the revision the previous round recorded. Never past what the collector has
/// seen, so the reference history keeps every revision.
final class CompactionClient: TrafficClient {
    private var version: Int64 = 0
    private var previous: Int64 = 0

    override init(traffic: Traffic, id: Int) {
        super.init(traffic: traffic, id: id)
        conn.after(ms: traffic.mix.compactionIntervalMs, run)
    }

    private func run() {
        guard !traffic.stopping else { return }
        let key = "compact_rev_key"
        traffic.perform(
            conn, client: id,
            .txn(
                compares: [Compare(key: key, target: .version, number: version)],
                success: [.put(key, value: traffic.uniqueValue(id), lease: 0)], failure: [.get(key)])
        ) { [self] o in
            let again = { [self] in conn.after(ms: traffic.mix.compactionIntervalMs, run) }
            guard case .txn(let won, let results)? = o.response else { return again() }
            if !won {
                if case .got(let kv)? = results.first { version = kv?.version ?? 0 }
                return again()
            }
            version += 1
            let target = min(previous, traffic.collectorRevision)
            previous = o.revision
            guard target > 1 else { return again() }
            traffic.perform(conn, client: id, .compact(revision: target)) { _ in again() }
        }
    }
}
