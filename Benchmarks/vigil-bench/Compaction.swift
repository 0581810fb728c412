// The compaction workload of vigil-bench: writes `total` revisions over `keySpace` keys (durable
// puts, `clients` in flight), reads the server's memory (`--server-pid`), then runs HashKV and
// compacts all of it with physical=true, each while a prober runs one Range every millisecond, then
// defragments. Reports each step's duration, the probes' latency during HashKV and during the
// compaction, and the database size before and after. `--write-only` stops after the writes.
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
    let probe: ServerProbe

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
        let memory = probe.memoryKiB()
        var result: [String: Any] = [
            "workload": "compaction", "revisions": bench.total, "keys": bench.keySpace, "write_seconds": writeSeconds,
            "db_mb_before": Double(before?.dbSize ?? 0) / 1e6, "rss_mb_after_writes": Double(memory.rss) / 1024,
            "rss_anon_mb_after_writes": Double(memory.anon) / 1024,
            "rss_file_mb_after_writes": Double(memory.file) / 1024,
        ]
        if bench.writeOnly { return result }

        let prober = connections.count > 1 ? connections[1] : connections[0]
        // HashKV over the whole history, while probing.
        var hashProbes = Latencies()
        let h0 = now()
        var hashError = ""
        probing(prober, into: &hashProbes) { finished in
            control.unary(EtcdMethod.hashKV.path, Etcdserverpb_HashKVRequest()) {
                (r: Result<Etcdserverpb_HashKVResponse, GRPCStatus>) in
                if case .failure(let e) = r { hashError = e.description }
                finished()
            }
        }
        result["hashkv_seconds"] = Double(now() - h0) / 1e9
        result["hashkv_error"] = hashError
        result["hashkv_probe_p99_ms"] = hashProbes.ms(0.99)
        result["hashkv_probe_max_ms"] = hashProbes.maxMs

        // Compact everything but the last revision of each key, physically, while probing.
        var probes = Latencies()
        var c = Etcdserverpb_CompactionRequest()
        c.revision = revision
        c.physical = true
        let c0 = now()
        var compactError = ""
        probing(prober, into: &probes) { finished in
            control.unary(EtcdMethod.compact.path, c) { (r: Result<Etcdserverpb_CompactionResponse, GRPCStatus>) in
                if case .failure(let e) = r { compactError = e.description }
                finished()
            }
        }
        let compactSeconds = Double(now() - c0) / 1e9
        let afterCompact = status(control)

        let d0 = now()
        _ = call(
            control, EtcdMethod.defragment.path, Etcdserverpb_DefragmentRequest(),
            as: Etcdserverpb_DefragmentResponse.self)
        let defragSeconds = Double(now() - d0) / 1e9
        let afterDefrag = status(control)
        result.merge([
            "compact_seconds": compactSeconds, "compact_error": compactError, "probes": probes.count,
            "probe_p50_ms": probes.ms(0.5), "probe_p99_ms": probes.ms(0.99),
            "probe_max_ms": probes.maxMs, "defrag_seconds": defragSeconds,
            "db_mb_after_compact": Double(afterCompact?.dbSize ?? 0) / 1e6,
            "db_mb_after_defrag": Double(afterDefrag?.dbSize ?? 0) / 1e6,
        ]) { $1 }
        return result
    }

    /// Starts `work` (which calls `finished` when its answer is in) and sends one single-key Range
    /// every millisecond (one at a time) on `prober` until then, collecting their latencies in ms.
    private func probing(
        _ prober: GRPCClientConnection, into probes: inout Latencies, _ work: (@escaping () -> Void) -> Void
    ) {
        var done = false
        var inFlight = false
        var collected = Latencies()
        let keySpace = bench.keySpace
        let bench = self.bench
        let timer = LoopTimer(loop: loop, timeoutMs: 1, repeatMs: 1) {
            guard !done, !inFlight else { return }
            inFlight = true
            let p0 = DispatchTime.now().uptimeNanoseconds
            var r = Etcdserverpb_RangeRequest()
            r.key = bench.key(Int.random(in: 0..<keySpace))
            prober.unary(EtcdMethod.range.path, r) { (_: Result<Etcdserverpb_RangeResponse, GRPCStatus>) in
                collected.record(ms: Double(DispatchTime.now().uptimeNanoseconds - p0) / 1e6)
                inFlight = false
            }
        }
        work { done = true }
        runUntil(seconds: 3600) { done && !inFlight }
        timer.cancel()
        probes = collected
    }
}
