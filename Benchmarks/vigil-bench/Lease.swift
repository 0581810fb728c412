// The lease workloads of vigil-bench.
//
// keepalive:    `streams` LeaseKeepAlive streams (over `conns` connections), each renewing its own
//               lease with one request in flight, `total` renewals in all: renewals per second.
// leases:       grants `total` leases (TTL 600 s) with `clients` in flight: server memory per lease.
// lease-expiry: grants `total` leases with a 2 s TTL, one key each, then probes with reads while they
//               all expire: the longest read is the longest the server's loop stalled.
import EtcdProto
import EventLoop
import Foundation
import GRPC
import VigilClient
import VigilCore

struct LeaseBench: Workload {
    let bench: Bench
    let loop: EventLoop
    let connections: [GRPCClientConnection]
    let probe: ServerProbe

    /// Grants `n` leases of `ttl` seconds with `bench.clients` in flight; `then` runs after each
    /// grant with its index and ID and calls its completion when done with it.
    func grant(_ n: Int, ttl: Int64, then: ((Int, Int64, @escaping () -> Void) -> Void)? = nil) -> [Int64] {
        var ids = [Int64](repeating: 0, count: n)
        var next = 0, done = 0
        func issue(_ c: GRPCClientConnection) {
            guard next < n else { return }
            let i = next
            next += 1
            var g = Etcdserverpb_LeaseGrantRequest()
            g.ttl = ttl
            c.unary(EtcdMethod.leaseGrant.path, g) { (r: Result<Etcdserverpb_LeaseGrantResponse, GRPCStatus>) in
                ids[i] = (try? r.get().id) ?? 0
                let finish = {
                    done += 1
                    issue(c)
                }
                if let then { then(i, ids[i], finish) } else { finish() }
            }
        }
        for i in 0..<bench.clients { issue(connections[i % connections.count]) }
        _ = runUntil(seconds: bench.maxSeconds) { done == n }
        return ids
    }

    func runKeepAlive() throws -> [String: Any] {
        let ids = grant(bench.streams, ttl: 600)
        var renewed = 0, zero = 0
        var latencies = Latencies()
        var calls: [ClientCall] = []
        var sentAt = [UInt64](repeating: 0, count: ids.count)
        var sent = 0
        func send(_ s: Int) {
            guard sent < bench.total else { return }
            sent += 1
            var k = Etcdserverpb_LeaseKeepAliveRequest()
            k.id = ids[s]
            sentAt[s] = now()
            calls[s].send(k)
        }
        for (s, _) in ids.enumerated() {
            let conn = connections[s % connections.count]
            calls.append(
                conn.open(
                    EtcdMethod.leaseKeepAlive.path,
                    onMessage: { bytes in
                        renewed += 1
                        latencies.record(ms: Double(DispatchTime.now().uptimeNanoseconds - sentAt[s]) / 1e6)
                        if let r = try? Etcdserverpb_LeaseKeepAliveResponse(serializedBytes: bytes), r.ttl <= 0 {
                            zero += 1
                        }
                        send(s)
                    }, onClose: { _ in }))
        }
        let cpu0 = probe.cpuSeconds()
        let t0 = now()
        for s in 0..<ids.count { send(s) }
        _ = runUntil(seconds: bench.maxSeconds) { renewed >= bench.total }
        let seconds = Double(now() - t0) / 1e9
        let cpu = probe.cpuSeconds() - cpu0
        for c in calls { c.cancel() }
        return [
            "workload": "keepalive", "streams": ids.count, "renewals": renewed, "expired_answers": zero,
            "seconds": seconds, "per_s": Double(renewed) / seconds,
            "p50_ms": latencies.ms(0.5), "p90_ms": latencies.ms(0.9),
            "p99_ms": latencies.ms(0.99), "max_ms": latencies.maxMs,
            "cpu_us_per_renewal": renewed > 0 ? cpu * 1e6 / Double(renewed) : 0,
        ]
    }

    func runLeases() throws -> [String: Any] {
        Thread.sleep(forTimeInterval: 0.5)
        let rss0 = probe.rssKiB()
        let t0 = now()
        let ids = grant(bench.total, ttl: 600)
        let seconds = Double(now() - t0) / 1e9
        Thread.sleep(forTimeInterval: 1)
        let rss1 = probe.rssKiB()
        return [
            "workload": "leases", "leases": ids.filter { $0 != 0 }.count, "seconds": seconds,
            "grants_per_s": Double(ids.count) / seconds,
            "bytes_per_lease": Double(rss1 - rss0) * 1024 / Double(max(1, ids.count)),
        ]
    }

    func runExpiry() throws -> [String: Any] {
        let writer = connections[0]
        let ids = grant(bench.total, ttl: 2) { i, id, done in
            var p = Etcdserverpb_PutRequest()
            p.key = Data("exp/\(i)".utf8)
            p.lease = id
            writer.unary(EtcdMethod.put.path, p) { (_: Result<Etcdserverpb_PutResponse, GRPCStatus>) in done() }
        }
        let granted = now()
        var longest = 0.0
        var remaining = Int64(ids.count)
        var probes = 0
        var r = Etcdserverpb_RangeRequest()
        r.key = Data("exp/".utf8)
        r.rangeEnd = Data("exp0".utf8)
        r.countOnly = true
        r.serializable = true
        while remaining > 0 && now() < granted + UInt64(bench.maxSeconds * 1e9) {
            var done = false
            let t0 = now()
            writer.unary(EtcdMethod.range.path, r) { (res: Result<Etcdserverpb_RangeResponse, GRPCStatus>) in
                if case .success(let resp) = res { remaining = resp.count }
                done = true
            }
            _ = runUntil(seconds: 60) { done }
            longest = max(longest, Double(now() - t0) / 1e6)
            probes += 1
            Thread.sleep(forTimeInterval: 0.005)
        }
        return [
            "workload": "lease-expiry", "leases": ids.count, "probes": probes, "left": remaining,
            "seconds_to_expire_all": Double(now() - granted) / 1e9, "longest_read_ms": longest,
        ]
    }
}
