import EtcdProto
import EventLoop
import Foundation
import GRPC
import SwiftProtobuf
import VigilClient
import VigilCore

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
