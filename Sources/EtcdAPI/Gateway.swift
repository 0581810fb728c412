import EtcdProto
import Foundation
import GRPC
import SwiftProtobuf
import WatchHub

/// Where the gateway writes an HTTP answer: whole, or as a stream of chunks (the HTTP layer
/// implements it).
public protocol GatewayResponder: AnyObject {
    func respond(status: Int, body: [UInt8])
    func startStream()
    func send(_ chunk: [UInt8])
    func finish()
    /// Bytes written and not yet taken by the client.
    var queuedBytes: Int { get }
    /// Set by the gateway: called if the client leaves before the answer is done.
    var onClose: (() -> Void)? { get set }
    /// Calls `body` once the bytes sent so far have left (at once if they have).
    func notifyWhenDrained(_ body: @escaping () -> Void)
}

/// etcd's HTTP/JSON gateway (grpc-gateway v1 as etcd 3.4 serves it): `POST /v3/...` with a JSON
/// request, answered in the protobuf JSON mapping with proto field names, 64-bit integers as
/// strings, bytes in base64 and defaults omitted. Streaming methods answer with one
/// `{"result":{...}}` line per message on a chunked response.
public final class Gateway {
    static let jsonOptions: JSONEncodingOptions = {
        var o = JSONEncodingOptions()
        o.preserveProtoFieldNames = true
        return o
    }()

    /// Gateway path (after `/v3`) → gRPC method path.
    static let paths: [String: String] = [
        "/kv/range": "/etcdserverpb.KV/Range",
        "/kv/put": "/etcdserverpb.KV/Put",
        "/kv/deleterange": "/etcdserverpb.KV/DeleteRange",
        "/kv/txn": "/etcdserverpb.KV/Txn",
        "/kv/compaction": "/etcdserverpb.KV/Compact",
        "/watch": "/etcdserverpb.Watch/Watch",
        "/lease/grant": "/etcdserverpb.Lease/LeaseGrant",
        "/lease/revoke": "/etcdserverpb.Lease/LeaseRevoke",
        "/kv/lease/revoke": "/etcdserverpb.Lease/LeaseRevoke",
        "/lease/keepalive": "/etcdserverpb.Lease/LeaseKeepAlive",
        "/lease/timetolive": "/etcdserverpb.Lease/LeaseTimeToLive",
        "/kv/lease/timetolive": "/etcdserverpb.Lease/LeaseTimeToLive",
        "/lease/leases": "/etcdserverpb.Lease/LeaseLeases",
        "/kv/lease/leases": "/etcdserverpb.Lease/LeaseLeases",
        "/cluster/member/add": "/etcdserverpb.Cluster/MemberAdd",
        "/cluster/member/remove": "/etcdserverpb.Cluster/MemberRemove",
        "/cluster/member/update": "/etcdserverpb.Cluster/MemberUpdate",
        "/cluster/member/list": "/etcdserverpb.Cluster/MemberList",
        "/cluster/member/promote": "/etcdserverpb.Cluster/MemberPromote",
        "/maintenance/alarm": "/etcdserverpb.Maintenance/Alarm",
        "/maintenance/status": "/etcdserverpb.Maintenance/Status",
        "/maintenance/defragment": "/etcdserverpb.Maintenance/Defragment",
        "/maintenance/hash": "/etcdserverpb.Maintenance/Hash",
        "/maintenance/snapshot": "/etcdserverpb.Maintenance/Snapshot",
        "/maintenance/transfer-leadership": "/etcdserverpb.Maintenance/MoveLeader",
        "/auth/enable": "/etcdserverpb.Auth/AuthEnable",
        "/auth/disable": "/etcdserverpb.Auth/AuthDisable",
        "/auth/status": "/etcdserverpb.Auth/AuthStatus",
        "/auth/authenticate": "/etcdserverpb.Auth/Authenticate",
        "/auth/user/add": "/etcdserverpb.Auth/UserAdd",
        "/auth/user/get": "/etcdserverpb.Auth/UserGet",
        "/auth/user/list": "/etcdserverpb.Auth/UserList",
        "/auth/user/delete": "/etcdserverpb.Auth/UserDelete",
        "/auth/user/changepw": "/etcdserverpb.Auth/UserChangePassword",
        "/auth/user/grant": "/etcdserverpb.Auth/UserGrantRole",
        "/auth/user/revoke": "/etcdserverpb.Auth/UserRevokeRole",
        "/auth/role/add": "/etcdserverpb.Auth/RoleAdd",
        "/auth/role/get": "/etcdserverpb.Auth/RoleGet",
        "/auth/role/list": "/etcdserverpb.Auth/RoleList",
        "/auth/role/delete": "/etcdserverpb.Auth/RoleDelete",
        "/auth/role/grant": "/etcdserverpb.Auth/RoleGrantPermission",
        "/auth/role/revoke": "/etcdserverpb.Auth/RoleRevokePermission",
    ]

    /// grpc-gateway's HTTP status for a gRPC code.
    static func httpStatus(_ code: GRPCCode) -> Int {
        switch code {
        case .ok: 200
        case .cancelled: 408
        case .invalidArgument, .failedPrecondition, .outOfRange: 400
        case .deadlineExceeded: 504
        case .notFound: 404
        case .alreadyExists, .aborted: 409
        case .permissionDenied: 403
        case .unauthenticated: 401
        case .resourceExhausted: 429
        case .unimplemented: 501
        case .unavailable: 503
        case .unknown, .internal, .dataLoss: 500
        }
    }

    /// `{"error":…,"code":…,"message":…}`.
    static func errorBody(_ s: GRPCStatus) -> [UInt8] {
        let m = jsonString(s.message)
        return Array(#"{"error":\#(m),"code":\#(s.code.rawValue),"message":\#(m)}"#.utf8)
    }

    static func jsonString(_ s: String) -> String {
        let data = (try? JSONSerialization.data(withJSONObject: [s], options: [.withoutEscapingSlashes])) ?? Data("[\"\"]".utf8)
        return String(decoding: data.dropFirst().dropLast(), as: UTF8.self)
    }

    private let services: EtcdServices

    init(services: EtcdServices) { self.services = services }

    /// Whether the gateway serves `path` (`/v3/...` or `/v3beta/...`).
    public static func handles(_ path: String) -> Bool { path.hasPrefix("/v3/") || path.hasPrefix("/v3beta/") }

    /// Serves one gateway request.
    public func handle(method: String, path: String, body: [UInt8], headers: [(name: String, value: String)],
                       _ out: any GatewayResponder) {
        let sub = path.hasPrefix("/v3beta/") ? String(path.dropFirst(7)) : String(path.dropFirst(3))
        guard let grpcPath = Self.paths[sub] else {
            return out.respond(status: 404, body: Self.errorBody(GRPCStatus(.notFound, "Not Found")))
        }
        guard method == "POST" else {
            return out.respond(status: 405, body: Self.errorBody(GRPCStatus(.unimplemented, "Method Not Allowed")))
        }
        // grpc-gateway passes the Authorization header on as the token.
        let token = headers.first { $0.name.lowercased() == "authorization" }?.value
        switch grpcPath {
        case "/etcdserverpb.Watch/Watch": watch(body, token, out)
        case "/etcdserverpb.Lease/LeaseKeepAlive": keepAlive(body, token, out)
        default:
            guard let route = services.jsonRoutes[grpcPath] else {
                let name = grpcPath.split(separator: "/").last.map(String.init) ?? grpcPath
                return out.respond(status: 501, body: Self.errorBody(GRPCStatus(.unimplemented, "unknown method \(name)")))
            }
            route(body, token) { status, bytes in out.respond(status: status, body: bytes) }
        }
    }

    /// Splits a body holding a sequence of JSON objects (grpc-gateway's decoder loop for streams).
    static func objects(_ body: [UInt8]) -> [[UInt8]]? {
        var out: [[UInt8]] = []
        var depth = 0, start = -1, inString = false, escaped = false
        for (i, b) in body.enumerated() {
            if inString {
                if escaped { escaped = false } else if b == UInt8(ascii: "\\") { escaped = true } else if b == UInt8(ascii: "\"") { inString = false }
                continue
            }
            switch b {
            case UInt8(ascii: "\""): inString = true
            case UInt8(ascii: "{"):
                if depth == 0 { start = i }
                depth += 1
            case UInt8(ascii: "}"):
                depth -= 1
                if depth < 0 { return nil }
                if depth == 0 { out.append(Array(body[start...i])) }
            case UInt8(ascii: " "), UInt8(ascii: "\n"), UInt8(ascii: "\r"), UInt8(ascii: "\t"): break
            default: if depth == 0 { return nil }
            }
        }
        return depth == 0 && !inString ? out : nil
    }

    private func decodeAll<M: SwiftProtobuf.Message>(_ body: [UInt8], as: M.Type) -> Result<[M], GRPCStatus> {
        guard let parts = Self.objects(body) else { return .failure(GRPCStatus(.invalidArgument, "malformed JSON body")) }
        var out: [M] = []
        for p in parts {
            do { out.append(try M(jsonUTF8Data: Data(p))) } catch {
                return .failure(GRPCStatus(.invalidArgument, "\(error)"))
            }
        }
        return .success(out)
    }

    private static func result(_ m: some SwiftProtobuf.Message) -> [UInt8] {
        let json = (try? m.jsonString(options: jsonOptions)) ?? "{}"
        return Array("{\"result\":\(json)}\n".utf8)
    }

    /// `/v3/watch`: the body's WatchRequests, then a stream of responses until the client leaves.
    private func watch(_ body: [UInt8], _ token: String?, _ out: any GatewayResponder) {
        let requests: [Etcdserverpb_WatchRequest]
        switch decodeAll(body, as: Etcdserverpb_WatchRequest.self) {
        case .success(let r): requests = r
        case .failure(let s): return out.respond(status: Gateway.httpStatus(s.code), body: Self.errorBody(s))
        }
        out.startStream()
        let sink = JSONWatchSink(out)
        let session = services.watch.open(sink, token: token)
        let hub = services.watch.hub
        // Parked watchers resume when this client has taken what it was sent.
        sink.onDrained = { [weak session] in if let session { hub.streamDrained(session.stream) } }
        out.onClose = { session.close() }
        for r in requests { session.receive(r) }
    }

    /// `/v3/lease/keepalive`: one answer per request in the body, then the stream ends.
    private func keepAlive(_ body: [UInt8], _ token: String?, _ out: any GatewayResponder) {
        let requests: [Etcdserverpb_LeaseKeepAliveRequest]
        switch decodeAll(body, as: Etcdserverpb_LeaseKeepAliveRequest.self) {
        case .success(let r): requests = r
        case .failure(let s): return out.respond(status: Gateway.httpStatus(s.code), body: Self.errorBody(s))
        }
        var answers: [[UInt8]] = []
        for r in requests {
            do throws(EtcdError) {
                answers.append(Self.result(try services.keepAliveResponse(r, token: token)))
            } catch {
                return out.respond(status: Gateway.httpStatus(error.code), body: Self.errorBody(error.status))
            }
        }
        out.startStream()
        for a in answers { out.send(a) }
        out.finish()
    }
}

/// Watch responses as gateway JSON lines. The hub hands over framed protobuf (5-byte gRPC prefix),
/// which is turned into JSON here: the gateway is not the fan-out path.
final class JSONWatchSink: WatchSink {
    let out: any GatewayResponder
    init(_ out: any GatewayResponder) { self.out = out }

    func send(_ message: [UInt8]) {
        guard message.count >= 5, let r = try? Etcdserverpb_WatchResponse(serializedBytes: message[5...]) else { return }
        let json = (try? r.jsonString(options: Gateway.jsonOptions)) ?? "{}"
        out.send(Array("{\"result\":\(json)}\n".utf8))
    }

    var queuedBytes: Int { out.queuedBytes }
    var onDrained: (() -> Void)?

    func notifyWhenDrained() { out.notifyWhenDrained { [weak self] in self?.onDrained?() } }
}
