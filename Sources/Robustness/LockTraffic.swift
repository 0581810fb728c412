import EtcdProto
import Foundation
import GRPC
import SwiftProtobuf
import VigilClient
import VigilCore

/// Short leases (3 s) with keys `lease/<n>`: some kept alive by a keep-alive stream, some revoked,
/// the rest left to expire; the keys are read now and then (a key that outlived its lease would
/// show there).
final class LeaseClient: TrafficClient {
    static let ttl: Int64 = 3
    /// Leases kept alive, by id → index in the history's lease records.
    private var kept: [Int64: Int] = [:]
    private var stream: ClientCall?
    private var keyNumber = 0

    override init(traffic: Traffic, id: Int) {
        super.init(traffic: traffic, id: id)
        traffic.whenStopping { [weak self] in self?.stream?.cancel() }
        next(run)
        conn.after(ms: 1000, keepAlive)
    }

    private func run() {
        let done = { [self] (o: Operation) in next(afterMs: o.succeeded ? 20 : 50, run) }
        switch rng.weighted([3, 6, 2]) {
        case 0:
            traffic.perform(conn, client: id, .leaseGrant(ttl: Self.ttl)) { [self] o in
                guard case .leaseGrant(let lease, let ttl)? = o.response, let at = o.returned else { return done(o) }
                let index = traffic.history.leases.count
                traffic.history.leases.append(LeaseRecord(id: lease, ttl: ttl, granted: at))
                // Half are kept alive; a key or two go with each.
                if Bool.random(using: &rng) { kept[lease] = index }
                attach(lease, index, count: Int.random(in: 1...2, using: &rng), done)
            }
        case 1:
            traffic.perform(conn, client: id, .range(key: "lease/", end: "lease0", revision: 0, limit: 0), done)
        default:
            guard let (lease, index) = kept.randomElement(using: &rng) else { return next(run) }
            kept[lease] = nil
            traffic.history.leases[index].revokeCall = monotonicNanos()
            traffic.perform(conn, client: id, .leaseRevoke(id: lease), done)
        }
    }

    private func attach(_ lease: Int64, _ index: Int, count: Int, _ done: @escaping (Operation) -> Void) {
        keyNumber += 1
        let key = "lease/\(id)-\(keyNumber)"
        traffic.history.leases[index].keys.append(key)
        traffic.perform(conn, client: id, KVClient.put(key, traffic.uniqueValue(id), lease: lease)) { [self] o in
            if count > 1 && o.succeeded { attach(lease, index, count: count - 1, done) } else { done(o) }
        }
    }

    /// Every second, one keep-alive request per kept lease on one stream; each answer renews.
    private func keepAlive() {
        guard !traffic.stopping else { return }
        defer { conn.after(ms: 1000, keepAlive) }
        guard !kept.isEmpty else { return }
        if stream == nil || stream!.isClosed {
            stream = nil
            conn.get { [self] c in
                guard let c, stream == nil else { return }
                stream = c.open(
                    EtcdMethod.leaseKeepAlive.path,
                    onMessage: { [weak self] bytes in
                        guard let self, let r = try? Etcdserverpb_LeaseKeepAliveResponse(serializedBytes: bytes),
                            let index = traffic.history.leases.lastIndex(where: { $0.id == r.id })
                        else { return }
                        traffic.history.leases[index].renewals.append(.init(time: monotonicNanos(), ttl: r.ttl))
                        if r.ttl <= 0 { kept[r.id] = nil }
                    }, onClose: { [weak self] _ in self?.stream = nil })
                send()
            }
        } else {
            send()
        }
    }

    private func send() {
        for lease in kept.keys {
            var r = Etcdserverpb_LeaseKeepAliveRequest()
            r.id = lease
            stream?.send(r)
        }
    }
}

/// Lock contention on `locks/a`: Lock (with lease 0, or with a lease of the client's own), hold
/// a few milliseconds, Unlock.
final class LockClient: TrafficClient {
    static let name = "locks/a"
    private let leaseZero: Bool
    private var lease: Int64 = 0
    private var leaseGranted: Int64 = 0

    init(traffic: Traffic, id: Int, leaseZero: Bool) {
        self.leaseZero = leaseZero
        super.init(traffic: traffic, id: id)
        next(run)
    }

    private func run() {
        // A lease of its own lives 60 s and is not kept alive: a new one after 30 s.
        if lease != 0 && monotonicNanos() - leaseGranted > 30_000_000_000 { lease = 0 }
        guard leaseZero || lease != 0 else {
            return traffic.perform(conn, client: id, .leaseGrant(ttl: 60)) { [self] o in
                if case .leaseGrant(let l, _)? = o.response {
                    lease = l
                    leaseGranted = monotonicNanos()
                }
                next(afterMs: o.succeeded ? 0 : 50, run)
            }
        }
        var r = V3lockpb_LockRequest()
        r.name = Data(Self.name.utf8)
        r.lease = leaseZero ? 0 : lease
        var record = LockRecord(kind: .lock, client: id, name: Self.name, lease: r.lease, call: monotonicNanos())
        traffic.begin()
        conn.call(.lock, r, timeoutMs: 4000) { [self] (result: Result<V3lockpb_LockResponse, CallFailure>) in
            traffic.end()
            switch result {
            case .failure(let f):
                if case .refused = f { record.returned = monotonicNanos() }
                record.error = "\(f)"
                // A lease of its own that ended: the next Lock gets a new one.
                if "\(f)".contains("lease not found") || "\(f)".contains("session expired") { lease = 0 }
                traffic.history.locks.append(record)
                next(afterMs: 50, run)
            case .success(let resp):
                record.returned = monotonicNanos()
                record.key = String(decoding: resp.key, as: UTF8.self)
                record.headerRevision = resp.header.revision
                let index = traffic.history.locks.count
                traffic.history.locks.append(record)
                conn.after(ms: UInt64.random(in: 1...20, using: &rng)) { [self] in unlock(resp.key, index) }
            }
        }
    }

    private func unlock(_ key: Data, _ index: Int) {
        var u = V3lockpb_UnlockRequest()
        u.key = key
        release(.unlock, u, index, then: run) { (r: V3lockpb_UnlockResponse) in r.header.revision }
    }
}

extension TrafficClient {
    /// Sends the Unlock or Resign of lock record `index`, records when it was answered and at
    /// which revision, then goes on with `then`.
    func release<Req: SwiftProtobuf.Message, Resp: SwiftProtobuf.Message>(
        _ method: EtcdMethod, _ request: Req, _ index: Int, then: @escaping () -> Void,
        revision: @escaping (Resp) -> Int64
    ) {
        traffic.history.locks[index].releaseCall = monotonicNanos()
        traffic.begin()
        conn.call(method, request, timeoutMs: 2000) { [self] (result: Result<Resp, CallFailure>) in
            traffic.end()
            if case .success(let resp) = result {
                traffic.history.locks[index].releaseReturned = monotonicNanos()
                traffic.history.locks[index].releaseRevision = revision(resp)
            }
            next(afterMs: 10, then)
        }
    }
}

/// Campaigns on `elections/e`: lead, proclaim two values, resign.
final class CampaignClient: TrafficClient {
    static let name = "elections/e"
    private let leaseZero: Bool
    private var lease: Int64 = 0
    private var leaseGranted: Int64 = 0
    private var round = 0

    init(traffic: Traffic, id: Int, leaseZero: Bool) {
        self.leaseZero = leaseZero
        super.init(traffic: traffic, id: id)
        next(run)
    }

    private func run() {
        if lease != 0 && monotonicNanos() - leaseGranted > 30_000_000_000 { lease = 0 }
        guard leaseZero || lease != 0 else {
            return traffic.perform(conn, client: id, .leaseGrant(ttl: 60)) { [self] o in
                if case .leaseGrant(let l, _)? = o.response {
                    lease = l
                    leaseGranted = monotonicNanos()
                }
                next(afterMs: o.succeeded ? 0 : 50, run)
            }
        }
        round += 1
        var r = V3electionpb_CampaignRequest()
        r.name = Data(Self.name.utf8)
        r.lease = leaseZero ? 0 : lease
        r.value = Data("c\(id)-r\(round)-0".utf8)
        var record = LockRecord(kind: .campaign, client: id, name: Self.name, lease: r.lease, call: monotonicNanos())
        traffic.begin()
        conn.call(.campaign, r, timeoutMs: 4000) {
            [self] (result: Result<V3electionpb_CampaignResponse, CallFailure>) in
            traffic.end()
            switch result {
            case .failure(let f):
                if case .refused = f { record.returned = monotonicNanos() }
                record.error = "\(f)"
                if "\(f)".contains("lease not found") { lease = 0 }
                traffic.history.locks.append(record)
                next(afterMs: 50, run)
            case .success(let resp):
                record.returned = monotonicNanos()
                record.key = String(decoding: resp.leader.key, as: UTF8.self)
                record.headerRevision = resp.header.revision
                record.leaderRevision = resp.leader.rev
                record.leaderLease = resp.leader.lease
                let index = traffic.history.locks.count
                traffic.history.locks.append(record)
                proclaim(resp.leader, 1, index)
            }
        }
    }

    private func proclaim(_ leader: V3electionpb_LeaderKey, _ n: Int, _ index: Int) {
        guard n <= 2, !traffic.stopping else { return resign(leader, index) }
        var p = V3electionpb_ProclaimRequest()
        p.leader = leader
        p.value = Data("c\(id)-r\(round)-\(n)".utf8)
        traffic.begin()
        conn.call(.proclaim, p, timeoutMs: 2000) { [self] (_: Result<V3electionpb_ProclaimResponse, CallFailure>) in
            traffic.end()
            conn.after(ms: UInt64.random(in: 1...10, using: &rng)) { [self] in proclaim(leader, n + 1, index) }
        }
    }

    private func resign(_ leader: V3electionpb_LeaderKey, _ index: Int) {
        var r = V3electionpb_ResignRequest()
        r.leader = leader
        release(.resign, r, index, then: run) { (r: V3electionpb_ResignResponse) in r.header.revision }
    }
}

/// Follows the election: one Observe stream (opened again when it ends) and a Leader call every
/// 50 ms.
final class ObserverClient: TrafficClient {
    private var observe: ClientCall?
    private var streams = 0

    override init(traffic: Traffic, id: Int) {
        super.init(traffic: traffic, id: id)
        traffic.whenStopping { [weak self] in self?.observe?.cancel() }
        next(open)
        next(leader)
    }

    private func open() {
        guard !traffic.stopping else { return }
        conn.get { [self] c in
            guard let c else { return conn.after(ms: 100, open) }
            streams += 1
            let stream = streams
            var r = V3electionpb_LeaderRequest()
            r.name = Data(CampaignClient.name.utf8)
            observe = c.open(
                EtcdMethod.observe.path,
                onMessage: { [weak self] bytes in
                    guard let self, let m = try? V3electionpb_LeaderResponse(serializedBytes: bytes) else { return }
                    traffic.history.leaders.append(
                        LeaderReport(
                            client: id, time: monotonicNanos(), headerRevision: m.header.revision,
                            kv: m.hasKv ? KV(m.kv) : nil, stream: stream))
                },
                onClose: { [weak self] _ in
                    guard let self else { return }
                    observe = nil
                    conn.after(ms: 100, open)
                })
            observe?.send(r)
            observe?.closeSend()
        }
    }

    private func leader() {
        var r = V3electionpb_LeaderRequest()
        r.name = Data(CampaignClient.name.utf8)
        traffic.begin()
        conn.call(.leader, r, timeoutMs: 2000) { [self] (result: Result<V3electionpb_LeaderResponse, CallFailure>) in
            traffic.end()
            if case .success(let m) = result {
                traffic.history.leaders.append(
                    LeaderReport(
                        client: id, time: monotonicNanos(), headerRevision: m.header.revision,
                        kv: m.hasKv ? KV(m.kv) : nil, stream: nil))
            }
            next(afterMs: 50, leader)
        }
    }
}
