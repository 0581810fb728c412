// vigil-bench: a load generator for etcd v3 servers (Vigil or etcd) on our own gRPC client and
// libuv loop. Prints one JSON object with throughput, latency percentiles and errors.
//
//   vigil-bench --endpoint 127.0.0.1:2379 --workload put --conns 4 --clients 64 --total 50000
//   vigil-bench --workload watch --streams 10000 --watch-conns 100 --total 200 --server-pid 1234
//   vigil-bench --workload watchers --streams 10000 --watchers-per-stream 100 --server-pid 1234
//   vigil-bench --workload keepalive --streams 100 --total 200000
//   vigil-bench --workload leases --total 100000 --server-pid 1234
//   vigil-bench --workload lease-expiry --total 100000
//   vigil-bench --workload compaction --total 1000000 --key-space 10000 --conns 8 --clients 256
//   vigil-bench --workload connections --total 2000 --clients 8 --streams 2000 --cacert ca.pem
// With --cacert (and --cert/--key for a client certificate) every connection is TLS.
import ArgumentParser
import EtcdProto
import EventLoop
import Foundation
import GRPC
import TLS
import VigilClient
import VigilCore

/// The client TLS context when `--cacert` is given (one loop: made once in `run`).
nonisolated(unsafe) var benchTLS: TLSContext?

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vigil-bench",
        abstract: "Load generator for etcd v3 servers.")

    @Option(help: "host:port of the server.") var endpoint = "127.0.0.1:2379"
    @Option(
        help: """
            put | range | txn | watch (= watch-fanout) | watch-latency | watchers | watch-sse \
            | keepalive (= lease-keepalive) \
            | leases | lease-expiry | compaction | connections \
            | client-put | client-range | client-watch (the async EtcdClient) \
            | inprocess-watch (an embedded VigilServer's in-process watch) \
            | big-read (one big range by RangeStream, by pages, and whole)
            """) var workload = "put"
    @Option(help: "TCP connections.") var conns = 4
    @Option(help: "Requests in flight in total, spread over the connections.") var clients = 64
    @Option(help: "Requests to send.") var total = 20000
    @Option(help: "Key size in bytes.") var keySize = 8
    @Option(help: "Value size in bytes.") var valSize = 256
    @Option(help: "Distinct keys (keys are picked in sequence modulo this).") var keySpace = 10000
    @Option(help: "Range consistency: l (linearizable) or s (serializable).") var consistency = "l"
    @Option(help: "Seconds to run at most.") var maxSeconds = 120.0
    @Option(help: "watch workloads: Watch streams.") var streams = 1000
    @Option(help: "watch workloads: connections the streams are spread over.") var watchConns = 100
    @Option(help: "watchers: watchers per stream, each on its own key.") var watchersPerStream = 100
    @Option(
        name: .customLong("prefix-watchers-per-stream"),
        help: "watch: watchers per stream on the prefix (each gets every event).") var prefixWatchersPerStream = 1
    @Option(help: "watch: puts per second (0 = one put in flight, as fast as it goes).") var rate = 0.0
    @Option(help: "watch: extra streams on their own connection that stop reading.") var slowStreams = 0
    @Option(help: "The server's pid, to read its memory and CPU from /proc.") var serverPid: Int32?
    @Flag(help: "watch: send a failed put again until it lands (a leader killed under load).") var retryPuts = false
    @Flag(help: "compaction: stop after the writes (and the memory reading).") var writeOnly = false
    @Flag(help: "range: write every key twice and read each at its first write's revision.") var historic = false
    @Option(help: "inprocess-watch: hand the metrics to the swift-metrics facade every this many seconds.")
    var metricsExport: Double?
    @Option(help: "big-read: keys per page of the paginated read.") var pageLimit: Int64 = 500
    @Flag(help: "big-read: the keys are there already.") var skipFill = false
    @Option(help: "TLS: the CA file the server's certificate chains to (connects over TLS).") var cacert: String?
    @Option(help: "TLS: a client certificate.") var cert: String?
    @Option(help: "TLS: the client certificate's key.") var key: String?

    var port: Int { Int(endpoint.split(separator: ":").last ?? "") ?? 2379 }

    static let workloads: Set<String> = [
        "client-put", "client-range", "client-watch", "inprocess-watch",
        "put", "range", "txn", "watch", "watch-fanout", "watch-latency", "watchers", "watch-sse",
        "keepalive", "lease-keepalive", "leases", "lease-expiry", "compaction", "connections", "big-read",
    ]

    func validate() throws {
        guard Self.workloads.contains(workload) else { throw ValidationError("unknown workload \(workload)") }
        guard conns > 0, clients >= conns, total > 0, keySize > 0, keySpace > 0 else {
            throw ValidationError("conns, clients, total, key-size and key-space must be positive (clients ≥ conns)")
        }
    }

    func key(_ i: Int) -> Data {
        var s = String(i % keySpace)
        if s.count < keySize { s = String(repeating: "0", count: keySize - s.count) + s }
        return Data(s.utf8.prefix(keySize))
    }

    func run() throws {
        if workload.hasPrefix("client-") || workload == "inprocess-watch" {
            let c = ClientBench(bench: self)
            let result =
                switch workload {
                case "client-watch": try c.runWatch()
                case "inprocess-watch": try c.runInProcessWatch()
                default: try c.runRequests()
                }
            let data = try JSONSerialization.data(withJSONObject: result, options: [.sortedKeys])
            print(String(decoding: data, as: UTF8.self))
            return
        }
        let parts = endpoint.split(separator: ":")
        guard parts.count == 2, let port = Int(parts[1]) else { throw ValidationError("endpoint must be host:port") }
        let host = String(parts[0])
        let loop = try EventLoop()
        let value = Data(repeating: UInt8(ascii: "v"), count: valSize)
        if let cacert {
            var c = TLSContext.ClientConfig()
            c.caFile = cacert
            c.certFile = cert
            c.keyFile = key
            benchTLS = try TLSContext.client(c)
        }

        var connections: [GRPCClientConnection] = []
        var failedConnect: (any Error)?
        for _ in 0..<conns {
            GRPCClientConnection.connect(loop: loop, host: host, port: port, tls: benchTLS) { r in
                switch r {
                case .success(let c): connections.append(c)
                case .failure(let e): failedConnect = e
                }
                if connections.count + (failedConnect == nil ? 0 : 1) == conns { loop.stop() }
            }
        }
        loop.run()
        if let failedConnect { throw ValidationError("connect: \(failedConnect)") }

        if ["watch", "watch-fanout", "watch-latency", "watchers", "watch-sse"].contains(workload) {
            var me = self
            // watch-latency: the fan-out at a gentle fixed rate, so that latency is not queueing.
            if workload == "watch-latency" && rate == 0 { me.rate = 20 }
            let w = WatchBench(bench: me, loop: loop, connections: connections, probe: ServerProbe(pid: serverPid))
            let result =
                switch workload {
                case "watchers": try w.runManyWatchers()
                case "watch-sse": try w.runSSE()
                default: try w.runFanout()
                }
            let data = try JSONSerialization.data(withJSONObject: result, options: [.sortedKeys])
            print(String(decoding: data, as: UTF8.self))
            return
        }
        if workload == "connections" {
            let result = try ConnectionBench(
                bench: self, loop: loop, connections: connections, probe: ServerProbe(pid: serverPid)
            ).run()
            let data = try JSONSerialization.data(withJSONObject: result, options: [.sortedKeys])
            print(String(decoding: data, as: UTF8.self))
            return
        }
        if workload == "big-read" {
            let result = try BigReadBench(
                bench: self, loop: loop, connection: connections[0], probe: ServerProbe(pid: serverPid),
                pageLimit: pageLimit
            ).run(fill: !skipFill)
            let data = try JSONSerialization.data(withJSONObject: result, options: [.sortedKeys])
            print(String(decoding: data, as: UTF8.self))
            return
        }
        if workload == "compaction" {
            let result = try CompactionBench(
                bench: self, loop: loop, connections: connections, probe: ServerProbe(pid: serverPid)
            ).run()
            let data = try JSONSerialization.data(withJSONObject: result, options: [.sortedKeys])
            print(String(decoding: data, as: UTF8.self))
            return
        }
        if ["keepalive", "lease-keepalive", "leases", "lease-expiry"].contains(workload) {
            let l = LeaseBench(bench: self, loop: loop, connections: connections, probe: ServerProbe(pid: serverPid))
            let result =
                switch workload {
                case "keepalive", "lease-keepalive": try l.runKeepAlive()
                case "leases": try l.runLeases()
                default: try l.runExpiry()
                }
            let data = try JSONSerialization.data(withJSONObject: result, options: [.sortedKeys])
            print(String(decoding: data, as: UTF8.self))
            return
        }

        // Prefill keys for read workloads so that ranges find something. `--historic`: twice, and
        // the ranges read each key at its first write's revision (a value the history holds).
        var firstRevisions: [Int64] = []
        if workload == "range" {
            let keys = min(keySpace, total)
            firstRevisions = Array(repeating: 0, count: keys)
            for pass in 0..<(historic ? 2 : 1) {
                var done = 0
                var next = 0
                func fill(_ c: GRPCClientConnection) {
                    guard next < keys else { return }
                    var r = Etcdserverpb_PutRequest()
                    let k = next
                    r.key = key(k)
                    r.value = value
                    next += 1
                    c.unary(EtcdMethod.put.path, r) { (res: Result<Etcdserverpb_PutResponse, GRPCStatus>) in
                        if pass == 0, let rev = try? res.get().header.revision { firstRevisions[k] = rev }
                        done += 1
                        if done == keys { loop.stop() } else { fill(c) }
                    }
                }
                for i in 0..<clients { fill(connections[i % conns]) }
                loop.run()
            }
        }

        // What the loop below reads on every request, taken out of the command's options once
        // (an option's getter goes through ArgumentParser) and keys made ahead: the load
        // generator shares the machine's cores with the server it measures.
        let workload = self.workload
        let historic = self.historic
        let serializable = consistency == "s"
        let keys = (0..<min(keySpace, total)).map { key($0) }
        var latencies = Latencies()
        var errors = 0
        var firstError: String?
        var sent = 0, finished = 0
        let cpu0 = ownCPUSeconds()
        let start = DispatchTime.now().uptimeNanoseconds
        let deadline = start + UInt64(maxSeconds * 1e9)

        func issue(_ c: GRPCClientConnection) {
            guard sent < total, DispatchTime.now().uptimeNanoseconds < deadline else { return }
            let i = sent
            sent += 1
            let t0 = DispatchTime.now().uptimeNanoseconds
            let complete: (GRPCStatus?) -> Void = { err in
                latencies.record(ms: Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e6)
                if let err {
                    errors += 1
                    if firstError == nil { firstError = err.description }
                }
                finished += 1
                if finished == sent && (sent == total || DispatchTime.now().uptimeNanoseconds >= deadline) {
                    loop.stop()
                } else {
                    issue(c)
                }
            }
            switch workload {
            case "put":
                var r = Etcdserverpb_PutRequest()
                r.key = keys[i % keys.count]
                r.value = value
                c.unary(EtcdMethod.put.path, r) { (res: Result<Etcdserverpb_PutResponse, GRPCStatus>) in
                    if case .failure(let e) = res { complete(e) } else { complete(nil) }
                }
            case "range":
                var r = Etcdserverpb_RangeRequest()
                r.key = keys[i % keys.count]
                r.serializable = serializable
                if historic { r.revision = firstRevisions[i % firstRevisions.count] }
                c.unary(EtcdMethod.range.path, r) { (res: Result<Etcdserverpb_RangeResponse, GRPCStatus>) in
                    if case .failure(let e) = res { complete(e) } else { complete(nil) }
                }
            default:  // txn: compare-and-swap style, one put on success, one get on failure
                var cmp = Etcdserverpb_Compare()
                cmp.key = keys[i % keys.count]
                cmp.target = .version
                cmp.result = .greater
                cmp.version = -1
                var put = Etcdserverpb_RequestOp()
                var p = Etcdserverpb_PutRequest()
                p.key = keys[i % keys.count]
                p.value = value
                put.requestPut = p
                var r = Etcdserverpb_TxnRequest()
                r.compare = [cmp]
                r.success = [put]
                c.unary(EtcdMethod.txn.path, r) { (res: Result<Etcdserverpb_TxnResponse, GRPCStatus>) in
                    if case .failure(let e) = res { complete(e) } else { complete(nil) }
                }
            }
        }
        for i in 0..<clients { issue(connections[i % conns]) }
        loop.run()
        let seconds = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
        let cpu = ownCPUSeconds() - cpu0
        for c in connections { c.close() }
        loop.shutdown()
        loop.drain()

        func pct(_ p: Double) -> Double { latencies.ms(p) }
        let result: [String: Any] = [
            "workload": workload, "endpoint": endpoint, "requests": finished, "errors": errors,
            "seconds": seconds, "throughput": Double(finished) / seconds,
            "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99), "max_ms": latencies.maxMs,
            "conns": conns, "clients": clients, "key_size": keySize, "val_size": valSize,
            "first_error": firstError ?? "", "client_cpu_us_per_op": cpu / Double(max(1, finished)) * 1e6,
        ]
        let data = try JSONSerialization.data(withJSONObject: result, options: [.sortedKeys])
        print(String(decoding: data, as: UTF8.self))
    }
}

Bench.main()
