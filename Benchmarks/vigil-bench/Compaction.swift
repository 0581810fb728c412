// The compaction workload of vigil-bench: writes `total` revisions over `keySpace` keys (durable
// puts, `clients` in flight), then compacts all of it with physical=true while a prober runs one
// Range at a time, then defragments. Reports the compaction's and the defrag's duration, the
// probes' latency while the compaction ran, and the database size before and after.
import EtcdProto
import EventLoop
import Foundation
import GRPC
import SwiftProtobuf
import VigilClient
import VigilCore

struct CompactionBench: Workload {
    let bench: Bench
    let loop: EventLoop
    let connections: [GRPCClientConnection]

    func call<Req: SwiftProtobuf.Message, Resp: SwiftProtobuf.Message>(
        _ c: GRPCClientConnection, _ path: String, _ r: Req,
        as: Resp.Type
    ) -> Result<Resp, GRPCStatus>? {
        var result: Result<Resp, GRPCStatus>?
        c.unary(path, r) { result = $0 }
        runUntil(seconds: 3600) { result != nil }
        return result
    }

    func status(_ c: GRPCClientConnection) -> Etcdserverpb_StatusResponse? {
        try? call(c, EtcdMethod.status.path, Etcdserverpb_StatusRequest(), as: Etcdserverpb_StatusResponse.self)?.get()
    }

    func run() throws -> [String: Any] {
        let value = Data(repeating: UInt8(ascii: "v"), count: bench.valSize)
        var next = 0, done = 0
        let t0 = now()
        func issue(_ c: GRPCClientConnection) {
            guard next < bench.total else { return }
            var p = Etcdserverpb_PutRequest()
            p.key = bench.key(next)
            p.value = value
            next += 1
            c.unary(EtcdMethod.put.path, p) { (_: Result<Etcdserverpb_PutResponse, GRPCStatus>) in
                done += 1
                issue(c)
            }
        }
        for i in 0..<bench.clients { issue(connections[i % connections.count]) }
        runUntil(seconds: 3600) { done == bench.total }
        let writeSeconds = Double(now() - t0) / 1e9
        let control = connections[0]
        let before = status(control)
        let revision = before?.header.revision ?? 0

        // Compact everything but the last revision of each key, physically, while probing.
        var compacted = false
        var probes: [Double] = []
        let prober = connections.count > 1 ? connections[1] : connections[0]
        var probing = false
        func probe() {
            guard !compacted, !probing else { return }
            probing = true
            let p0 = now()
            var r = Etcdserverpb_RangeRequest()
            r.key = bench.key(Int.random(in: 0..<bench.keySpace))
            prober.unary(EtcdMethod.range.path, r) { (_: Result<Etcdserverpb_RangeResponse, GRPCStatus>) in
                probes.append(Double(DispatchTime.now().uptimeNanoseconds - p0) / 1e6)
                probing = false
            }
        }
        let probeTimer = LoopTimer(loop: loop, timeoutMs: 1, repeatMs: 1) { probe() }
        var c = Etcdserverpb_CompactionRequest()
        c.revision = revision
        c.physical = true
        let c0 = now()
        var compactError = ""
        control.unary(EtcdMethod.compact.path, c) { (r: Result<Etcdserverpb_CompactionResponse, GRPCStatus>) in
            if case .failure(let e) = r { compactError = e.description }
            compacted = true
        }
        runUntil(seconds: 3600) { compacted && !probing }
        probeTimer.cancel()
        let compactSeconds = Double(now() - c0) / 1e9
        let afterCompact = status(control)

        let d0 = now()
        _ = call(
            control, EtcdMethod.defragment.path, Etcdserverpb_DefragmentRequest(),
            as: Etcdserverpb_DefragmentResponse.self)
        let defragSeconds = Double(now() - d0) / 1e9
        let afterDefrag = status(control)
        probes.sort()
        return [
            "workload": "compaction", "revisions": bench.total, "keys": bench.keySpace, "write_seconds": writeSeconds,
            "compact_seconds": compactSeconds, "compact_error": compactError, "probes": probes.count,
            "probe_p50_ms": WatchBench.percentile(probes, 0.5), "probe_p99_ms": WatchBench.percentile(probes, 0.99),
            "probe_max_ms": probes.last ?? 0, "defrag_seconds": defragSeconds,
            "db_mb_before": Double(before?.dbSize ?? 0) / 1e6,
            "db_mb_after_compact": Double(afterCompact?.dbSize ?? 0) / 1e6,
            "db_mb_after_defrag": Double(afterDefrag?.dbSize ?? 0) / 1e6,
        ]
    }
}
