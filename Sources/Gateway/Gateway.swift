import EtcdAPI
import EtcdProto
import Foundation
import HTTPCore
import MVCC
import SwiftProtobuf
import VigilCore
import WatchHub

/// etcd's HTTP/JSON gateway (grpc-gateway v1 as etcd 3.4 serves it): `POST /v3/...` with a JSON
/// request, answered in the protobuf JSON mapping with proto field names, 64-bit integers as
/// strings, bytes in base64 and defaults omitted. Streaming methods answer with one
/// `{"result":{...}}` line per message on a streamed response.
///
/// It is a mapping only: the method comes from `EtcdMethod`'s table, the work from the same
/// handlers gRPC uses, and the answer goes out through the transport's `HTTPResponder`
/// (HTTP/1.1 or h2c alike).
public final class Gateway {
    static let jsonOptions: JSONEncodingOptions = {
        var o = JSONEncodingOptions()
        o.preserveProtoFieldNames = true
        return o
    }()

    private let services: EtcdServices
    private let watchEncoder: JSONWatchEncoder
    private let sseEncoder: SSEWatchEncoder
    private let refused: (EtcdError.Refusal) -> Void

    /// `--max-concurrent-streams`. etcd's gateway makes its calls over one gRPC connection to its
    /// own server, so at most this many gateway calls (unary, or a stream while it lasts) run at
    /// once; the next ones wait their turn, as a Go client waits for a free HTTP/2 stream.
    public var maxConcurrentCalls = Int.max
    private var activeCalls = 0
    /// Calls waiting for a turn, oldest first (`waitingHead` is the next).
    private var waiting: [(request: HTTPRequest, out: any HTTPResponder)?] = []
    private var waitingHead = 0

    /// - Parameter refused: hears every request refused for a limit (the server counts them).
    public init(services: EtcdServices, refused: @escaping (EtcdError.Refusal) -> Void = { _ in }) {
        self.services = services
        self.refused = refused
        watchEncoder = JSONWatchEncoder(identity: services.context.identity)
        sseEncoder = SSEWatchEncoder(identity: services.context.identity)
    }

    /// Whether a request is handed over at its head, its body following as it arrives: `POST
    /// /v3/watch`, whose body may go on carrying create, cancel and progress requests.
    public static func streamsBody(method: String, path: String) -> Bool {
        method == "POST" && EtcdMethod.forGatewayPath(path) == .watch
    }

    /// Whether the gateway serves `path` (`/v3/...` or `/v3beta/...`).
    public static func handles(_ path: String) -> Bool {
        EtcdMethod.gatewayPrefixes.contains { path.hasPrefix($0) }
    }

    /// `{"error":…,"message":…,"code":…}`, grpc-gateway's error body, its fields in the order
    /// etcd writes them (etcd's e2e tests compare the bytes).
    public static func errorBody(code: GRPCCode, message: String) -> [UInt8] {
        let m = jsonString(message)
        return Array(#"{"error":\#(m),"message":\#(m),"code":\#(code.rawValue)}"#.utf8)
    }

    /// An error answer: the error's HTTP status and grpc-gateway's body.
    public static func errorResponse(_ e: EtcdError) -> HTTPResponse {
        HTTPResponse(status: e.code.httpStatus, body: errorBody(code: e.grpcCode, message: e.message))
    }

    static func errorResponse(status: Int, code: GRPCCode, _ message: String) -> HTTPResponse {
        HTTPResponse(status: status, body: errorBody(code: code, message: message))
    }

    /// A JSON string literal for `s`.
    static func jsonString(_ s: String) -> String {
        let data =
            (try? JSONSerialization.data(withJSONObject: [s], options: [.withoutEscapingSlashes]))
            ?? Data("[\"\"]".utf8)
        return String(decoding: data.dropFirst().dropLast(), as: UTF8.self)
    }

    /// Serves one gateway request.
    public func handle(_ request: HTTPRequest, _ out: any HTTPResponder) {
        guard let method = EtcdMethod.forGatewayPath(request.path) else {
            return out.respond(Self.errorResponse(status: 404, code: .notFound, "Not Found"))
        }
        guard activeCalls < maxConcurrentCalls else {
            let slot = waiting.count
            waiting.append((request, out))
            // A client that leaves while it waits gives up its turn.
            out.whenDone { [weak self] _ in
                guard let self, slot < waiting.count, let w = waiting[slot], w.out === out else { return }
                waiting[slot] = nil
            }
            return
        }
        activeCalls += 1
        out.whenDone { [weak self] _ in
            guard let self else { return }
            activeCalls -= 1
            startWaiting()
        }
        serve(method, request, out)
    }

    /// Starts the oldest waiting call whose client is still there, if a turn is free.
    private func startWaiting() {
        while activeCalls < maxConcurrentCalls && waitingHead < waiting.count {
            let next = waiting[waitingHead]
            waiting[waitingHead] = nil
            waitingHead += 1
            if waitingHead == waiting.count {
                waiting.removeAll(keepingCapacity: true)
                waitingHead = 0
            }
            if let next { handle(next.request, next.out) }
        }
    }

    private func serve(_ method: EtcdMethod, _ request: HTTPRequest, _ out: any HTTPResponder) {
        if method == .watch && request.method == "GET" { return sse(request, out) }
        guard request.method == "POST" else {
            return out.respond(Self.errorResponse(status: 405, code: .unimplemented, "Method Not Allowed"))
        }
        // grpc-gateway passes `Grpc-Metadata-Token` on as the `token` metadata and `Authorization`
        // as `authorization`; etcd reads `token` first.
        let token = request.header("grpc-metadata-token") ?? request.header("authorization")
        switch method {
        case .watch:
            if let stream = request.bodyStream { return watch(stream, token, out) }
            watch(request.body, token, out)
        case .leaseKeepAlive: keepAlive(request.body, token, out)
        case .observe: observe(request.body, token, out)
        default:
            guard let unary = services.unary(method) else {
                return out.respond(
                    Self.errorResponse(status: 501, code: .unimplemented, "unknown method \(method.name)"))
            }
            serve(unary, request.body, token, out)
        }
    }

    private func serve(_ unary: UnaryMethod, _ body: [UInt8], _ token: String?, _ out: any HTTPResponder) {
        let reply = JSONReply(out, refused: refused)
        let req: any SwiftProtobuf.Message
        do {
            req = try unary.requestType.init(jsonUTF8Bytes: body.isEmpty ? Array("{}".utf8) : body, options: .init())
        } catch {
            return out.respond(Self.errorResponse(status: 400, code: .invalidArgument, "\(error)"))
        }
        // The request limit applies to the request as the gRPC API would see it.
        let size = (try? req.serializedBytes() as [UInt8])?.count ?? body.count
        unary.serve(req, RequestInfo(token: token, size: size), reply)
    }

    /// Splits a body holding a sequence of JSON objects (grpc-gateway's decoder loop for streams).
    static func objects(_ body: [UInt8]) -> [[UInt8]]? {
        var splitter = JSONObjectSplitter()
        guard let out = splitter.feed(body), splitter.isBetweenObjects else { return nil }
        return out
    }

    /// A request the gateway answers itself, with `response`.
    private struct Refused: Error {
        let response: HTTPResponse
    }

    private func decodeAll<M: SwiftProtobuf.Message>(_ body: [UInt8], as: M.Type) -> Result<[M], Refused> {
        guard let parts = Self.objects(body) else {
            return .failure(
                Refused(response: Self.errorResponse(status: 400, code: .invalidArgument, "malformed JSON body")))
        }
        var out: [M] = []
        for p in parts {
            do { out.append(try M(jsonUTF8Bytes: p, options: .init())) } catch {
                return .failure(Refused(response: Self.errorResponse(status: 400, code: .invalidArgument, "\(error)")))
            }
        }
        return .success(out)
    }

    /// `{"result":…}` and a newline: one message of a streamed answer.
    static func resultLine(_ m: some SwiftProtobuf.Message) -> [UInt8] {
        let json = (try? m.jsonString(options: jsonOptions)) ?? "{}"
        return Array("{\"result\":\(json)}\n".utf8)
    }

    /// `/v3/watch`: the body's WatchRequests, then a stream of responses until the client leaves.
    private func watch(_ body: [UInt8], _ token: String?, _ out: any HTTPResponder) {
        let requests: [Etcdserverpb_WatchRequest]
        switch decodeAll(body, as: Etcdserverpb_WatchRequest.self) {
        case .success(let r): requests = r
        case .failure(let refused): return out.respond(refused.response)
        }
        let sink = JSONWatchSink(out, encoder: watchEncoder)
        // The stream first: a client already gone gets no session, which nothing would close.
        guard out.startStream(status: 200, contentType: "application/json", observer: sink) else { return }
        let session = services.watch.open(sink, credentials: Credentials(token: token))
        sink.session = session
        for r in requests { session.receive(r) }
    }

    /// `POST /v3/watch` with a body that goes on (chunked HTTP/1.1, or an h2c stream left open):
    /// every WatchRequest in it — create, cancel, progress — is served as it arrives, each answered
    /// as on gRPC (grpc-gateway reads only the first). Until the first request is whole, a bad body
    /// gets the same 400 as before; after it, a bad request ends the stream with an error line.
    private func watch(_ body: HTTPBodyStream, _ token: String?, _ out: any HTTPResponder) {
        let sink = JSONWatchSink(out, encoder: watchEncoder)
        var splitter = JSONObjectSplitter()
        var started = false
        let limit = services.context.limits.maxReceiveMessageBytes
        func start() -> Bool {
            guard out.startStream(status: 200, contentType: "application/json", observer: sink) else { return false }
            started = true
            sink.session = services.watch.open(sink, credentials: Credentials(token: token))
            return true
        }
        func fail(_ status: Int, _ message: String) {
            body.stopListening()
            if started {
                let m = Self.jsonString(message)
                let reason = Self.jsonString(HTTPResponse.reason(status))
                out.send(
                    Array(
                        #"{"error":{"grpc_code":3,"http_code":\#(status),"message":\#(m),"http_status":\#(reason)}}"#
                            .utf8) + [10])
                out.finish()
            } else {
                out.respond(Self.errorResponse(status: status, code: .invalidArgument, message))
            }
        }
        body.listen(
            chunk: { [weak sink] bytes in
                guard let sink, !started || sink.session != nil else { return body.stopListening() }
                guard let objects = splitter.feed(bytes) else { return fail(400, "malformed JSON body") }
                if splitter.partialCount > limit { return fail(400, "watch request over \(limit) bytes") }
                for o in objects {
                    let r: Etcdserverpb_WatchRequest
                    do { r = try Etcdserverpb_WatchRequest(jsonUTF8Bytes: o, options: .init()) } catch {
                        return fail(400, "\(error)")
                    }
                    if !started && !start() { return body.stopListening() }
                    sink.session?.receive(r)
                }
            },
            end: {
                // The watches go on until the client leaves; a body with no request still opens
                // an (empty) stream, as a whole body does.
                if !started && splitter.isBetweenObjects { _ = start() }
                if !splitter.isBetweenObjects { fail(400, "malformed JSON body") }
            })
    }

    /// `/v3/election/observe`: the leader, then each change, as `{"result":…}` lines until the
    /// client leaves.
    private func observe(_ body: [UInt8], _ token: String?, _ out: any HTTPResponder) {
        let req: V3electionpb_LeaderRequest
        do {
            req = try V3electionpb_LeaderRequest(
                jsonUTF8Bytes: body.isEmpty ? Array("{}".utf8) : body, options: .init())
        } catch {
            return out.respond(Self.errorResponse(status: 400, code: .invalidArgument, "\(error)"))
        }
        let sink = ObserveSink(out)
        do throws(EtcdError) {
            sink.observation = try services.observe(name: req.name.bytes, credentials: Credentials(token: token)) {
                [weak sink] resp in sink?.send(resp)
            }
        } catch {
            return out.respond(Self.errorResponse(error))
        }
        guard out.startStream(status: 200, contentType: "application/json", observer: sink) else {
            sink.observation?.cancel()
            return
        }
        sink.observation?.start()
    }

    /// `GET /v3/watch?key=…`: a watch as Server-Sent Events. Each event is `id: <mod_revision>`,
    /// `event: put|delete`, `data: <the event's JSON>`; progress is `event: progress` with the
    /// revision as id; a compacted start is `event: compacted`, and the stream ends. A reconnect's
    /// `Last-Event-ID: R` resumes from R+1.
    private func sse(_ request: HTTPRequest, _ out: any HTTPResponder) {
        func bad(_ message: String) { out.respond(Self.errorResponse(status: 400, code: .invalidArgument, message)) }
        let q = HTTPQuery(request.query)
        if q.malformed { return bad("malformed query string") }
        let known: Set<String> = ["key", "range_end", "prefix", "start_revision", "prev_kv", "progress_notify"]
        if let unknown = q.pairs.first(where: { !known.contains($0.name) }) {
            return bad("unknown parameter \(unknown.name)")
        }
        guard let key = q.bytes("key"), !key.isEmpty else { return bad("key is required") }
        var create = Etcdserverpb_WatchCreateRequest()
        create.key = Data(key)
        func flag(_ name: String) -> Bool? {
            guard let v = q.first(name) else { return false }
            switch v {
            case "", "true", "1": return true
            case "false", "0": return false
            default: return nil
            }
        }
        guard let prefix = flag("prefix"), let prevKV = flag("prev_kv"), let progress = flag("progress_notify") else {
            return bad("prefix, prev_kv and progress_notify take true or false")
        }
        if let end = q.bytes("range_end") {
            if prefix { return bad("range_end and prefix=true cannot be given together") }
            create.rangeEnd = Data(end)
        } else if prefix {
            create.rangeEnd = Data(KeyRange.prefixEnd(key))
        }
        if let s = q.first("start_revision") {
            guard let n = Int64(s), n >= 0 else { return bad("start_revision must be a revision") }
            create.startRevision = n
        }
        if let last = request.header("last-event-id") {
            guard let r = Int64(last.trimmingCharacters(in: .whitespaces)), r >= 0 else {
                return bad("Last-Event-ID must be a revision")
            }
            guard r <= services.context.store.currentRevision else {
                return bad("Last-Event-ID \(r) is a future revision")
            }
            create.startRevision = r + 1
        }
        create.prevKv = prevKV
        create.progressNotify = progress
        let token = request.header("grpc-metadata-token") ?? request.header("authorization")
        let sink = SSEWatchSink(out, encoder: sseEncoder)
        guard
            out.startStream(
                status: 200, contentType: "text/event-stream", headers: [("Cache-Control", "no-cache")], observer: sink)
        else { return }
        sseStreams.removeAll { $0.sink == nil }
        sseStreams.append(WeakSSESink(sink: sink))
        let session = services.watch.open(sink, credentials: Credentials(token: token))
        sink.session = session
        var req = Etcdserverpb_WatchRequest()
        req.createRequest = create
        session.receive(req)
    }

    private struct WeakSSESink {
        weak var sink: SSEWatchSink?
    }
    /// The open SSE streams (for their keep-alive comments).
    private var sseStreams: [WeakSSESink] = []

    /// Sends a keep-alive comment on each SSE stream that sent nothing since the last call, so
    /// that proxies and browsers do not close idle ones (the server calls this every
    /// `--sse-keepalive-interval`). Returns how many got one.
    @discardableResult
    public func keepAliveTick() -> Int {
        sseStreams.removeAll { $0.sink == nil || $0.sink!.ended }
        var n = 0
        for s in sseStreams {
            guard let sink = s.sink else { continue }
            if !sink.sentSinceTick {
                sink.out.send(Array(": keep-alive\n\n".utf8))
                n += 1
            }
            sink.sentSinceTick = false
        }
        return n
    }

    /// `/v3/lease/keepalive`: one answer per request in the body, then the stream ends.
    private func keepAlive(_ body: [UInt8], _ token: String?, _ out: any HTTPResponder) {
        let requests: [Etcdserverpb_LeaseKeepAliveRequest]
        switch decodeAll(body, as: Etcdserverpb_LeaseKeepAliveRequest.self) {
        case .success(let r): requests = r
        case .failure(let refused): return out.respond(refused.response)
        }
        var answers: [[UInt8]] = []
        // One at a time, in order (a mirror's renewals answer later).
        func next(_ i: Int) {
            guard i < requests.count else {
                out.startStream(status: 200, contentType: "application/json", observer: nil)
                for a in answers { out.send(a) }
                return out.finish()
            }
            services.keepAlive(requests[i], credentials: Credentials(token: token)) { [self] result in
                switch result {
                case .success(let resp):
                    answers.append(Self.resultLine(resp))
                    next(i + 1)
                case .failure(let error):
                    if let reason = error.code.refusal { refused(reason) }
                    out.respond(Self.errorResponse(error))
                }
            }
        }
        next(0)
    }
}

/// Finds whole JSON objects in bytes that arrive in pieces (a streamed request body): objects
/// back to back or separated by whitespace, as grpc-gateway's decoder reads them.
struct JSONObjectSplitter {
    private var partial: [UInt8] = []
    private var depth = 0
    private var inString = false
    private var escaped = false

    /// Whether no object is half-read.
    var isBetweenObjects: Bool { depth == 0 && partial.isEmpty }
    /// Bytes of the object being read.
    var partialCount: Int { partial.count }

    /// The objects `bytes` complete, or nil if they are not JSON objects.
    mutating func feed(_ bytes: [UInt8]) -> [[UInt8]]? {
        var out: [[UInt8]] = []
        for b in bytes {
            if depth > 0 { partial.append(b) }
            if inString {
                if escaped {
                    escaped = false
                } else if b == UInt8(ascii: "\\") {
                    escaped = true
                } else if b == UInt8(ascii: "\"") {
                    inString = false
                }
                continue
            }
            switch b {
            case UInt8(ascii: "\""):
                guard depth > 0 else { return nil }
                inString = true
            case UInt8(ascii: "{"):
                if depth == 0 { partial = [b] }
                depth += 1
            case UInt8(ascii: "}"):
                guard depth > 0 else { return nil }
                depth -= 1
                if depth == 0 {
                    out.append(partial)
                    partial = []
                }
            case UInt8(ascii: " "), UInt8(ascii: "\n"), UInt8(ascii: "\r"), UInt8(ascii: "\t"): break
            default: if depth == 0 { return nil }
            }
        }
        return out
    }
}

/// A unary answer as gateway JSON.
final class JSONReply: ReplySink {
    private let out: any HTTPResponder
    private let refused: (EtcdError.Refusal) -> Void

    init(_ out: any HTTPResponder, refused: @escaping (EtcdError.Refusal) -> Void) {
        self.out = out
        self.refused = refused
    }

    func ok(_ response: any SwiftProtobuf.Message) {
        do {
            out.respond(
                HTTPResponse(status: 200, body: Array(try response.jsonString(options: Gateway.jsonOptions).utf8)))
        } catch {
            fail(.internal("grpc: error while marshaling: \(error)"))
        }
    }

    func fail(_ error: EtcdError) {
        if let reason = error.code.refusal { refused(reason) }
        out.respond(Gateway.errorResponse(error))
    }

    /// grpc-gateway cancels the call when its HTTP client leaves (a waiting Lock gives up).
    func whenAbandoned(_ body: @escaping () -> Void) {
        out.whenDone { completed in if !completed { body() } }
    }
}

/// Watch responses as gateway JSON lines, made by the hub with this encoder (no protobuf frames
/// decoded on the way): each event is encoded once per revision and shared by every gateway
/// stream that receives it, like gRPC's.
public final class JSONWatchEncoder: WatchEncoder {
    private let identity: MemberIdentity

    public init(identity: MemberIdentity) { self.identity = identity }

    public func encode(_ event: Event, prevKV: Bool) -> [UInt8] {
        Array(((try? event.proto(prevKV: prevKV).jsonString(options: Gateway.jsonOptions)) ?? "{}").utf8)
    }

    /// `{"result":{…}}\n`: the response's fields through SwiftProtobuf's JSON, with the encoded
    /// events put in as `events`, the last field, where SwiftProtobuf would put them.
    public func response(_ f: ResponseFields, events: [[UInt8]]) -> [UInt8] {
        var r = Etcdserverpb_WatchResponse()
        r.header.clusterID = identity.clusterID
        r.header.memberID = identity.memberID
        r.header.raftTerm = identity.raftTerm
        r.header.revision = f.headerRevision
        r.watchID = f.watchID
        r.created = f.created
        r.canceled = f.canceled
        r.compactRevision = f.compactRevision
        r.cancelReason = f.cancelReason
        r.fragment = f.fragment
        var json = Array(((try? r.jsonString(options: Gateway.jsonOptions)) ?? "{}").utf8)
        if !events.isEmpty {
            json.removeLast()  // "}"
            if json.count > 1 { json.append(UInt8(ascii: ",")) }
            json += Array(#""events":["#.utf8)
            for (i, e) in events.enumerated() {
                if i > 0 { json.append(UInt8(ascii: ",")) }
                json += e
            }
            json += Array("]}".utf8)
        }
        return Array(#"{"result":"#.utf8) + json + Array("}\n".utf8)
    }
}

/// A gateway watch stream: the hub's JSON lines go out as chunks; drains and the client leaving
/// come back from the transport.
class JSONWatchSink: WatchSink, HTTPStreamObserver {
    let out: any HTTPResponder
    let encoder: any WatchEncoder
    var session: WatchSession?

    init(_ out: any HTTPResponder, encoder: any WatchEncoder) {
        self.out = out
        self.encoder = encoder
    }

    func send(_ message: [UInt8]) { out.send(message) }
    final var queuedBytes: Int { out.queuedBytes }
    func notifyWhenDrained() { out.notifyWhenDrained() }

    func responseDrained() { session?.drained() }

    func responseClosed() {
        let s = session
        session = nil
        s?.close()
    }
}

/// An Observe answered over the gateway: each leader as a JSON line; the client leaving ends it.
final class ObserveSink: HTTPStreamObserver {
    private let out: any HTTPResponder
    var observation: ElectionObservation?

    init(_ out: any HTTPResponder) { self.out = out }

    func send(_ resp: V3electionpb_LeaderResponse) { out.send(Gateway.resultLine(resp)) }
    func responseDrained() {}
    func responseClosed() {
        observation?.cancel()
        observation = nil
    }
}

/// Watch responses as Server-Sent Events, made once per revision and shared by every SSE stream
/// that receives them.
public final class SSEWatchEncoder: WatchEncoder {
    private let identity: MemberIdentity

    public init(identity: MemberIdentity) { self.identity = identity }

    public func encode(_ event: Event, prevKV: Bool) -> [UInt8] {
        let json = (try? event.proto(prevKV: prevKV).jsonString(options: Gateway.jsonOptions)) ?? "{}"
        let kind = event.kind == .put ? "put" : "delete"
        return Array("id: \(event.kv.modRevision)\nevent: \(kind)\ndata: \(json)\n\n".utf8)
    }

    public func response(_ f: ResponseFields, events: [[UInt8]]) -> [UInt8] {
        if !events.isEmpty { return events.flatMap { $0 } }
        if f.canceled {
            if f.compactRevision > 0 {
                return Array("event: compacted\ndata: {\"compact_revision\":\"\(f.compactRevision)\"}\n\n".utf8)
            }
            return Array("event: canceled\ndata: {\"cancel_reason\":\(JSONText.quote(f.cancelReason))}\n\n".utf8)
        }
        // Created: a comment (the header revision is the store's, not where the watch starts), and
        // a reconnection delay of one second for EventSource (browsers wait three by default).
        if f.created { return Array("retry: 1000\n: watching at revision \(f.headerRevision)\n\n".utf8) }
        return Array("id: \(f.headerRevision)\nevent: progress\ndata: {\"revision\":\"\(f.headerRevision)\"}\n\n".utf8)
    }
}

/// An SSE watch stream: the events go out as they are made; a compacted or cancelled watch ends it.
final class SSEWatchSink: JSONWatchSink {
    private static let compacted = Array("event: compacted".utf8)
    private static let canceled = Array("event: canceled".utf8)

    /// Whether anything went out since the last keep-alive tick.
    var sentSinceTick = false
    /// Whether the answer has ended (compacted, cancelled or the client gone).
    private(set) var ended = false

    /// Ends the HTTP answer after a compacted or cancelled watch (its only watcher is gone). The
    /// session is closed when the transport says the client left, never from inside the hub's send.
    override func send(_ message: [UInt8]) {
        guard !ended else { return }
        out.send(message)
        sentSinceTick = true
        if message.starts(with: Self.compacted) || message.starts(with: Self.canceled) {
            ended = true
            out.finish()
        }
    }

    override func responseClosed() {
        ended = true
        super.responseClosed()
    }
}
