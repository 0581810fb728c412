import GRPC

/// A Prometheus histogram with fixed buckets (seconds).
struct Histogram {
    static let bounds: [Double] = [0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]
    var counts = [Int](repeating: 0, count: Histogram.bounds.count)
    var total = 0
    var sum = 0.0

    mutating func observe(_ seconds: Double) {
        total += 1
        sum += seconds
        if let i = Histogram.bounds.firstIndex(where: { seconds <= $0 }) { counts[i] += 1 }
    }

    /// Text exposition lines for `name` with `labels` (e.g. `grpc_method="Range"`).
    func lines(_ name: String, labels: String) -> String {
        var out = ""
        var cumulative = 0
        let sep = labels.isEmpty ? "" : ","
        for (b, c) in zip(Histogram.bounds, counts) {
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
/// and the loop's turn times.
struct ServerMetrics {
    struct MethodKey: Hashable {
        var service: String
        var method: String
        var type: String
    }
    var started: [MethodKey: Int] = [:]
    var handled: [MethodKey: [GRPCCode: Int]] = [:]
    var latency: [MethodKey: Histogram] = [:]
    /// Requests refused for a limit, by reason (`vigil_requests_refused_total`).
    var refused: [String: Int] = Dictionary(uniqueKeysWithValues: refusalReasons.map { ($0, 0) })
    static let refusalReasons = ["request_too_large", "too_many_txn_ops", "too_many_streams", "no_space",
                                 "too_many_requests", "http_read_timeout"]
    var loopTurns = Histogram()
    var longestTurnSeconds = 0.0

    static let streaming: Set<String> = ["/etcdserverpb.Watch/Watch", "/etcdserverpb.Lease/LeaseKeepAlive",
                                         "/etcdserverpb.Maintenance/Snapshot"]

    static func key(_ path: String) -> MethodKey {
        let parts = path.split(separator: "/")
        let service = parts.first.map(String.init) ?? ""
        let method = parts.count > 1 ? String(parts[1]) : ""
        let type = path == "/etcdserverpb.Maintenance/Snapshot" ? "server_stream"
            : streaming.contains(path) ? "bidi_stream" : "unary"
        return MethodKey(service: service, method: method, type: type)
    }

    mutating func callStarted(_ path: String) { started[Self.key(path), default: 0] += 1 }

    mutating func callEnded(_ path: String, code: GRPCCode, seconds: Double) {
        let k = Self.key(path)
        handled[k, default: [:]][code, default: 0] += 1
        latency[k, default: Histogram()].observe(seconds)
    }

    /// Counts `status` if it refuses a request for a limit.
    mutating func observe(_ status: GRPCStatus?) {
        guard let s = status, s.code != .ok else { return }
        let reason: String
        switch s.message {
        case "etcdserver: request is too large": reason = "request_too_large"
        case "etcdserver: too many operations in txn request": reason = "too_many_txn_ops"
        case "etcdserver: mvcc: database space exceeded": reason = "no_space"
        case "etcdserver: too many requests": reason = "too_many_requests"
        case let m where m.hasPrefix("grpc: received message larger than max"): reason = "request_too_large"
        default: return
        }
        refused[reason, default: 0] += 1
    }

    mutating func turn(nanoseconds: UInt64) {
        let s = Double(nanoseconds) / 1e9
        loopTurns.observe(s)
        longestTurnSeconds = max(longestTurnSeconds, s)
    }

    static let codeNames: [GRPCCode: String] = [
        .ok: "OK", .cancelled: "Canceled", .unknown: "Unknown", .invalidArgument: "InvalidArgument",
        .deadlineExceeded: "DeadlineExceeded", .notFound: "NotFound", .alreadyExists: "AlreadyExists",
        .permissionDenied: "PermissionDenied", .resourceExhausted: "ResourceExhausted",
        .failedPrecondition: "FailedPrecondition", .aborted: "Aborted", .outOfRange: "OutOfRange",
        .unimplemented: "Unimplemented", .internal: "Internal", .unavailable: "Unavailable",
        .dataLoss: "DataLoss", .unauthenticated: "Unauthenticated",
    ]

    func text() -> String {
        var out = ""
        func labels(_ k: MethodKey) -> String {
            "grpc_method=\"\(k.method)\",grpc_service=\"\(k.service)\",grpc_type=\"\(k.type)\""
        }
        let keys = Set(started.keys).union(handled.keys).sorted { ($0.service, $0.method) < ($1.service, $1.method) }
        out += "# HELP grpc_server_started_total Total number of RPCs started on the server.\n"
        out += "# TYPE grpc_server_started_total counter\n"
        for k in keys { out += "grpc_server_started_total{\(labels(k))} \(started[k] ?? 0)\n" }
        out += "# HELP grpc_server_handled_total Total number of RPCs completed on the server, regardless of success or failure.\n"
        out += "# TYPE grpc_server_handled_total counter\n"
        for k in keys {
            for (code, n) in (handled[k] ?? [:]).sorted(by: { $0.key.rawValue < $1.key.rawValue }) {
                out += "grpc_server_handled_total{grpc_code=\"\(Self.codeNames[code] ?? "Unknown")\",\(labels(k))} \(n)\n"
            }
        }
        out += "# HELP grpc_server_handling_seconds Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.\n"
        out += "# TYPE grpc_server_handling_seconds histogram\n"
        for k in keys { if let h = latency[k] { out += h.lines("grpc_server_handling_seconds", labels: labels(k)) } }
        out += "# HELP vigil_requests_refused_total Requests refused for a limit (size, txn ops, streams, quota, rate, read timeout).\n"
        out += "# TYPE vigil_requests_refused_total counter\n"
        for (reason, n) in refused.sorted(by: { $0.key < $1.key }) { out += "vigil_requests_refused_total{reason=\"\(reason)\"} \(n)\n" }
        out += "# HELP vigil_loop_turn_seconds Time the event loop spent busy per turn (waiting for I/O excluded).\n"
        out += "# TYPE vigil_loop_turn_seconds histogram\n"
        out += loopTurns.lines("vigil_loop_turn_seconds", labels: "")
        out += "# HELP vigil_loop_turn_seconds_max Longest loop turn since start.\n# TYPE vigil_loop_turn_seconds_max gauge\n"
        out += "vigil_loop_turn_seconds_max \(longestTurnSeconds)\n"
        return out
    }
}
