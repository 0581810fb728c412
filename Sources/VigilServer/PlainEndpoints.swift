import EtcdAPI
import Foundation
import Gateway
import HTTPCore
import VigilCore

/// Plain HTTP on the client port, the same over HTTP/1.1 and h2c: the JSON gateway under `/v3/`
/// (and `/v3beta/`), `/health`, `/version` and `/metrics`.
final class PlainEndpoints: HTTPHandler {
    private unowned let core: VigilServerCore
    private let gateway: Gateway

    init(core: VigilServerCore) {
        self.core = core
        gateway = Gateway(services: core.services, refused: { [unowned core] in core.metrics.count($0) })
        if core.config.maxConcurrentStreams != .max {
            gateway.maxConcurrentCalls = Int(core.config.maxConcurrentStreams)
        }
    }

    func streamsBody(method: String, path: String) -> Bool { Gateway.streamsBody(method: method, path: path) }

    /// Keep-alive comments on idle SSE watch streams (see `Gateway.keepAliveTick`).
    func sseKeepAliveTick() { gateway.keepAliveTick() }

    func handle(_ request: HTTPRequest, _ out: any HTTPResponder) {
        // etcd's access controller: CORS headers for an allowed origin, and OPTIONS answered 200.
        let cors = corsHeaders(request)
        if request.method == "OPTIONS" {
            var r = HTTPResponse(status: 200, contentType: "text/plain; charset=utf-8", body: [])
            r.headers += cors
            return out.respond(r)
        }
        let responder = cors.isEmpty ? out : CORSResponder(out, headers: cors)
        if Gateway.handles(request.path) { return gateway.handle(request, responder) }
        responder.respond(plain(request))
    }

    /// The CORS headers etcd adds for `--cors` (every origin when it allows `*`).
    private func corsHeaders(_ request: HTTPRequest) -> [(name: String, value: String)] {
        let allowed = core.config.corsOrigins
        let origin: String
        if allowed.contains("*") {
            origin = "*"
        } else if let o = request.header("origin"), allowed.contains(o) {
            origin = o
        } else {
            return []
        }
        return [
            ("Access-Control-Allow-Methods", "POST, GET, OPTIONS, PUT, DELETE"),
            ("Access-Control-Allow-Origin", origin),
            ("Access-Control-Allow-Headers", "accept, content-type, authorization"),
        ]
    }

    func response(for refusal: HTTPRefusal) -> HTTPResponse {
        let e: EtcdError
        switch refusal {
        case .bodyTooLarge: e = .bodyTooLarge
        case .readTimeout: e = .readTimeout
        case .malformed: e = .malformedHTTP
        }
        if let reason = e.code.refusal { core.metrics.count(reason) }
        return Gateway.errorResponse(e)
    }

    /// Go's `http.Error`: plain text with a newline.
    static func textError(_ status: Int, _ text: String) -> HTTPResponse {
        HTTPResponse(status: status, contentType: "text/plain; charset=utf-8", body: Array((text + "\n").utf8))
    }

    private static let methodNotAllowed: HTTPResponse = {
        var r = textError(405, "Method Not Allowed")
        r.headers.append(("Allow", "GET"))
        return r
    }()

    func plain(_ request: HTTPRequest) -> HTTPResponse {
        let get = request.method == "GET" || request.method == "HEAD"
        let path = request.path
        if path == "/livez" || path == "/readyz" || path.hasPrefix("/livez/") || path.hasPrefix("/readyz/") {
            guard get else { return Self.methodNotAllowed }
            return probe(path: path, query: HTTPQuery(request.query))
        }
        switch path {
        case "/health":
            guard get else { return Self.methodNotAllowed }
            return health(query: HTTPQuery(request.query))
        case "/metrics":
            guard get else { return Self.methodNotAllowed }
            return HTTPResponse(
                status: 200, contentType: "text/plain; version=0.0.4", body: Array(core.metricsText().utf8))
        case "/version":
            guard get else { return Self.methodNotAllowed }
            let v = #"{"etcdserver":"\#(EtcdServices.serverVersion)","etcdcluster":"\#(EtcdServices.clusterVersion)"}"#
            return HTTPResponse(status: 200, body: Array(v.utf8))
        default:
            return HTTPResponse(status: 404, body: Gateway.errorBody(code: .notFound, message: "Not Found"))
        }
    }

    /// The alarms raised, by etcd's names (`NOSPACE`, `CORRUPT`).
    private var activeAlarms: [String] {
        core.services.context.alarms.active.map { $0.alarm == .nospace ? "NOSPACE" : "CORRUPT" }
    }

    /// etcd 3.4's `/health`: unhealthy (503, `{"health":"false"}`, as `http.Error` writes it)
    /// while an alarm is active, unless the query excludes it (`?exclude=NOSPACE`, 3.5). A
    /// single member always has a leader, and its reads are local, so `?serializable=true`
    /// changes nothing here. Counted in `etcd_server_health_success` / `_failures`.
    private func health(query: HTTPQuery) -> HTTPResponse {
        let excluded = Set(query.all("exclude"))
        // A mirror is healthy while it follows upstream (connected, watching) and is not far behind.
        let mirrorDown = core.mirror.map { !$0.isFollowing || $0.lagSeconds > 10 } ?? false
        if mirrorDown || activeAlarms.contains(where: { !excluded.contains($0) }) {
            core.metrics.healthFailures += 1
            return Self.textError(503, #"{"health":"false"}"#)
        }
        core.metrics.healthSuccesses += 1
        return HTTPResponse(status: 200, body: Array(#"{"health":"true"}"#.utf8))
    }

    /// etcd's `/livez` and `/readyz` (3.4.29, 3.5.11): named checks, `?exclude=` or
    /// `?allowlist=` to choose them, `?verbose` to list them, and one sub-path per check.
    private func probe(path: String, query: HTTPQuery) -> HTTPResponse {
        let parts = path.split(separator: "/").map(String.init)
        let kind = parts[0]
        let checks: [(name: String, failure: String?)] =
            kind == "livez"
            ? [("serializable_read", nil)]
            : [
                ("data_corruption", activeAlarms.contains("CORRUPT") ? "Alarm active: CORRUPT" : nil),
                ("serializable_read", nil), ("linearizable_read", nil),
            ]
        var names = checks.map(\.name)
        if parts.count > 1 {
            guard parts.count == 2, names.contains(parts[1]) else { return Self.textError(404, "404 page not found") }
            names = [parts[1]]
        }
        let excluded = Set(query.all("exclude").filter { !$0.isEmpty })
        let allowed = Set(query.all("allowlist").filter { !$0.isEmpty })
        if !excluded.isEmpty && !allowed.isEmpty {
            return Self.textError(400, "both an allowlist and an exclude list are specified in the query")
        }
        for (set, verb) in [(excluded, "excluded"), (allowed, "included")] {
            let unknown = set.subtracting(names).sorted()
            if !unknown.isEmpty {
                let quoted = unknown.map { "\"\($0)\"" }.joined(separator: ",")
                return Self.textError(400, "some health checks cannot be \(verb): no matches for \(quoted)")
            }
        }
        names = names.filter { !excluded.contains($0) && (allowed.isEmpty || allowed.contains($0)) }
        var lines = ""
        var failed = false
        for name in names {
            if let failure = checks.first(where: { $0.name == name })?.failure {
                lines += "[-]\(name) failed: \(failure)\n"
                failed = true
            } else {
                lines += "[+]\(name) ok\n"
            }
        }
        if failed { return Self.textError(503, lines + "\(kind) check failed") }
        let text = query.has("verbose") ? lines + "\(kind) check passed\n" : "ok\n"
        return HTTPResponse(status: 200, contentType: "text/plain; charset=utf-8", body: Array(text.utf8))
    }
}

/// A responder that adds headers (CORS) to the answer, whole or streamed.
final class CORSResponder: HTTPResponder {
    private let inner: any HTTPResponder
    private let headers: [(name: String, value: String)]

    init(_ inner: any HTTPResponder, headers: [(name: String, value: String)]) {
        self.inner = inner
        self.headers = headers
    }

    func respond(_ response: HTTPResponse) {
        var r = response
        r.headers += headers
        inner.respond(r)
    }

    func startStream(
        status: Int, contentType: String, headers more: [(name: String, value: String)],
        observer: (any HTTPStreamObserver)?
    ) -> Bool {
        inner.startStream(status: status, contentType: contentType, headers: headers + more, observer: observer)
    }

    func send(_ chunk: [UInt8]) { inner.send(chunk) }
    func finish() { inner.finish() }
    var queuedBytes: Int { inner.queuedBytes }
    func notifyWhenDrained() { inner.notifyWhenDrained() }
    func whenDone(_ body: @escaping (Bool) -> Void) { inner.whenDone(body) }
}

/// The `--listen-metrics-urls` listeners' endpoints: metrics and health only, as etcd serves there.
final class MetricsEndpoints: HTTPHandler {
    private unowned let core: VigilServerCore

    init(core: VigilServerCore) { self.core = core }

    func handle(_ request: HTTPRequest, _ out: any HTTPResponder) {
        let p = request.path
        guard p == "/metrics" || p == "/health" || p.hasPrefix("/livez") || p.hasPrefix("/readyz") else {
            return out.respond(PlainEndpoints.textError(404, "404 page not found"))
        }
        out.respond(core.plain.plain(request))
    }

    func response(for refusal: HTTPRefusal) -> HTTPResponse { core.plain.response(for: refusal) }
}
