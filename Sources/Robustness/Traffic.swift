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
