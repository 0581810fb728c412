import EtcdProto
import EventLoop
import Foundation
import GRPC
import SwiftProtobuf
import VigilClient
import VigilCore

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
