// The watch workloads of vigil-bench.
//
// watch:    `streams` Watch streams (over `watchConns` connections) each with one watcher on the
//           prefix `w/`; one writer puts `total` keys under it (one put in flight, or `rate` puts per
//           second). Every stream checks that it gets every event exactly once and in order; put→event
//           latency is measured for each delivered event.
// watchers: `streams` streams each with `watchersPerStream` watchers on distinct keys; reports the
//           server's memory per watcher and its CPU per put with 1 watcher per stream and then with
//           all of them (dispatch cost should not depend on how many watchers exist).
//
// With `--server-pid` the server's resident memory and CPU time are read from /proc at each phase.
import EtcdProto
import EventLoop
import Foundation
import GRPC
import VigilClient
import VigilCore

struct ServerProbe {
    let pid: Int32?

    /// VmRSS in KiB, or 0 without a pid.
    func rssKiB() -> Int {
        guard let pid, let s = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return 0 }
        for line in s.split(separator: "\n") where line.hasPrefix("VmRSS:") {
            return Int(line.split(separator: " ", omittingEmptySubsequences: true)[1]) ?? 0
        }
        return 0
    }

    /// VmRSS and its anonymous and file-backed parts (RssAnon, RssFile) in KiB; zeros without a pid.
    func memoryKiB() -> (rss: Int, anon: Int, file: Int) {
        guard let pid, let s = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else {
            return (0, 0, 0)
        }
        var out = (rss: 0, anon: 0, file: 0)
        for line in s.split(separator: "\n") {
            let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            guard fields.count >= 2, let kib = Int(fields[1]) else { continue }
            switch fields[0] {
            case "VmRSS:": out.rss = kib
            case "RssAnon:": out.anon = kib
            case "RssFile:": out.file = kib
            default: break
            }
        }
        return out
    }

    /// User + system CPU seconds, or 0 without a pid.
    func cpuSeconds() -> Double {
        guard let pid, let s = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
            let close = s.lastIndex(of: ")")
        else { return 0 }
        let fields = s[s.index(after: close)...].split(separator: " ")
        let ticks = (Double(fields[11]) ?? 0) + (Double(fields[12]) ?? 0)
        return ticks / Double(sysconf(Int32(_SC_CLK_TCK)))
    }
}

/// One watch stream of the benchmark: counts events and checks their order as they arrive.
final class BenchStream {
    let call: ClientCall
    var created = 0
    var events = 0
    /// The last revision each watcher (by watch id) received, to check order per watcher.
    var lastRev: [Int64: Int64] = [:]
    var outOfOrder = 0
    var onEvent: ((Mvccpb_Event) -> Void)?
    var closed = false

    init(_ conn: GRPCClientConnection) {
        var me: BenchStream?
        call = conn.open(
            EtcdMethod.watch.path,
            onMessage: { bytes in
                guard let me, let r = try? Etcdserverpb_WatchResponse(serializedBytes: bytes) else { return }
                if r.created { me.created += 1 }
                for e in r.events {
                    if e.kv.modRevision <= me.lastRev[r.watchID, default: 0] { me.outOfOrder += 1 }
                    me.lastRev[r.watchID] = e.kv.modRevision
                    me.events += 1
                    me.onEvent?(e)
                }
            }, onClose: { _ in me?.closed = true })
        me = self
    }

    func watch(_ key: Data, _ end: Data = Data()) {
        var c = Etcdserverpb_WatchCreateRequest()
        c.key = key
        c.rangeEnd = end
        var r = Etcdserverpb_WatchRequest()
        r.createRequest = c
        call.send(r)
    }
}

/// What every special workload has: the options, the loop, the connections; and its helpers.
protocol Workload {
    var bench: Bench { get }
    var loop: EventLoop { get }
    var connections: [GRPCClientConnection] { get }
}

extension Workload {
    func now() -> UInt64 { DispatchTime.now().uptimeNanoseconds }

    @discardableResult
    func runUntil(seconds: Double, _ done: () -> Bool) -> Bool { loop.run(forAtMost: seconds, until: done) }
}

struct WatchBench: Workload {
    let bench: Bench
    let loop: EventLoop
    let connections: [GRPCClientConnection]
    let probe: ServerProbe

    /// Opens `bench.streams` streams spread over the watch connections.
    func openStreams(_ watchConns: [GRPCClientConnection]) -> [BenchStream] {
        (0..<bench.streams).map { BenchStream(watchConns[$0 % watchConns.count]) }
    }

    func connect(_ n: Int) throws -> [GRPCClientConnection] {
        var out: [GRPCClientConnection] = []
        var failure: (any Error)?
        for _ in 0..<n {
            GRPCClientConnection.connect(loop: loop, host: "127.0.0.1", port: bench.port, tls: benchTLS) { r in
                switch r {
                case .success(let c): out.append(c)
                case .failure(let e): failure = e
                }
            }
        }
        _ = runUntil(seconds: 30) { out.count + (failure == nil ? 0 : 1) >= n }
        if let failure { throw failure }
        return out
    }

    /// Puts keys `keys(i)` for i in 0..<count with one put in flight (or at `rate` per second);
    /// records each put's send time by index.
    func write(
        count: Int, key: @escaping (Int) -> Data, sentAt: @escaping (Int, UInt64) -> Void,
        until: () -> Bool
    ) -> (seconds: Double, errors: Int) {
        let writer = connections[0]
        let value = Data(repeating: UInt8(ascii: "v"), count: bench.valSize)
        var next = 0, errors = 0, inFlight = false
        var retry: LoopTimer?
        let start = now()
        let interval = bench.rate > 0 ? UInt64(1e9 / bench.rate) : 0
        func issue() {
            guard next < count, !inFlight else { return }
            if interval > 0 && now() < start + UInt64(next) * interval { return }
            var p = Etcdserverpb_PutRequest()
            p.key = key(next)
            p.value = value
            sentAt(next, now())
            next += 1
            inFlight = true
            send(p)
        }
        // With --retry-puts a failed put is sent again (50 ms later) until it lands; its send
        // time stays the first one, so its latency spans the outage.
        func send(_ p: Etcdserverpb_PutRequest) {
            writer.unary(EtcdMethod.put.path, p) { (r: Result<Etcdserverpb_PutResponse, GRPCStatus>) in
                if case .failure = r {
                    errors += 1
                    if bench.retryPuts {
                        retry = LoopTimer(loop: loop, timeoutMs: 50) { send(p) }
                        return
                    }
                }
                inFlight = false
                issue()
            }
        }
        let pacer = interval > 0 ? LoopTimer(loop: loop, timeoutMs: 1, repeatMs: 1) { issue() } : nil
        defer { pacer?.cancel() }
        issue()
        _ = runUntil(seconds: bench.maxSeconds) { next == count && !inFlight && until() }
        return (Double(now() - start) / 1e9, errors)
    }

    /// 10,000 streams on one prefix, one writer.
    func runFanout() throws -> [String: Any] {
        let rss0 = probe.rssKiB()
        let watchConns = try connect(bench.watchConns)
        let streams = openStreams(watchConns)
        // W watchers per stream on the prefix (with --watchers-per-stream; 1 by default here).
        let perStream = max(1, bench.prefixWatchersPerStream)
        for s in streams { for _ in 0..<perStream { s.watch(Data("w/".utf8), Data("w0".utf8)) } }
        guard runUntil(seconds: bench.maxSeconds, { streams.allSatisfy { $0.created >= perStream } }) else {
            throw BenchError("not every watch was created")
        }
        Thread.sleep(forTimeInterval: 1)
        let rssStreams = probe.rssKiB()

        // A stream that stops reading: its own connection, reading paused after it is created.
        var slow: [BenchStream] = []
        if bench.slowStreams > 0 {
            let slowConns = try connect(1)
            slow = (0..<bench.slowStreams).map { _ in BenchStream(slowConns[0]) }
            for s in slow { s.watch(Data("w/".utf8), Data("w0".utf8)) }
            _ = runUntil(seconds: 30) { slow.allSatisfy { $0.created > 0 } }
            slowConns[0].pauseReading()
        }

        let total = bench.total
        var sendTimes = [UInt64](repeating: 0, count: total)
        var latencies = Latencies()
        let sampleEvery = max(1, total * streams.count / 20_000_000)
        var delivered = 0
        for (n, s) in streams.enumerated() {
            s.onEvent = { e in
                delivered += 1
                guard n % sampleEvery == 0 else { return }
                // Keys are "w/<index>".
                let idx = Int(String(decoding: e.kv.key.dropFirst(2), as: UTF8.self)) ?? 0
                if idx < total {
                    latencies.record(ms: Double(DispatchTime.now().uptimeNanoseconds - sendTimes[idx]) / 1e6)
                }
            }
        }
        var result = deliver(
            total: total, expected: total * streams.count * perStream, sentAt: { sendTimes[$0] = $1 },
            delivered: { delivered })
        result.merge(
            figures(
                streams: streams.map { ($0.events, $0.outOfOrder) }, perStream: total * perStream,
                latencies: latencies, memory: (rss0, rssStreams))
        ) { $1 }
        result.merge([
            "workload": "watch", "watchers_per_stream": perStream,
            "slow_streams": slow.count, "slow_stream_events_before_resume": slow.reduce(0) { $0 + $1.events },
        ]) { $1 }
        return result
    }

    /// Puts `total` keys `w/<i>` (one in flight, or at `--rate`) until `expected` events were
    /// delivered; the time, the server's CPU and the deliveries.
    func deliver(
        total: Int, expected: Int, sentAt: @escaping (Int, UInt64) -> Void, delivered: () -> Int
    ) -> [String: Any] {
        let cpu0 = probe.cpuSeconds()
        let t0 = now()
        let w = write(
            count: total, key: { Data("w/\($0)".utf8) }, sentAt: sentAt, until: { delivered() >= expected })
        let seconds = Double(now() - t0) / 1e9
        let cpu = probe.cpuSeconds() - cpu0
        let n = delivered()
        return [
            "puts": total, "put_errors": w.errors, "delivered": n, "seconds": seconds,
            "events_per_s": Double(n) / seconds, "server_cpu_s": cpu,
            "cpu_s_per_million_events": n > 0 ? cpu * 1e6 / Double(n) : 0, "rss_end_kib": probe.rssKiB(),
        ]
    }

    /// Lost, duplicated and reordered events over the streams (each should have had `perStream`),
    /// the latency percentiles, and memory per stream.
    func figures(
        streams: [(events: Int, outOfOrder: Int)], perStream: Int, latencies: Latencies,
        memory: (before: Int, after: Int)
    ) -> [String: Any] {
        [
            "streams": streams.count,
            "lost": streams.reduce(0) { $0 + max(0, perStream - $1.events) },
            "duplicated": streams.reduce(0) { $0 + max(0, $1.events - perStream) },
            "reordered": streams.reduce(0) { $0 + $1.outOfOrder },
            "p50_ms": latencies.ms(0.5), "p90_ms": latencies.ms(0.9),
            "p99_ms": latencies.ms(0.99), "max_ms": latencies.maxMs,
            "rss_before_kib": memory.before, "rss_streams_kib": memory.after,
            "bytes_per_stream": Double(memory.after - memory.before) * 1024 / Double(max(1, streams.count)),
        ]
    }

    /// Many watchers on distinct keys: memory per watcher and dispatch cost with few and many.
    func runManyWatchers() throws -> [String: Any] {
        let watchConns = try connect(bench.watchConns)
        let streams = openStreams(watchConns)
        let perStream = bench.watchersPerStream
        func key(_ s: Int, _ w: Int) -> Data { Data("k/\(s)/\(w)".utf8) }
        // Phase 1: one watcher per stream.
        for (i, s) in streams.enumerated() { s.watch(key(i, 0)) }
        guard runUntil(seconds: bench.maxSeconds, { streams.allSatisfy { $0.created >= 1 } }) else {
            throw BenchError("phase 1 watches not created")
        }
        var delivered = 0
        var latencies = Latencies()
        var sendTimes: [UInt64] = []
        for s in streams {
            s.onEvent = { e in
                delivered += 1
                // The value carries the put's index.
                if let idx = Int(String(decoding: e.kv.value, as: UTF8.self)), idx < sendTimes.count {
                    latencies.record(ms: Double(DispatchTime.now().uptimeNanoseconds - sendTimes[idx]) / 1e6)
                }
            }
        }
        func dispatchPhase(_ watchersPerStream: Int) -> (cpuPerPut: Double, p50: Double, p99: Double) {
            let n = bench.total
            delivered = 0
            latencies = Latencies()
            sendTimes = [UInt64](repeating: 0, count: n)
            let writer = connections[0]
            var next = 0, inFlight = false
            let cpu0 = probe.cpuSeconds()
            func issue() {
                guard next < n, !inFlight else { return }
                var p = Etcdserverpb_PutRequest()
                // Each put matches exactly one watcher, spread over streams and watchers.
                p.key = key((next * 7919) % streams.count, next % watchersPerStream)
                p.value = Data(String(next).utf8)
                sendTimes[next] = now()
                next += 1
                inFlight = true
                writer.unary(EtcdMethod.put.path, p) { (_: Result<Etcdserverpb_PutResponse, GRPCStatus>) in
                    inFlight = false
                    issue()
                }
            }
            issue()
            _ = runUntil(seconds: bench.maxSeconds) { next == n && !inFlight && delivered >= n }
            let cpu = probe.cpuSeconds() - cpu0
            return (cpu / Double(n), latencies.ms(0.5), latencies.ms(0.99))
        }
        Thread.sleep(forTimeInterval: 1)
        let few = dispatchPhase(1)
        let rssFew = probe.rssKiB()
        // Phase 2: the rest of the watchers.
        for (i, s) in streams.enumerated() {
            for w in 1..<max(1, perStream) { s.watch(key(i, w)) }
        }
        guard runUntil(seconds: bench.maxSeconds, { streams.allSatisfy { $0.created >= perStream } }) else {
            throw BenchError("phase 2 watches not created")
        }
        Thread.sleep(forTimeInterval: 2)
        let rssMany = probe.rssKiB()
        let many = dispatchPhase(perStream)
        let added = streams.count * (perStream - 1)
        return [
            "workload": "watchers", "streams": streams.count, "watchers": streams.count * perStream,
            "puts_per_phase": bench.total,
            "bytes_per_watcher": added > 0 ? Double(rssMany - rssFew) * 1024 / Double(added) : 0,
            "rss_few_kib": rssFew, "rss_many_kib": rssMany,
            "few_cpu_us_per_put": few.cpuPerPut * 1e6, "many_cpu_us_per_put": many.cpuPerPut * 1e6,
            "few_p50_ms": few.p50, "few_p99_ms": few.p99, "many_p50_ms": many.p50, "many_p99_ms": many.p99,
        ]
    }
}

struct BenchError: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}
