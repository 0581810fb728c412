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
