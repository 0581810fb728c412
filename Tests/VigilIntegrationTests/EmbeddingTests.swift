import Foundation
import Logging
import Metrics
import MetricsTestKit
import ServiceLifecycle
import Testing
import VigilCore
import VigilServer
import VigilTesting

/// The server as a library: a start that fails leaves nothing half-running, and calls made when
/// the server does not serve fail at once instead of waiting for a loop that will never turn.
@Suite struct EmbeddingTests {
    private func configuration(port: Int) -> Configuration {
        var c = Configuration()
        c.dataDir = NSTemporaryDirectory() + "vigil-embed-\(UUID().uuidString)"
        c.listenClientURLs = ["http://127.0.0.1:\(port)"]
        c.unsafeNoFsync = true
        return c
    }

    private var quiet: Logger {
        var l = Logger(label: "test")
        l.logLevel = .critical
        return l
    }

    @Test func aFailedStartLeavesNothingRunningAndCallsFailAtOnce() async throws {
        let first = VigilServer(configuration: configuration(port: 0), logger: quiet)
        let port = try #require(try first.start().first)
        defer {
            first.stop()
            try? FileManager.default.removeItem(atPath: first.configuration.dataDir)
        }
        #expect(try await first.put("k", "v").header.revision == 2)

        let second = VigilServer(configuration: configuration(port: port), logger: quiet)
        defer { try? FileManager.default.removeItem(atPath: second.configuration.dataDir) }
        #expect(throws: (any Error).self) { try second.start() }  // the port is taken
        let started = Date()
        await #expect(throws: EtcdClientError.closed) { try await second.put("k", "v") }
        await #expect(throws: EtcdClientError.closed) { try await second.get("k") }
        await #expect(throws: EtcdClientError.closed) { try await second.watch(.prefix("k")) }
        second.stop()
        #expect(Date().timeIntervalSince(started) < 5, "nothing waited for a loop that does not run")
        #expect(try await first.get("k")?.valueString == "v", "the first server is unaffected")
    }

    @Test func aBadAutoCompactionSettingFailsTheStart() async {
        var c = configuration(port: 0)
        c.autoCompactionMode = "sometimes"
        c.autoCompactionRetention = "1h"
        let s = VigilServer(configuration: c, logger: quiet)
        defer { try? FileManager.default.removeItem(atPath: c.dataDir) }
        #expect(throws: ConfigurationError.self) { try s.start() }
        await #expect(throws: EtcdClientError.closed) { try await s.put("k", "v") }
    }

    /// The value of a Prometheus counter on the server's `/metrics`.
    private func metric(_ port: Int, _ name: String) throws -> Double {
        let text = try rawExchange(port: port, Array("GET /metrics HTTP/1.0\r\n\r\n".utf8))
        let line = text.split(separator: "\n").first { $0.hasPrefix(name + " ") }
        return Double(line?.split(separator: " ").last ?? "") ?? -1
    }

    @Test func theInProcessAPIServesWithoutASocket() async throws {
        let server = VigilServer(configuration: configuration(port: 0), logger: quiet)
        let port = try #require(try server.start().first)
        defer {
            server.stop()
            try? FileManager.default.removeItem(atPath: server.configuration.dataDir)
        }
        let watch = try await server.watch(.prefix("app/"), WatchOptions(prevKV: true))
        try await server.put("app/a", "1")
        try await server.put("app/b", "2")
        let swap = try await server.txn(
            Txn().when(.value("app/a", .equal, "1")).then(.put("app/a", "10"), .delete("app/b")))
        #expect(swap.succeeded && swap.header.revision == 4)
        var opts = RangeOptions()
        opts.revision = 3
        #expect(try await server.get(.prefix("app/"), opts).kvs.map(\.valueString) == ["1", "2"])
        #expect(try await server.get("app/a")?.version == 2)

        // One revision per transaction: two events at revision 4, in one batch.
        var it = watch.makeAsyncIterator()
        var events: [WatchEvent] = []
        while events.count < 4, let batch = try await it.next() { events += batch.events }
        #expect(events.map(\.revision) == [2, 3, 4, 4])
        #expect(events[2].prevKV?.valueString == "1" && events[3].kind == .delete)

        // Leases: kept alive by a task until it is cancelled.
        let lease = try await server.grantLease(ttl: 600)
        try await server.put("app/held", "x", PutOptions(lease: lease.id))
        let renewed = try metric(port, "etcd_debugging_lease_renewed_total")
        let keeper = Task { try await server.keepAlive(lease.id) }
        #expect(try await eventually { try metric(port, "etcd_debugging_lease_renewed_total") > renewed })
        #expect(try await server.timeToLive(lease.id, keys: true).keys == [Array("app/held".utf8)])
        keeper.cancel()
        await #expect(throws: CancellationError.self) { try await keeper.value }
        let before = try await server.timeToLive(lease.id).ttl
        try await Task.sleep(for: .seconds(2.2))
        #expect(try await server.timeToLive(lease.id).ttl < before, "no renewals after the cancel")
        try await server.revokeLease(lease.id)
        #expect(try await server.get("app/held") == nil)
        await #expect(throws: EtcdClientError.leaseExpired(lease.id)) { try await server.keepAlive(lease.id) }
        // etcd's errors, typed.
        await #expect(throws: EtcdClientError.rpc(code: 5, message: "etcdserver: requested lease not found")) {
            try await server.revokeLease(lease.id)
        }
        // The consumer that goes away cancels its watcher on the hub.
        #expect(try metric(port, "etcd_debugging_mvcc_watcher_total") == 1)
        watch.cancel()
        try await Task.sleep(for: .milliseconds(200))
        #expect(try metric(port, "etcd_debugging_mvcc_watcher_total") == 0)
    }

    @Test func aWatchConsumerThatStopsReadingIsParkedAndCatchesUp() async throws {
        let server = VigilServer(configuration: configuration(port: 0), logger: quiet)
        let port = try #require(try server.start().first)
        defer {
            server.stop()
            try? FileManager.default.removeItem(atPath: server.configuration.dataDir)
        }
        let idle = try await server.watch(.prefix("big/"))
        let value = String(repeating: "v", count: 4096)
        // 8 MiB of events while nobody reads: the hub parks the watcher past 1 MiB unread.
        for i in 0..<2048 { try await server.put("big/\(i % 64)", value) }
        #expect(try metric(port, "vigil_watch_parked_total") >= 1)
        // Reading again, it gets every event, in order, once each.
        var revisions: [Int64] = []
        for try await batch in idle {
            revisions += batch.events.map(\.revision)
            if revisions.count >= 2048 { break }
        }
        #expect(revisions == Array(2...2049))
    }

    @Test func runsInAServiceGroupAndStopsGracefully() async throws {
        let server = VigilServer(configuration: configuration(port: 0), logger: quiet)
        defer { try? FileManager.default.removeItem(atPath: server.configuration.dataDir) }
        let group = ServiceGroup(services: [server], logger: quiet)
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await group.run() }
            var revision: Int64 = 0
            for _ in 0..<200 where revision == 0 {
                revision = (try? await server.put("k", "v").header.revision) ?? 0
                if revision == 0 { try await Task.sleep(for: .milliseconds(25)) }
            }
            #expect(revision == 2, "served once the group ran it")
            await group.triggerGracefulShutdown()
            try await tasks.next()  // the service returned: the server has stopped
            await #expect(throws: EtcdClientError.closed) { try await server.get("k") }
        }
        // What was acknowledged is there after the graceful stop.
        let again = VigilServer(configuration: server.configuration, logger: quiet)
        try again.start(handleSignals: false)
        #expect(try await again.get("k")?.valueString == "v")
        again.stop()
    }

    @Test func metricsReachTheSwiftMetricsFacade() async throws {
        let metrics = TestMetrics()
        MetricsSystem.bootstrap(metrics)
        var c = configuration(port: 0)
        c.metricsExportInterval = 0.1
        let server = VigilServer(configuration: c, logger: quiet)
        let port = try #require(try server.start(handleSignals: false).first)
        defer {
            server.stop()
            try? FileManager.default.removeItem(atPath: c.dataDir)
        }
        // Puts over gRPC (the request metrics count gRPC calls).
        let client = try EtcdClient(endpoints: ["127.0.0.1:\(port)"])
        for i in 0..<5 { try await client.put("m\(i)", "v") }
        var puts: Int64 = 0
        var keys: Double?
        _ = try await eventually {
            puts = metrics.counterTotal(label: "etcd_mvcc_put_total")
            keys = try? metrics.expectGauge("etcd_debugging_mvcc_keys_total").lastValue
            return puts >= 5 && keys == 5
        }
        #expect(puts == 5, "counters arrive as their increase")
        #expect(keys == 5, "gauges as their value")
        let handled = metrics.counterTotal(
            label: "grpc_server_handled_total",
            dimensions: [
                ("grpc_code", "OK"), ("grpc_method", "Put"), ("grpc_service", "etcdserverpb.KV"),
                ("grpc_type", "unary"),
            ])
        #expect(handled == 5, "with /metrics's labels as dimensions")
    }

    @Test func stoppingEndsInProcessKeepAlivesAndWatches() async throws {
        let server = VigilServer(configuration: configuration(port: 0), logger: quiet)
        try server.start(handleSignals: false)
        defer { try? FileManager.default.removeItem(atPath: server.configuration.dataDir) }
        // A long TTL: on a busy machine the keeper's task may start late, but not after expiry.
        let lease = try await server.grantLease(ttl: 600)
        let keeper = Task { try await server.keepAlive(lease.id) }
        let watch = try await server.watch(.prefix("x/"))
        let reader = Task { for try await _ in watch {} }
        try await Task.sleep(for: .milliseconds(300))
        let started = Date()
        server.stop()
        #expect(Date().timeIntervalSince(started) < 5, "stop() does not wait for the keep-alive")
        await #expect(throws: EtcdClientError.closed) { try await keeper.value }
        await #expect(throws: EtcdClientError.closed) { try await reader.value }
        await #expect(throws: EtcdClientError.leaseExpired(424242)) { try await Self.gone(lease: 424242) }
    }

    /// What keepAliveOnce says of a lease that does not exist (a running server of its own).
    private static func gone(lease: Int64) async throws {
        var c = Configuration()
        c.dataDir = NSTemporaryDirectory() + "vigil-embed-\(UUID().uuidString)"
        c.listenClientURLs = ["http://127.0.0.1:0"]
        c.unsafeNoFsync = true
        let s = VigilServer(
            configuration: c, logger: Logger(label: "quiet", factory: { _ in SwiftLogNoOpLogHandler() }))
        try s.start(handleSignals: false)
        defer {
            s.stop()
            try? FileManager.default.removeItem(atPath: c.dataDir)
        }
        _ = try await s.keepAliveOnce(lease)
    }
}
