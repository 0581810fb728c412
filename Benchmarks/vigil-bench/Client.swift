// The Swift client library and the in-process API under load.
//
// client-put / client-range: the async `EtcdClient`, `clients` tasks each with one request in
//   flight, `total` requests. Reported beside the raw loop client's figures (`put`/`range` with
//   --conns 1): the async API's cost is the difference in this process's CPU per request.
// client-watch: `streams` watches of the async client on one prefix (`WatchSequence`s, one
//   consumer task each), `total` puts: events delivered per second and client CPU per event.
// inprocess-watch: a VigilServer embedded in this process, `streams` consumers of its in-process
//   watch (`AsyncSequence`), `total` puts through the in-process API: events per second to all
//   consumers and the server loop's longest turn (from its /metrics).
import Dispatch
import EventLoop
import Foundation
import VigilClient
import VigilServer

/// This process's user + system CPU seconds.
func ownCPUSeconds() -> Double {
    var u = rusage()
    getrusage(Int32(RUSAGE_SELF.rawValue), &u)
    return Double(u.ru_utime.tv_sec + u.ru_stime.tv_sec) + Double(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6
}

/// Runs `body` on the concurrency pool and waits for it (vigil-bench's commands are synchronous).
func blocking<T: Sendable>(_ body: @escaping @Sendable () async throws -> T) throws -> T {
    let done = DispatchSemaphore(value: 0)
    nonisolated(unsafe) var result: Result<T, any Error>?
    Task {
        do { result = .success(try await body()) } catch { result = .failure(error) }
        done.signal()
    }
    done.wait()
    return try result!.get()
}

/// A result handed back from the concurrency pool (JSON dictionaries are not `Sendable`).
struct Unchecked<T>: @unchecked Sendable {
    let value: T
}

/// Counts shared by the tasks of a run.
final class Tally: @unchecked Sendable {
    private let lock = NSLock()
    private var latencies = Latencies()
    private(set) var errors = 0
    private(set) var firstError = ""
    private var next = 0

    /// The next request number, or nil once `total` were taken.
    func take(_ total: Int) -> Int? {
        lock.withLock {
            guard next < total else { return nil }
            next += 1
            return next - 1
        }
    }

    func record(ms: Double, error: (any Error)?) {
        lock.withLock {
            latencies.record(ms: ms)
            if let error {
                errors += 1
                if firstError.isEmpty { firstError = "\(error)" }
            }
        }
    }

    var snapshot: Latencies { lock.withLock { latencies } }
}

struct ClientBench {
    let bench: Bench

    /// client-put and client-range.
    func runRequests() throws -> [String: Any] {
        let b = bench
        let client = try EtcdClient(endpoints: [b.endpoint])
        let value = [UInt8](repeating: UInt8(ascii: "v"), count: b.valSize)
        let read = b.workload == "client-range"
        if read {
            try blocking {
                for i in 0..<min(b.keySpace, b.total) { try await client.put([UInt8](b.key(i)), value) }
            }
        }
        var opts = RangeOptions()
        opts.serializable = b.consistency == "s"
        let options = opts
        let tally = Tally()
        let cpu0 = ownCPUSeconds()
        let start = DispatchTime.now().uptimeNanoseconds
        try blocking {
            await withTaskGroup(of: Void.self) { group in
                for _ in 0..<b.clients {
                    group.addTask {
                        while let i = tally.take(b.total) {
                            let t0 = DispatchTime.now().uptimeNanoseconds
                            var failure: (any Error)?
                            do {
                                if read {
                                    _ = try await client.get(.key([UInt8](b.key(i))), options)
                                } else {
                                    try await client.put([UInt8](b.key(i)), value)
                                }
                            } catch { failure = error }
                            tally.record(ms: Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e6, error: failure)
                        }
                    }
                }
            }
        }
        let seconds = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
        let cpu = ownCPUSeconds() - cpu0
        client.close()
        let l = tally.snapshot
        return [
            "workload": b.workload, "endpoint": b.endpoint, "requests": l.count, "errors": tally.errors,
            "first_error": tally.firstError, "seconds": seconds, "throughput": Double(l.count) / seconds,
            "p50_ms": l.ms(0.5), "p90_ms": l.ms(0.9), "p99_ms": l.ms(0.99), "max_ms": l.maxMs,
            "clients": b.clients, "client_cpu_us_per_op": cpu / Double(max(1, l.count)) * 1e6,
        ]
    }

    /// client-watch: watches of the async client, events per second and client CPU per event.
    func runWatch() throws -> [String: Any] {
        let b = bench
        let client = try EtcdClient(endpoints: [b.endpoint])
        let prefix = "cw/"
        let value = [UInt8](repeating: UInt8(ascii: "v"), count: b.valSize)
        return try blocking {
            var watches: [WatchSequence] = []
            for _ in 0..<b.streams { watches.append(try await client.watch(.prefix(prefix))) }
            let cpu0 = ownCPUSeconds()
            let start = DispatchTime.now().uptimeNanoseconds
            let (delivered, outOfOrder) = try await Self.consume(watches, expecting: b.total) {
                for i in 0..<b.total { try await client.put(Array((prefix + String(i % b.keySpace)).utf8), value) }
            }
            let seconds = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
            let cpu = ownCPUSeconds() - cpu0
            client.close()
            let result: [String: Any] = [
                "workload": "client-watch", "endpoint": b.endpoint, "streams": b.streams, "puts": b.total,
                "events": delivered, "expected": b.total * b.streams, "out_of_order": outOfOrder,
                "seconds": seconds, "events_per_second": Double(delivered) / seconds,
                "client_cpu_us_per_event": cpu / Double(max(1, delivered)) * 1e6,
            ]
            return Unchecked(value: result)
        }.value
    }

    /// One task per watch, each reading until `expecting` events came; `write` runs alongside.
    /// Returns the events delivered in all and how many came out of revision order.
    static func consume(
        _ watches: [WatchSequence], expecting: Int, write: @escaping @Sendable () async throws -> Void
    ) async throws -> (Int, Int) {
        try await withThrowingTaskGroup(of: (Int, Int).self) { group in
            for w in watches {
                group.addTask {
                    var n = 0
                    var bad = 0
                    var last: Int64 = 0
                    for try await batch in w {
                        for e in batch.events {
                            if e.revision <= last { bad += 1 }
                            last = e.revision
                        }
                        n += batch.events.count
                        if n >= expecting { break }
                    }
                    return (n, bad)
                }
            }
            try await write()
            var total = 0
            var bad = 0
            for try await (n, b) in group {
                total += n
                bad += b
            }
            return (total, bad)
        }
    }

    /// inprocess-watch: an embedded server, consumers of its in-process watch.
    func runInProcessWatch() throws -> [String: Any] {
        let b = bench
        var config = Configuration()
        config.dataDir = NSTemporaryDirectory() + "vigil-bench-inprocess-\(getpid())"
        config.listenClientURLs = ["http://127.0.0.1:0"]
        config.unsafeNoFsync = true
        config.metricsExportInterval = b.metricsExport
        defer { try? FileManager.default.removeItem(atPath: config.dataDir) }
        let server = VigilServer(configuration: config)
        let port = try server.start(handleSignals: false)[0]
        defer { server.stop() }
        let value = [UInt8](repeating: UInt8(ascii: "v"), count: b.valSize)
        let prefix = "ip/"
        let turnBefore = Self.metric(port: port, "vigil_loop_turn_seconds_max")
        return try blocking {
            var watches: [WatchSequence] = []
            for _ in 0..<b.streams { watches.append(try await server.watch(.prefix(prefix))) }
            let cpu0 = ownCPUSeconds()
            let start = DispatchTime.now().uptimeNanoseconds
            let writers = max(1, b.clients)
            let (delivered, outOfOrder) = try await Self.consume(watches, expecting: b.total) {
                let tally = Tally()
                try await withThrowingTaskGroup(of: Void.self) { group in
                    for _ in 0..<writers {
                        group.addTask {
                            while let i = tally.take(b.total) {
                                try await server.put(Array((prefix + String(i % b.keySpace)).utf8), value)
                            }
                        }
                    }
                    try await group.waitForAll()
                }
            }
            let seconds = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
            let cpu = ownCPUSeconds() - cpu0
            let result: [String: Any] = [
                "workload": "inprocess-watch", "metrics_export_s": b.metricsExport ?? 0, "consumers": b.streams,
                "puts": b.total, "writers": writers,
                "events": delivered, "expected": b.total * b.streams, "out_of_order": outOfOrder,
                "seconds": seconds, "events_per_second": Double(delivered) / seconds,
                "cpu_us_per_event": cpu / Double(max(1, delivered)) * 1e6,
                "loop_turn_max_ms_before": turnBefore * 1000,
                "loop_turn_max_ms": Self.metric(port: port, "vigil_loop_turn_seconds_max") * 1000,
                "metrics_export_max_ms": Self.metric(port: port, "vigil_metrics_export_seconds_max") * 1000,
            ]
            return Unchecked(value: result)
        }.value
    }

    /// A value from a server's /metrics (HTTP/1.0 on loopback), or -1.
    static func metric(port: Int, _ name: String) -> Double {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return -1 }
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = UInt16(port).bigEndian
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        let ok = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0
            }
        }
        guard ok else { return -1 }
        let req = Array("GET /metrics HTTP/1.0\r\n\r\n".utf8)
        _ = req.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, 0) }
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = recv(fd, &buf, buf.count, 0)
            if n <= 0 { break }
            out += buf[0..<n]
        }
        for line in String(decoding: out, as: UTF8.self).split(separator: "\n") where line.hasPrefix(name + " ") {
            return Double(line.split(separator: " ").last ?? "") ?? -1
        }
        return -1
    }
}
