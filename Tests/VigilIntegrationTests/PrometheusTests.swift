import Foundation
import Testing
import VigilTesting

/// A real Prometheus (Debian's) scrapes Vigil, and the queries of etcd's official dashboard and
/// alert rules (etcd-mixin) return data.
@Suite(.serialized) struct PrometheusTests {
    /// Expressions from etcd-mixin's alerts and dashboard, with its `job=~".*etcd.*"` selector.
    static let queries = [
        #"sum(up{job=~".*etcd.*"} == bool 1) by (job)"#,
        #"etcd_server_has_leader{job=~".*etcd.*"} == 1"#,
        #"increase((max without (instance) (etcd_server_leader_changes_seen_total{job=~".*etcd.*"}) or 0*absent(etcd_server_leader_changes_seen_total{job=~".*etcd.*"}))[15m:1m])"#,
        #"histogram_quantile(0.99, sum(rate(grpc_server_handling_seconds_bucket{job=~".*etcd.*", grpc_method!="Defragment", grpc_type="unary"}[5m])) without(grpc_type))"#,
        #"histogram_quantile(0.99, rate(etcd_disk_wal_fsync_duration_seconds_bucket{job=~".*etcd.*"}[5m]))"#,
        #"histogram_quantile(0.99, rate(etcd_disk_backend_commit_duration_seconds_bucket{job=~".*etcd.*"}[5m]))"#,
        #"(last_over_time(etcd_mvcc_db_total_size_in_bytes{job=~".*etcd.*"}[5m]) / last_over_time(etcd_server_quota_backend_bytes{job=~".*etcd.*"}[5m]))*100"#,
        #"(last_over_time(etcd_mvcc_db_total_size_in_use_in_bytes{job=~".*etcd.*"}[5m]) / last_over_time(etcd_mvcc_db_total_size_in_bytes{job=~".*etcd.*"}[5m]))"#,
        #"rate(etcd_server_proposals_failed_total{job=~".*etcd.*"}[15m])"#,
        #"sum(rate(grpc_server_started_total{job=~".*etcd.*",grpc_type="unary"}[5m]))"#,
        #"sum(rate(grpc_server_handled_total{job=~".*etcd.*",grpc_type="unary",grpc_code=~"Unknown|FailedPrecondition|ResourceExhausted|Internal|Unavailable|DataLoss|DeadlineExceeded|OK"}[5m]))"#,
        #"sum(grpc_server_started_total{job=~".*etcd.*",grpc_service="etcdserverpb.Watch",grpc_type="bidi_stream"}) - sum(grpc_server_handled_total{job=~".*etcd.*",grpc_service="etcdserverpb.Watch",grpc_type="bidi_stream"})"#,
        #"sum(grpc_server_msg_received_total{job=~".*etcd.*"})"#,
        #"sum(grpc_server_msg_sent_total{job=~".*etcd.*"})"#,
        #"rate(etcd_network_client_grpc_received_bytes_total{job=~".*etcd.*"}[5m])"#,
        #"rate(etcd_network_client_grpc_sent_bytes_total{job=~".*etcd.*"}[5m])"#,
        #"sum(etcd_server_proposals_pending{job=~".*etcd.*"})"#,
        #"sum(etcd_server_proposals_committed_total{job=~".*etcd.*"}) - sum(etcd_server_proposals_applied_total{job=~".*etcd.*"})"#,
        #"changes(etcd_server_leader_changes_seen_total{job=~".*etcd.*"}[1d])"#,
        #"rate(etcd_mvcc_put_total{job=~".*etcd.*"}[5m]) + rate(etcd_mvcc_range_total{job=~".*etcd.*"}[5m]) + rate(etcd_mvcc_txn_total{job=~".*etcd.*"}[5m]) + rate(etcd_mvcc_delete_total{job=~".*etcd.*"}[5m])"#,
        #"etcd_debugging_mvcc_keys_total{job=~".*etcd.*"}"#,
        #"process_resident_memory_bytes{job=~".*etcd.*"}"#,
        #"rate(process_cpu_seconds_total{job=~".*etcd.*"}[5m])"#,
        #"process_open_fds{job=~".*etcd.*"} / process_max_fds{job=~".*etcd.*"}"#,
        #"time() - process_start_time_seconds{job=~".*etcd.*"}"#,
        #"etcd_server_version{job=~".*etcd.*"} * on (instance) group_left etcd_cluster_version{job=~".*etcd.*"}"#,
    ]

    @Test func etcdDashboardAndAlertQueriesReturnData() throws {
        let prometheus = try #require(which("prometheus"), "prometheus is installed by scripts/install-deps.sh --test")
        let curl = try #require(which("curl"))
        let server = try LiveServer(args: ["--unsafe-no-fsync"])
        let ctl = try Etcdctl(endpoint: server.endpoint)
        let watch = try ctl.background(["watch", "m/", "--prefix"])
        defer { _ = watch.stop() }
        for i in 0..<20 { _ = try ctl.ok("put", "m/\(i % 5)", "v\(i)") }
        _ = try ctl.ok("get", "m/", "--prefix")
        _ = try ctl.ok("del", "m/0")
        _ = try ctl.run(["txn"], stdin: "\n\nput m/t 1\n\n\n")

        let dir = server.dataDir + "-prometheus"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let config = """
            global:
              scrape_interval: 1s
              evaluation_interval: 1s
            scrape_configs:
              - job_name: etcd
                static_configs:
                  - targets: ['\(server.endpoint)']
            """
        try config.write(toFile: dir + "/prometheus.yml", atomically: true, encoding: .utf8)
        let port = freePort()
        let prom = try BackgroundCommand(
            prometheus,
            [
                "--config.file=\(dir)/prometheus.yml", "--storage.tsdb.path=\(dir)/data",
                "--web.listen-address=127.0.0.1:\(port)", "--log.level=warn",
            ])
        defer { _ = prom.stop() }
        func query(_ q: String) throws -> String {
            try runCommand(
                curl,
                ["-s", "--max-time", "10", "http://127.0.0.1:\(port)/api/v1/query", "--data-urlencode", "query=\(q)"]
            ).stdout
        }
        // Ready, then a few scrapes (rates need two samples).
        var up = ""
        let deadline = Date().addingTimeInterval(30)
        while Date() < deadline {
            up = (try? query(#"up{job="etcd"}"#)) ?? ""
            if up.contains(#""value":["#) && up.contains(#","1"]"#) { break }
            usleep(200_000)
        }
        #expect(up.contains(#","1"]"#), "Prometheus did not scrape Vigil: \(up)\n\(prom.output)")
        // More traffic between scrapes, then let three more scrapes land.
        for i in 0..<10 { _ = try ctl.ok("put", "m/x\(i)", "v") }
        usleep(3_500_000)
        // Each query answers, with at least one number (a quantile over a method with no call in
        // the window is NaN in Prometheus, for etcd too).
        for q in Self.queries {
            let r = try query(q)
            let json = try JSONSerialization.jsonObject(with: Data(r.utf8)) as? [String: Any]
            let result = (json?["data"] as? [String: Any])?["result"] as? [[String: Any]] ?? []
            let values = result.compactMap { ($0["value"] as? [Any])?.last as? String }
            #expect(json?["status"] as? String == "success", "\(q): \(r)")
            #expect(values.contains { Double($0)?.isNaN == false }, "no data for \(q): \(r)")
        }
    }
}
