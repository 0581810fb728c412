import Foundation
import Testing
import VigilTesting

/// A seconds-long run of every benchmark workload against the real binary: the load tool and the
/// micro-benchmarks keep working (the real runs are `scripts/bench-vs-etcd.py`, not tests).
@Suite(.serialized) struct BenchSmokeTests {
    func bench(_ port: Int, _ args: [String]) throws -> [String: Any] {
        let dir = URL(fileURLWithPath: try vigilBinary()).deletingLastPathComponent()
        let r = try runCommand(
            dir.appendingPathComponent("vigil-bench").path,
            ["--endpoint", "127.0.0.1:\(port)", "--max-seconds", "60"] + args, timeout: 120)
        #expect(r.status == 0, "\(args): \(r.stderr)")
        let line = r.stdout.split(separator: "\n").last.map(String.init) ?? ""
        return (try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any]) ?? [:]
    }

    func number(_ v: Any?) -> Double { (v as? NSNumber)?.doubleValue ?? -1 }

    @Test func everyWorkloadRuns() throws {
        let server = try LiveServer(args: ["--unsafe-no-fsync"])
        let p = server.port
        let pid = String(server.pid ?? 0)
        for w in ["put", "range", "txn"] {
            let r = try bench(p, ["--workload", w, "--total", "300", "--conns", "2", "--clients", "8"])
            #expect(number(r["requests"]) == 300 && number(r["errors"]) == 0, "\(w): \(r)")
        }
        let watch = try bench(
            p,
            [
                "--workload", "watch", "--streams", "20", "--watch-conns", "2", "--total", "20",
                "--server-pid", pid, "--slow-streams", "1",
            ])
        #expect(number(watch["delivered"]) == 400 && number(watch["lost"]) == 0 && number(watch["reordered"]) == 0)
        let fanout = try bench(
            p,
            [
                "--workload", "watch-fanout", "--streams", "10", "--watch-conns", "2",
                "--prefix-watchers-per-stream", "3", "--total", "10",
            ])
        #expect(number(fanout["delivered"]) == 300 && number(fanout["lost"]) == 0 && number(fanout["reordered"]) == 0)
        let latency = try bench(
            p, ["--workload", "watch-latency", "--streams", "10", "--watch-conns", "2", "--total", "10"])
        #expect(number(latency["delivered"]) == 100 && number(latency["p99_ms"]) > 0)
        let watchers = try bench(
            p,
            [
                "--workload", "watchers", "--streams", "10", "--watch-conns", "2",
                "--watchers-per-stream", "5", "--total", "20", "--server-pid", pid,
            ])
        #expect(number(watchers["watchers"]) == 50)
        let ka = try bench(p, ["--workload", "lease-keepalive", "--streams", "4", "--total", "200"])
        #expect(number(ka["renewals"]) >= 200 && number(ka["expired_answers"]) == 0)
        let leases = try bench(p, ["--workload", "leases", "--total", "100", "--clients", "8", "--server-pid", pid])
        #expect(number(leases["leases"]) == 100)
        let expiry = try bench(p, ["--workload", "lease-expiry", "--total", "50", "--clients", "8"])
        #expect(number(expiry["left"]) == 0)
        let compaction = try bench(
            p,
            [
                "--workload", "compaction", "--total", "500", "--key-space", "50",
                "--conns", "2", "--clients", "8",
            ])
        #expect((compaction["compact_error"] as? String) == "" && number(compaction["compact_seconds"]) >= 0)
        #expect((compaction["hashkv_error"] as? String) == "" && number(compaction["hashkv_seconds"]) > 0)
        let sse = try bench(p, ["--workload", "watch-sse", "--streams", "20", "--total", "10", "--server-pid", pid])
        #expect(number(sse["delivered"]) == 200 && number(sse["lost"]) == 0 && number(sse["reordered"]) == 0)
        let history = try bench(p, ["--workload", "range", "--historic", "--total", "200", "--key-space", "50"])
        #expect(number(history["requests"]) == 200 && number(history["errors"]) == 0)
    }

    @Test func microBenchmarksRun() throws {
        let dir = URL(fileURLWithPath: try vigilBinary()).deletingLastPathComponent()
        let r = try runCommand(dir.appendingPathComponent("vigil-micro").path, ["--quick"], timeout: 300)
        #expect(r.status == 0, "\(r.stderr)")
        let lines = r.stdout.split(separator: "\n")
        #expect(lines.count == 10, "\(r.stdout)")  // a header, eight cases and the watcher memory line
        #expect(lines.contains { $0.hasPrefix("watch dispatch, 1 put → 1,000 watchers") })
        // The hub's own heap per watcher on distinct keys (10,000 of them here; the full run's
        // million costs about 60 B). Sanitizer allocators do not report their heap.
        let memoryLine = lines.first { $0.hasPrefix("hub heap bytes per watcher") }
        let perWatcher = memoryLine?.split(separator: " ").last.flatMap { Double($0) }
        #expect(perWatcher != nil, "\(r.stdout)")
        if sanitizerFactor == 1 { #expect((1..<100).contains(perWatcher ?? 0), "\(r.stdout)") }
        // Allocation counting works: a put into the index allocates something, a stab nothing much.
        let put =
            lines.first { $0.hasPrefix("put into the index") }?.split(separator: " ").last.flatMap { Double($0) } ?? 0
        #expect(put > 0 || r.stderr.contains("allocation counts are off"))
    }
}
