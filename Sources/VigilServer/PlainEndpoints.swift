import EtcdAPI
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
    }

    func handle(_ request: HTTPRequest, _ out: any HTTPResponder) {
        if Gateway.handles(request.path) { return gateway.handle(request, out) }
        out.respond(plain(request))
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

    private static let methodNotAllowed = HTTPResponse(
        status: 405, body: Gateway.errorBody(code: .unimplemented, message: "Method Not Allowed"))

    func plain(_ request: HTTPRequest) -> HTTPResponse {
        let get = request.method == "GET" || request.method == "HEAD"
        switch request.path {
        case "/health":
            guard get else { return Self.methodNotAllowed }
            return health(query: request.query)
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

    /// Unhealthy while an alarm is active, unless the query excludes it (`?exclude=NOSPACE`).
    private func health(query: String) -> HTTPResponse {
        let excluded = Set(
            query.split(separator: "&").compactMap { p -> String? in
                let kv = p.split(separator: "=", maxSplits: 1)
                return kv.count == 2 && kv[0] == "exclude" ? String(kv[1]) : nil
            })
        let alarms = core.services.context.alarms.active
            .map { $0.alarm == .nospace ? "NOSPACE" : "CORRUPT" }.filter { !excluded.contains($0) }
        if let first = alarms.first {
            return HTTPResponse(status: 503, body: Array(#"{"health":"false","reason":"ALARM \#(first)"}"#.utf8))
        }
        return HTTPResponse(status: 200, body: Array(#"{"health":"true"}"#.utf8))
    }
}
