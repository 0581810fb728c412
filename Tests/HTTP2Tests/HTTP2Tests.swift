import GRPC
import HTTPCore
import Testing

@testable import HTTP2

/// The client's view of its streams.
final class ClientSide: HTTP2SessionDelegate {
    var headers: [Int32: [[HeaderField]]] = [:]
    var data: [Int32: [UInt8]] = [:]
    var closed: Set<Int32> = []
    func streamHeaders(_ stream: Int32, _ h: [HeaderField], _ block: HeaderBlock) {
        headers[stream, default: []].append(h)
    }
    func streamData(_ stream: Int32, _ d: UnsafeRawBufferPointer) { data[stream, default: []] += d }
    func streamEnded(_ stream: Int32) {}
    func streamClosed(_ stream: Int32) { closed.insert(stream) }
    func streamDrained(_ stream: Int32) {}

    func value(_ stream: Int32, _ name: String) -> String? {
        headers[stream]?.flatMap { $0 }.first { $0.name == name }?.value
    }
}

/// A gRPC handler that writes down what it hears and answers as told.
final class Recorder: CallHandler {
    var events: [String] = []
    var echo = true
    func call(_ call: ServerCall, received message: [UInt8]) {
        events.append("message \(message.count)")
        if echo { call.send(message) }
    }
    func callHalfClosed(_ call: ServerCall) {
        events.append("half-closed")
        if echo { call.finish(.ok) }
    }
    func callDrained(_ call: ServerCall) { events.append("drained") }
    func callEnded(_ call: ServerCall) { events.append("ended \(call.finalStatus?.code.name ?? "-")") }
}

/// Plain HTTP over h2c, answered with the path.
final class Plain: HTTPHandler {
    var requests: [HTTPRequest] = []
    func handle(_ request: HTTPRequest, _ out: any HTTPResponder) {
        requests.append(request)
        out.respond(HTTPResponse(status: 200, body: Array(request.path.utf8)))
    }
    func response(for refusal: HTTPRefusal) -> HTTPResponse { HTTPResponse(status: 413, body: Array("too big".utf8)) }
}

/// A client and a server session joined in memory.
final class Pair {
    let server = HTTP2Session(role: .server)
    let client = HTTP2Session(role: .client)
    let clientSide = ClientSide()
    let recorder = Recorder()
    let plain = Plain()
    var grpc: GRPCConnection!
    var plainStreams: HTTP2PlainRequests!
    var calls: [ServerCall] = []

    /// A handler that ends its call while it is being made.
    final class Refuser: CallHandler {
        var ended = 0
        init(_ call: ServerCall) { call.finish(GRPCStatus(.permissionDenied, "no")) }
        func call(_ call: ServerCall, received message: [UInt8]) {}
        func callEnded(_ call: ServerCall) { ended += 1 }
    }
    var refusers: [Refuser] = []

    init(others: Bool = true, maxBody: Int = 1 << 20) {
        client.delegate = clientSide
        plainStreams = HTTP2PlainRequests(session: server, handler: plain, maxBodyBytes: maxBody, needsFlush: {})
        grpc = GRPCConnection(
            session: server, maxMessageBytes: 1 << 20,
            route: { [unowned self] path in
                switch path {
                case "/svc/Echo":
                    return { call in
                        self.calls.append(call)
                        return self.recorder
                    }
                case "/svc/Refuse":
                    return { call in
                        let r = Refuser(call)
                        self.refusers.append(r)
                        return r
                    }
                default: return nil
                }
            }, others: others ? plainStreams : nil, needsFlush: {})
    }

    /// Bytes the server wrote that the client has not read yet.
    var unread: [UInt8] = []

    /// Moves bytes both ways until both sides are quiet (with `clientReads` false, the client
    /// reads nothing: the server's bytes wait, as in a socket nobody reads).
    func pump(clientReads: Bool = true) {
        for _ in 0..<100 {
            let toServer = client.takeOutput()
            if !toServer.isEmpty { _ = toServer.withUnsafeBytes { server.receive($0) } }
            unread += server.takeOutput()
            let delivered = clientReads && !unread.isEmpty
            if delivered {
                _ = unread.withUnsafeBytes { client.receive($0) }
                unread = []
            }
            if toServer.isEmpty && !delivered { return }
        }
    }

    func grpcRequest(_ path: String, _ messages: [[UInt8]], end: Bool = true) -> Int32 {
        let sid = client.request(headers: [
            (":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "t"),
            ("content-type", "application/grpc"), ("te", "trailers"),
        ])
        for m in messages { client.send(MessageFramer.frame(m), on: sid) }
        if end { client.finish(sid, trailers: []) }
        pump()
        return sid
    }
}

@Suite struct HTTP2Tests {
    @Test func aUnaryCallGoesThroughItsHandlerInOrder() {
        let p = Pair()
        let sid = p.grpcRequest("/svc/Echo", [[1, 2, 3]])
        #expect(p.recorder.events == ["message 3", "half-closed", "ended OK"])
        #expect(p.clientSide.value(sid, ":status") == "200")
        #expect(p.clientSide.value(sid, "grpc-status") == "0")
        #expect(p.clientSide.data[sid] == MessageFramer.frame([1, 2, 3]))
        #expect(p.clientSide.closed.contains(sid))
    }

    @Test func aHandlerThatEndsItsCallWhileBeingMadeStillHearsTheEndOnce() {
        let p = Pair()
        let sid = p.grpcRequest("/svc/Refuse", [[1]])
        #expect(p.refusers.map(\.ended) == [1])
        #expect(p.clientSide.value(sid, "grpc-status") == String(GRPCCode.permissionDenied.rawValue))
    }

    @Test func anUnknownMethodIsUnimplementedAndNoHandlerIsMade() {
        let p = Pair()
        let sid = p.grpcRequest("/svc/Nope", [[1]])
        #expect(p.calls.isEmpty)
        #expect(p.clientSide.value(sid, "grpc-status") == String(GRPCCode.unimplemented.rawValue))
        #expect(p.clientSide.value(sid, "grpc-message") == "unknown method /svc/Nope")
    }

    @Test func aResetCallEndsOnceAsCancelled() {
        let p = Pair()
        p.recorder.echo = false
        let sid = p.grpcRequest("/svc/Echo", [[9]], end: false)
        p.client.reset(sid)
        p.pump()
        #expect(p.recorder.events == ["message 1", "ended Canceled"])
        p.calls[0].finish(.ok)  // too late: nothing happens, nothing is heard twice
        p.pump()
        #expect(p.recorder.events == ["message 1", "ended Canceled"])
    }

    @Test func responsesQueueBeyondThePeersWindowAndDrainWhenItReads() {
        let p = Pair()
        p.recorder.echo = false
        _ = p.grpcRequest("/svc/Echo", [[0]], end: false)
        let call = p.calls[0]
        for _ in 0..<3 { call.send([UInt8](repeating: 7, count: 1 << 20)) }
        p.pump(clientReads: false)
        #expect(call.queuedBytes > 1 << 20, "the peer's 1 MiB window holds the rest back")
        call.notifyWhenDrained()
        #expect(!p.recorder.events.contains("drained"))
        p.pump()
        #expect(call.queuedBytes == 0)
        #expect(p.recorder.events.contains("drained"))
    }

    @Test func plainRequestsGoToTheHTTPHandler() {
        let p = Pair()
        let sid = p.client.request(headers: [
            (":method", "POST"), (":scheme", "http"), (":path", "/v3/kv/range?q=1"), (":authority", "t"),
            ("content-type", "application/json"), ("authorization", "tok"),
        ])
        p.client.send(Array("{}".utf8), on: sid)
        p.client.finish(sid, trailers: [])
        p.pump()
        let r = p.plain.requests[0]
        #expect(r.method == "POST" && r.path == "/v3/kv/range" && r.query == "q=1")
        #expect(r.header("Authorization") == "tok" && r.body == Array("{}".utf8))
        #expect(p.clientSide.value(sid, ":status") == "200")
        #expect(p.clientSide.data[sid] == Array("/v3/kv/range".utf8))
        #expect(p.recorder.events.isEmpty)
    }

    @Test func aPlainBodyOverTheLimitIsRefused() {
        let p = Pair(maxBody: 8)
        let sid = p.client.request(headers: [
            (":method", "POST"), (":scheme", "http"), (":path", "/x"), (":authority", "t"),
        ])
        p.client.send(Array("0123456789".utf8), on: sid)
        p.client.finish(sid, trailers: [])
        p.pump()
        #expect(p.plain.requests.isEmpty)
        #expect(p.clientSide.value(sid, ":status") == "413")
        #expect(p.clientSide.data[sid] == Array("too big".utf8))
    }

    @Test func withoutAPlainHandlerOtherStreamsAre415() {
        let p = Pair(others: false)
        let sid = p.client.request(headers: [
            (":method", "GET"), (":scheme", "http"), (":path", "/x"), (":authority", "t"),
        ])
        p.client.finish(sid, trailers: [])
        p.pump()
        #expect(p.clientSide.value(sid, ":status") == "415")
    }
}
