import EtcdAPI
import GRPC
import VigilCore

#if os(Linux)
import CMalloc
#endif

/// A Prometheus histogram with fixed buckets (seconds).
struct Histogram {
    static let bounds: [Double] = [
        0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
    ]
    /// etcd's disk histograms: 1 ms doubling to 8.192 s.
    static let diskBounds: [Double] = (0..<14).map { 0.001 * Double(1 << $0) }
    let bounds: [Double]
    var counts: [Int]
    var total = 0
    var sum = 0.0

    init(bounds: [Double] = Histogram.bounds) {
        self.bounds = bounds
        counts = [Int](repeating: 0, count: bounds.count)
    }

    mutating func observe(_ seconds: Double) {
        total += 1
        sum += seconds
        if let i = bounds.firstIndex(where: { seconds <= $0 }) { counts[i] += 1 }
    }

    /// Text exposition lines for `name` with `labels` (e.g. `grpc_method="Range"`).
    func lines(_ name: String, labels: String) -> String {
        var out = ""
        var cumulative = 0
        let sep = labels.isEmpty ? "" : ","
        for (b, c) in zip(bounds, counts) {
            cumulative += c
            out += "\(name)_bucket{\(labels)\(sep)le=\"\(b)\"} \(cumulative)\n"
        }
        out += "\(name)_bucket{\(labels)\(sep)le=\"+Inf\"} \(total)\n"
        let braces = labels.isEmpty ? "" : "{\(labels)}"
        out += "\(name)_sum\(braces) \(sum)\n\(name)_count\(braces) \(total)\n"
        return out
    }
}

/// Request counts and latencies by gRPC method (go-grpc-prometheus's names, as etcd exports them),
/// refusals by reason, and the loop's turn times.
struct ServerMetrics {
    /// A method's labels: an etcd method from the table, or an unknown path as it came.
    struct MethodKey: Hashable {
        var service: String
        var method: String
        var type: String

        init(_ path: String) {
            if let m = EtcdMethod.byPath[path] {
                service = m.service
                method = m.name
                type = m.kind.rawValue
            } else {
                let parts = path.split(separator: "/")
                service = parts.first.map(String.init) ?? ""
                method = parts.count > 1 ? String(parts[1]) : ""
                type = EtcdMethod.Kind.unary.rawValue
            }
        }
    }
    /// One method's figures. A call looks its method up once, by path, when it opens.
    final class MethodStats {
        let key: MethodKey
        var started = 0
        var handled: [GRPCCode: Int] = [:]
        var latency = Histogram()
        /// Messages and bytes, counted by the calls as they go.
        let counters = MessageCounters()
        init(_ key: MethodKey) { self.key = key }
    }
    /// Every method a call was made on, by path.
    private var methods: [String: MethodStats] = [:]

    /// The figures of the method at `path` (made on its first call).
    mutating func stats(_ path: String) -> MethodStats {
        if let s = methods[path] { return s }
        let s = MethodStats(MethodKey(path))
        methods[path] = s
        return s
    }
    /// Requests refused for a limit, by reason (`vigil_requests_refused_total`).
    var refused: [EtcdError.Refusal: Int] = Dictionary(uniqueKeysWithValues: EtcdError.Refusal.allCases.map { ($0, 0) })
    var loopTurns = Histogram()
    /// `/health` answers (etcd's `etcd_server_health_success` / `_failures`).
    var healthSuccesses = 0
    var healthFailures = 0
    var longestTurnSeconds = 0.0

    mutating func callStarted(_ s: MethodStats) { s.started += 1 }

    mutating func callEnded(_ s: MethodStats, status: GRPCStatus, seconds: Double) {
        s.handled[status.code, default: 0] += 1
        s.latency.observe(seconds)
        if let reason = Self.refusal(status) { refused[reason, default: 0] += 1 }
    }

    /// The limit a status refused a request for, from its typed cause (never from its text).
    static func refusal(_ status: GRPCStatus) -> EtcdError.Refusal? {
        if let e = status.cause as? EtcdError { return e.code.refusal }
        if case .messageTooLarge? = status.cause as? GRPCCallError { return .requestTooLarge }
        return nil
    }

    mutating func count(_ reason: EtcdError.Refusal) { refused[reason, default: 0] += 1 }

    static let allMethods = EtcdMethod.all.map { MethodKey($0.path) }

    mutating func turn(nanoseconds: UInt64) {
        let s = Double(nanoseconds) / 1e9
        loopTurns.observe(s)
        longestTurnSeconds = max(longestTurnSeconds, s)
    }

    func text() -> String {
        var out = ""
        func labels(_ k: MethodKey) -> String {
            "grpc_method=\"\(k.method)\",grpc_service=\"\(k.service)\",grpc_type=\"\(k.type)\""
        }
        // Every method is there from the start, with every code (as go-grpc-prometheus
        // initializes them for etcd), so that queries subtracting one from another find both.
        var byKey: [MethodKey: MethodStats] = [:]
        for m in methods.values { byKey[m.key] = m }
        let keys = Set(Self.allMethods).union(byKey.keys)
            .sorted { ($0.service, $0.method) < ($1.service, $1.method) }
        out += "# HELP grpc_server_started_total Total number of RPCs started on the server.\n"
        out += "# TYPE grpc_server_started_total counter\n"
        for k in keys { out += "grpc_server_started_total{\(labels(k))} \(byKey[k]?.started ?? 0)\n" }
        out +=
            "# HELP grpc_server_handled_total Total number of RPCs completed on the server, regardless of success or failure.\n"
        out += "# TYPE grpc_server_handled_total counter\n"
        for k in keys {
            let counts = byKey[k]?.handled ?? [:]
            for code in GRPCCode.allCases {
                out += "grpc_server_handled_total{grpc_code=\"\(code.name)\",\(labels(k))} \(counts[code] ?? 0)\n"
            }
        }
        out +=
            "# HELP grpc_server_handling_seconds Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.\n"
        out += "# TYPE grpc_server_handling_seconds histogram\n"
        for k in keys {
            if let h = byKey[k]?.latency, h.total > 0 {
                out += h.lines("grpc_server_handling_seconds", labels: labels(k))
            }
        }
        out +=
            "# HELP vigil_requests_refused_total Requests refused for a limit (size, txn ops, streams, quota, rate, read timeout).\n"
        out += "# TYPE vigil_requests_refused_total counter\n"
        for (reason, n) in refused.sorted(by: { $0.key.rawValue < $1.key.rawValue }) {
            out += "vigil_requests_refused_total{reason=\"\(reason.rawValue)\"} \(n)\n"
        }
        out += "# HELP grpc_server_msg_received_total Total number of RPC stream messages received on the server.\n"
        out += "# TYPE grpc_server_msg_received_total counter\n"
        for k in keys { out += "grpc_server_msg_received_total{\(labels(k))} \(byKey[k]?.counters.received ?? 0)\n" }
        out += "# HELP grpc_server_msg_sent_total Total number of gRPC stream messages sent by the server.\n"
        out += "# TYPE grpc_server_msg_sent_total counter\n"
        for k in keys { out += "grpc_server_msg_sent_total{\(labels(k))} \(byKey[k]?.counters.sent ?? 0)\n" }
        out +=
            "# HELP etcd_network_client_grpc_received_bytes_total The total number of bytes received from grpc clients.\n"
        out += "# TYPE etcd_network_client_grpc_received_bytes_total counter\n"
        out +=
            "etcd_network_client_grpc_received_bytes_total \(methods.values.reduce(0) { $0 + $1.counters.receivedBytes })\n"
        out += "# HELP etcd_network_client_grpc_sent_bytes_total The total number of bytes sent to grpc clients.\n"
        out += "# TYPE etcd_network_client_grpc_sent_bytes_total counter\n"
        out += "etcd_network_client_grpc_sent_bytes_total \(methods.values.reduce(0) { $0 + $1.counters.sentBytes })\n"
        func total(_ method: EtcdMethod) -> Int {
            byKey[MethodKey(method.path)]?.handled[.ok] ?? 0
        }
        for (name, method, help) in [
            ("etcd_mvcc_range_total", EtcdMethod.range, "Total number of ranges seen by this member."),
            ("etcd_mvcc_put_total", .put, "Total number of puts seen by this member."),
            ("etcd_mvcc_delete_total", .deleteRange, "Total number of deletes seen by this member."),
            ("etcd_mvcc_txn_total", .txn, "Total number of txns seen by this member."),
        ] {
            out += "# HELP \(name) \(help)\n# TYPE \(name) counter\n\(name) \(total(method))\n"
        }
        out += "# HELP vigil_loop_turn_seconds Time the event loop spent busy per turn (waiting for I/O excluded).\n"
        out += "# TYPE vigil_loop_turn_seconds histogram\n"
        out += loopTurns.lines("vigil_loop_turn_seconds", labels: "")
        out +=
            "# HELP vigil_loop_turn_seconds_max Longest loop turn since start.\n# TYPE vigil_loop_turn_seconds_max gauge\n"
        out += "vigil_loop_turn_seconds_max \(longestTurnSeconds)\n"
        out += "# HELP etcd_server_health_success The total number of successful health checks\n"
        out += "# TYPE etcd_server_health_success counter\netcd_server_health_success \(healthSuccesses)\n"
        out += "# HELP etcd_server_health_failures The total number of failed health checks\n"
        out += "# TYPE etcd_server_health_failures counter\netcd_server_health_failures \(healthFailures)\n"
        return out
    }
}

extension VigilServerCore {
    /// Prometheus text exposition of the server's gauges and counters (etcd's names where one exists).
    func metricsText() -> String {
        let hub = services.watch.hub
        var out = ""
        func metric(_ name: String, _ type: String, _ help: String, _ value: some Numeric) {
            out += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n\(name) \(value)\n"
        }
        metric(
            "etcd_debugging_mvcc_current_revision", "gauge", "The current revision of the store.", store.currentRevision
        )
        metric(
            "etcd_debugging_mvcc_compact_revision", "gauge", "The last compaction revision of the store.",
            store.compactRevision)
        metric("etcd_debugging_mvcc_keys_total", "gauge", "Total number of keys.", store.liveKeyCount)
        metric(
            "etcd_mvcc_db_total_size_in_bytes", "gauge",
            "Total size of the underlying database physically allocated in bytes.",
            maintenance.dbSize)
        metric(
            "etcd_mvcc_db_total_size_in_use_in_bytes", "gauge",
            "Total size of the underlying database logically in use in bytes.", maintenance.dbSizeInUse)
        // A single member: always the leader, one leader change (its own election), no failed
        // proposals; every committed write is a committed and applied proposal.
        metric("etcd_server_has_leader", "gauge", "Whether or not a leader exists. 1 is existence, 0 is not.", 1)
        metric("etcd_server_is_leader", "gauge", "Whether or not this member is a leader. 1 if is, 0 otherwise.", 1)
        metric("etcd_server_leader_changes_seen_total", "counter", "The number of leader changes seen.", 1)
        metric(
            "etcd_server_proposals_committed_total", "gauge", "The total number of consensus proposals committed.",
            store.committedRevision)
        metric(
            "etcd_server_proposals_applied_total", "gauge", "The total number of consensus proposals applied.",
            store.committedRevision)
        metric(
            "etcd_server_proposals_pending", "gauge", "The current number of pending proposals to commit.",
            store.currentRevision - store.committedRevision)
        metric("etcd_server_proposals_failed_total", "counter", "The total number of failed proposals seen.", 0)
        out +=
            "# HELP etcd_server_version Which version is running. 1 for 'server_version' label with current version.\n"
        out +=
            "# TYPE etcd_server_version gauge\netcd_server_version{server_version=\"\(EtcdServices.serverVersion)\"} 1\n"
        out +=
            "# HELP etcd_cluster_version Which version is running. 1 for 'cluster_version' label with current cluster version\n"
        let cluster = EtcdServices.clusterVersion.split(separator: ".").prefix(2).joined(separator: ".")
        out += "# TYPE etcd_cluster_version gauge\netcd_cluster_version{cluster_version=\"\(cluster)\"} 1\n"
        for name in ["etcd_disk_backend_commit_duration_seconds", "etcd_disk_wal_fsync_duration_seconds"] {
            let wal = name.contains("wal")
            let help =
                wal
                ? "The latency distributions of fsync called by WAL."
                : "The latency distributions of commit called by backend."
            out += "# HELP \(name) \(help)\n# TYPE \(name) histogram\n"
            out += (wal ? commits.commitSeconds : commits.checkpointSeconds).lines(name, labels: "")
        }
        out += ProcessMetrics.text()
        metric(
            "etcd_server_quota_backend_bytes", "gauge", "Current backend storage quota size in bytes.",
            config.effectiveQuota)
        metric("etcd_debugging_mvcc_watch_stream_total", "gauge", "Total number of watch streams.", hub.streamCount)
        metric("etcd_debugging_mvcc_watcher_total", "gauge", "Total number of watchers.", hub.watcherCount)
        metric("etcd_debugging_mvcc_slow_watcher_total", "gauge", "Watchers catching up or parked.", hub.unsyncedCount)
        metric("etcd_debugging_mvcc_events_total", "counter", "Events sent to watchers.", hub.stats.eventsSent)
        metric("vigil_watch_responses_total", "counter", "Watch responses sent.", hub.stats.responsesSent)
        metric(
            "vigil_watch_parked_total", "counter", "Times a watcher was parked because its stream was slow.",
            hub.stats.parked)
        metric("vigil_watch_ring_events", "gauge", "Events held by the watch event ring.", hub.ringEvents)
        metric("vigil_watch_ring_bytes", "gauge", "Approximate bytes held by the watch event ring.", hub.ringBytes)
        metric(
            "vigil_watch_stream_queued_bytes_max", "gauge",
            "Largest number of unsent bytes queued on one watch stream.",
            hub.maxQueuedBytes)
        metric("vigil_backend_commits_total", "counter", "Group commits made durable.", commits.commits)
        metric(
            "vigil_backend_checkpoints_total", "counter", "Checkpoints of the write-ahead log into LMDB.",
            commits.checkpoints)
        metric(
            "vigil_backend_log_unapplied_bytes", "gauge", "Bytes of logged batches not yet checkpointed into LMDB.",
            backend.unflushedBytes)
        metric(
            "vigil_mvcc_index_revisions", "gauge", "Revisions (key versions) held by the in-memory key index.",
            store.indexedRevisionCount)
        metric("vigil_mvcc_index_keys", "gauge", "Keys held by the in-memory key index.", store.indexedKeyCount)
        metric(
            "vigil_mvcc_recent_value_bytes", "gauge",
            "Bytes of values held in memory until the next checkpoint moves them into LMDB.", store.recentBytes)
        let lessor = services.lessor
        metric("vigil_lease_total", "gauge", "Leases alive.", lessor.count)
        metric(
            "etcd_debugging_lease_granted_total", "counter", "The total number of granted leases.", lessor.stats.granted
        )
        metric(
            "etcd_debugging_lease_revoked_total", "counter", "The total number of revoked leases.", lessor.stats.revoked
        )
        metric(
            "etcd_debugging_lease_renewed_total", "counter", "The number of renewed leases seen by the leader.",
            lessor.stats.renewed)
        metric("vigil_client_connections", "gauge", "Client connections open.", connectionCount)
        if let mirror {
            metric(
                "vigil_mirror_upstream_up", "gauge", "1 while the mirror follows upstream.", mirror.isFollowing ? 1 : 0)
            metric(
                "vigil_mirror_lag_revisions", "gauge",
                "Revisions upstream has reported that the mirror has not applied.",
                mirror.lagRevisions)
            metric(
                "vigil_mirror_lag_seconds", "gauge",
                "Seconds since the mirror last had every revision upstream reported.",
                mirror.lagSeconds)
            metric(
                "vigil_mirror_reconnects_total", "counter", "Connections to an upstream member after the first.",
                mirror.upstream.reconnects)
            metric(
                "vigil_mirror_reloads_total", "counter", "Reloads after upstream compacted past the mirror.",
                mirror.reloads)
        }
        if let metricsExport {
            metric(
                "vigil_metrics_export_seconds_max", "gauge",
                "Longest hand-over of the metrics to the swift-metrics facade (CPU time of the loop thread).",
                Double(metricsExport.longestExportNs) / 1e9)
        }
        #if os(Linux)
        let heap = mallinfo2()
        metric(
            "vigil_heap_in_use_bytes", "gauge", "Bytes allocated from the C heap and in use (glibc's mallinfo2).",
            heap.uordblks + heap.hblkhd)
        #endif
        out += metrics.text()
        return out
    }
}
