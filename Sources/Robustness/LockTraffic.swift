import EtcdProto
import Foundation
import GRPC
import SwiftProtobuf
import VigilClient
import VigilCore

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
