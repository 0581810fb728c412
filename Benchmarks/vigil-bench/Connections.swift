import EtcdProto
import EventLoop
import Foundation
import GRPC
import VigilClient
import VigilCore

/// `--workload connections`: new connections (over TLS with `--cacert`: full handshakes, no
/// session resumption) and idle ones.
///
/// Phase 1 makes `--total` connections, `--clients` at a time; each runs one small Range and
/// closes: connections per second, and the server's CPU per connection.
/// Phase 2 opens `--streams` connections that each run one Range and then stay idle: the
/// server's RSS growth per idle connection.
struct ConnectionBench: Workload {
    let bench: Bench
    let loop: EventLoop
    let connections: [GRPCClientConnection]
    let probe: ServerProbe

    func run() throws -> [String: Any] {
        var req = Etcdserverpb_RangeRequest()
        req.key = Data("connection-probe".utf8)
        req.serializable = true
        let total = bench.total
        var started = 0, finished = 0, errors = 0
        var firstError = ""
        let cpu0 = probe.cpuSeconds()
        let t0 = now()
        func one() {
            guard started < total else { return }
            started += 1
            GRPCClientConnection.connect(loop: loop, host: "127.0.0.1", port: bench.port, tls: benchTLS) { r in
                switch r {
                case .failure(let e):
                    errors += 1
                    if firstError.isEmpty { firstError = "\(e)" }
                    finished += 1
                    one()
                case .success(let c):
                    c.unary(EtcdMethod.range.path, req) { (res: Result<Etcdserverpb_RangeResponse, GRPCStatus>) in
                        if case .failure(let e) = res {
                            errors += 1
                            if firstError.isEmpty { firstError = e.description }
                        }
                        c.close()
                        finished += 1
                        one()
                    }
                }
            }
        }
        for _ in 0..<min(bench.clients, total) { one() }
        runUntil(seconds: bench.maxSeconds) { finished >= started && started >= total }
        let seconds = Double(now() - t0) / 1e9
        let cpu = probe.cpuSeconds() - cpu0

        // Idle connections: each made and used once, then left open.
        usleep(500_000)
        let rss0 = probe.rssKiB()
        // Opened `--clients` at a time, as connections arrive over time (all at once would
        // measure the peak of 2,000 handshakes in flight instead).
        var idle: [GRPCClientConnection] = []
        var ready = 0, opened = 0
        func open() {
            guard opened < bench.streams else { return }
            opened += 1
            GRPCClientConnection.connect(loop: loop, host: "127.0.0.1", port: bench.port, tls: benchTLS) { r in
                guard case .success(let c) = r else {
                    errors += 1
                    ready += 1
                    return open()
                }
                idle.append(c)
                c.unary(EtcdMethod.range.path, req) { (_: Result<Etcdserverpb_RangeResponse, GRPCStatus>) in
                    ready += 1
                    open()
                }
            }
        }
        for _ in 0..<min(bench.clients, bench.streams) { open() }
        runUntil(seconds: bench.maxSeconds) { ready >= bench.streams }
        runUntil(seconds: 1) { false }
        let rss1 = probe.rssKiB()
        for c in idle { c.close() }
        runUntil(seconds: 0.5) { false }
        return [
            "workload": "connections", "tls": benchTLS != nil, "connections": finished,
            "connections_per_s": Double(finished) / seconds, "errors": errors, "first_error": firstError,
            "cpu_ms_per_connection": 1000 * cpu / Double(max(finished, 1)),
            "idle_connections": idle.count,
            "bytes_per_idle_connection": Double((rss1 - rss0) * 1024) / Double(max(idle.count, 1)),
        ]
    }
}
