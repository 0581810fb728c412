import EtcdProto
import Foundation
import GRPC
import MVCC
import Testing
import VigilClient
import VigilCore
import VigilTesting

/// Crash consistency: writers keep many puts and two-key txns in flight while the server is killed
/// with SIGKILL at a random moment, again and again (fsync on, as in production). After each
/// restart every acknowledged write is there at its revision, a txn is all there or not at all,
/// revisions never go back, and HashKV equals the hash of a local replay of the writes that exist.
@Suite(.serialized) struct CrashTests {
    /// One write the test made: a put of `p/<id>` or a txn of `t/<id>/a` and `t/<id>/b`.
    struct Op {
        let id: Int
        var isTxn: Bool { id % 4 == 3 }
        var keys: [String] { isTxn ? ["t/\(id)/a", "t/\(id)/b"] : ["p/\(id)"] }
        var value: String { "v\(id)" }
    }

    @Test func acknowledgedWritesSurviveSIGKILL() throws {
        let server = try LiveServer(args: [])
        var acked: [Int: Int64] = [:]  // op id → revision
        var issued = 0
        var highestSeen: Int64 = 1
        var generator = SystemRandomNumberGenerator()

        for cycle in 0..<6 {
            let c = try BlockingClient(port: server.port)
            var conns = [c.connection]
            for _ in 0..<3 { conns.append(try c.newConnection()) }
            var outstanding = 0
            var killed = false
            let killAfter = Int.random(in: 20...200, using: &generator)
            var ackedThisCycle = 0
            func issue(_ conn: GRPCClientConnection) {
                guard !killed else { return }
                let op = Op(id: issued)
                issued += 1
                outstanding += 1
                let done: (Int64?) -> Void = { rev in
                    outstanding -= 1
                    if let rev {
                        acked[op.id] = rev
                        ackedThisCycle += 1
                        if ackedThisCycle == killAfter, let pid = server.pid {
                            kill(pid, SIGKILL)
                            killed = true
                        }
                    }
                    issue(conn)
                }
                if op.isTxn {
                    var t = Etcdserverpb_TxnRequest()
                    t.success = op.keys.map { k in
                        var p = Etcdserverpb_PutRequest()
                        p.key = Data(k.utf8)
                        p.value = Data(op.value.utf8)
                        var r = Etcdserverpb_RequestOp()
                        r.requestPut = p
                        return r
                    }
                    conn.unary(EtcdMethod.txn.path, t) { (r: Result<Etcdserverpb_TxnResponse, GRPCStatus>) in
                        done(try? r.get().header.revision)
                    }
                } else {
                    var p = Etcdserverpb_PutRequest()
                    p.key = Data(op.keys[0].utf8)
                    p.value = Data(op.value.utf8)
                    conn.unary(EtcdMethod.put.path, p) { (r: Result<Etcdserverpb_PutResponse, GRPCStatus>) in
                        done(try? r.get().header.revision)
                    }
                }
            }
            for i in 0..<32 { issue(conns[i % conns.count]) }
            c.runUntil(seconds: 60) { killed && outstanding == 0 }
            #expect(killed, "cycle \(cycle): the server was killed mid-write")
            for conn in conns { conn.close() }

            try server.restart()
            let check = try BlockingClient(port: server.port)
            var all = Etcdserverpb_RangeRequest()
            all.key = Data([0])
            all.rangeEnd = Data([0])
            let state = try check.call(EtcdMethod.range.path, all, as: Etcdserverpb_RangeResponse.self).get()
            var present: [String: Mvccpb_KeyValue] = [:]
            for kv in state.kvs { present[String(decoding: kv.key, as: UTF8.self)] = kv }

            // Every acknowledged write, at its revision; revisions never go back.
            for (id, rev) in acked {
                for k in Op(id: id).keys {
                    #expect(present[k]?.modRevision == rev, "acknowledged \(k) at \(rev)")
                    #expect(present[k].map { String(decoding: $0.value, as: UTF8.self) } == Op(id: id).value)
                }
            }
            #expect(state.header.revision >= highestSeen)
            #expect(state.header.revision >= acked.values.max() ?? 1)
            highestSeen = state.header.revision

            // Nothing half-exists: a txn's keys are both there (same revision) or both absent.
            var existing: [(rev: Int64, op: Op)] = []
            for id in 0..<issued {
                let op = Op(id: id)
                let kvs = op.keys.map { present[$0] }
                #expect(kvs.allSatisfy { $0 == nil } || kvs.allSatisfy { $0 != nil }, "op \(id) half applied")
                if let first = kvs.first ?? nil {
                    #expect(kvs.allSatisfy { $0?.modRevision == first.modRevision })
                    existing.append((first.modRevision, op))
                }
            }

            // HashKV equals a local replay of exactly the writes that exist, in revision order.
            let replay = KVStore()
            for (rev, op) in existing.sorted(by: { $0.rev < $1.rev }) {
                let txn = replay.beginWrite()
                #expect(txn.revision == rev, "revisions are dense: no write lost between acknowledged ones")
                for k in op.keys { txn.put(Array(k.utf8), value: Array(op.value.utf8), lease: 0) }
                _ = txn.end()
            }
            let hash = try check.call(
                EtcdMethod.hashKV.path, Etcdserverpb_HashKVRequest(),
                as: Etcdserverpb_HashKVResponse.self
            ).get()
            #expect(hash.hash == (try replay.hashKV(revision: 0)), "cycle \(cycle)")
        }
        print("crash test: \(issued) writes issued, \(acked.count) acknowledged, final revision \(highestSeen)")
        #expect(acked.count > 100)
    }

    /// Kills the server while a compaction removes history and again while a defragment rewrites
    /// the file (each at a random moment, many batches logged but not checkpointed): after each
    /// restart every key reads as last acknowledged, reads at or after the compaction revision
    /// work, and HashKV is the same over two restarts.
    @Test func killedDuringCompactionAndDefragmentLosesNothing() throws {
        let server = try LiveServer(args: [])
        var latest: [String: (value: String, rev: Int64)] = [:]
        var generator = SystemRandomNumberGenerator()
        func writeSome(_ c: BlockingClient, _ round: Int) {
            var outstanding = 0
            let value = String(repeating: "x", count: 900)
            for i in 0..<2_000 {
                let key = "k\(i % 250)"
                var p = Etcdserverpb_PutRequest()
                p.key = Data(key.utf8)
                p.value = Data("\(round)-\(i)-\(value)".utf8)
                outstanding += 1
                c.connection.unary(EtcdMethod.put.path, p) { (r: Result<Etcdserverpb_PutResponse, GRPCStatus>) in
                    outstanding -= 1
                    if let rev = try? r.get().header.revision, rev > (latest[key]?.rev ?? 0) {
                        latest[key] = ("\(round)-\(i)-\(value)", rev)
                    }
                }
                if outstanding >= 64 { c.runUntil(seconds: 30) { outstanding < 32 } }
            }
            c.runUntil(seconds: 30) { outstanding == 0 }
        }
        func verify(_ round: Int) throws -> UInt32 {
            let c = try BlockingClient(port: server.port)
            var all = Etcdserverpb_RangeRequest()
            all.key = Data([0])
            all.rangeEnd = Data([0])
            let state = try c.call(EtcdMethod.range.path, all, as: Etcdserverpb_RangeResponse.self).get()
            #expect(state.kvs.count == latest.count, "round \(round)")
            for kv in state.kvs {
                let want = latest[String(decoding: kv.key, as: UTF8.self)]
                #expect(want?.rev == kv.modRevision && want?.value == String(decoding: kv.value, as: UTF8.self))
            }
            return try c.call(
                EtcdMethod.hashKV.path, Etcdserverpb_HashKVRequest(), as: Etcdserverpb_HashKVResponse.self
            )
            .get().hash
        }
        for round in 0..<4 {
            let c = try BlockingClient(port: server.port)
            writeSome(c, round)
            let rev = latest.values.map(\.rev).max()!
            // Compact halfway (or defragment), and kill while it works.
            if round % 2 == 0 {
                var compact = Etcdserverpb_CompactionRequest()
                compact.revision = rev - 1_000
                compact.physical = true
                c.connection.unary(EtcdMethod.compact.path, compact) {
                    (_: Result<Etcdserverpb_CompactionResponse, GRPCStatus>) in
                }
            } else {
                c.connection.unary(EtcdMethod.defragment.path, Etcdserverpb_DefragmentRequest()) {
                    (_: Result<Etcdserverpb_DefragmentResponse, GRPCStatus>) in
                }
            }
            c.runUntil(seconds: Double.random(in: 0.001...0.05, using: &generator)) { false }
            if let pid = server.pid { kill(pid, SIGKILL) }
            try server.restart()
            let first = try verify(round)
            try server.restart()
            #expect(try verify(round) == first, "round \(round): HashKV stable over a restart")
            // A read at the last revision and one far back, which the compaction may have removed.
            let check = try BlockingClient(port: server.port)
            var old = Etcdserverpb_RangeRequest()
            old.key = Data("k1".utf8)
            old.revision = rev
            #expect((try? check.call(EtcdMethod.range.path, old, as: Etcdserverpb_RangeResponse.self).get().count) == 1)
        }
    }
}
