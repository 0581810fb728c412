import HTTPCore
import Testing

@testable import HTTP1

/// Serves requests the way a test says, recording them.
final class Handler: HTTPHandler, HTTPStreamObserver {
    var requests: [HTTPRequest] = []
    var responders: [any HTTPResponder] = []
    /// Answer at once with the path as body (false: keep the responder for later).
    var answerAtOnce = true
    var events: [String] = []

    func handle(_ request: HTTPRequest, _ responder: any HTTPResponder) {
        requests.append(request)
        responders.append(responder)
        if answerAtOnce {
            responder.respond(HTTPResponse(status: 200, contentType: "text/plain", body: Array(request.path.utf8)))
        }
    }

    func response(for refusal: HTTPRefusal) -> HTTPResponse {
        events.append("refused \(refusal)")
        switch refusal {
        case .bodyTooLarge: return HTTPResponse(status: 413, body: Array("big".utf8))
        case .readTimeout: return HTTPResponse(status: 408, body: Array("slow".utf8))
        case .malformed: return HTTPResponse(status: 400, body: Array("bad".utf8))
        }
    }

    func responseDrained() { events.append("drained") }
    func responseClosed() { events.append("closed") }
}

/// An HTTP/1.1 connection with its output collected.
final class Wire: HTTP1Transport {
    let handler = Handler()
    var out: [UInt8] = []
    var closed = false
    var queued = 0
    var connection: HTTP1Connection!

    init(maxBody: Int = 1024) {
        connection = HTTP1Connection(handler: handler, transport: self, maxBodyBytes: maxBody)
    }

    func write(_ bytes: [UInt8], close: Bool) {
        out += bytes
        if close { closed = true }
    }
    var queuedBytes: Int { queued }
    /// The next turn comes at once here.
    func nextTurn(_ work: @escaping () -> Void) { work() }

    func send(_ s: String) { Array(s.utf8).withUnsafeBytes { connection.receive($0) } }
    var text: String { String(decoding: out, as: UTF8.self) }
}

@Suite struct HTTP1Tests {
    @Test func aRequestIsParsedAndAnsweredWithItsLength() {
        let w = Wire()
        w.send("POST /v3/kv/range?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nX-Token: t\r\n\r\nhello")
        let r = w.handler.requests[0]
        #expect(r.method == "POST" && r.path == "/v3/kv/range" && r.query == "x=1")
        #expect(r.header("x-token") == "t" && r.body == Array("hello".utf8))
        #expect(w.text == "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n\r\n/v3/kv/range")
        #expect(!w.closed)
    }

    @Test func pipelinedRequestsAreAnsweredInOrder() {
        let w = Wire()
        w.handler.answerAtOnce = false
        w.send("GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n")
        #expect(w.handler.requests.map(\.path) == ["/a"], "the second waits for the first answer")
        w.handler.responders[0].respond(HTTPResponse(status: 200, body: Array("A".utf8)))
        // The next request is handled on the next turn (at once here).
        #expect(w.handler.requests.map(\.path) == ["/a", "/b"])
        w.handler.responders[1].respond(HTTPResponse(status: 404, body: []))
        #expect(
            w.text.hasSuffix(
                "\r\n\r\nAHTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 0\r\n\r\n"))
    }

    @Test func aStreamIsChunkedAndHearsDrainsAndTheClientLeaving() {
        let w = Wire()
        w.handler.answerAtOnce = false
        w.send("POST /v3/watch HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        let r = w.handler.responders[0]
        r.startStream(status: 200, contentType: "application/json", observer: w.handler)
        r.send(Array("{\"a\":1}\n".utf8))
        w.queued = 100
        r.notifyWhenDrained()
        #expect(w.handler.events.isEmpty, "not drained while bytes wait")
        w.queued = 0
        w.connection.writable()
        #expect(w.handler.events == ["drained"])
        w.connection.connectionClosed()
        #expect(w.handler.events == ["drained", "closed"])
        #expect(
            w.text
                == "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n{\"a\":1}\n\r\n"
        )
        // After the client left, sends do nothing.
        r.send(Array("x".utf8))
        #expect(w.text.hasSuffix("\n\r\n"))
    }

    @Test func aFinishedStreamEndsWithTheLastChunk() {
        let w = Wire()
        w.handler.answerAtOnce = false
        w.send("GET /s HTTP/1.1\r\nConnection: close\r\n\r\n")
        let r = w.handler.responders[0]
        r.startStream(status: 200, contentType: "text/plain", observer: w.handler)
        r.send(Array("hi".utf8))
        r.finish()
        #expect(w.text.hasSuffix("2\r\nhi\r\n0\r\n\r\n"))
        #expect(w.closed, "Connection: close is honoured after the answer")
        #expect(!w.handler.events.contains("closed"), "a finished answer does not hear the close")
    }

    @Test func aDeclaredBodyOverTheLimitIsRefusedBeforeItArrives() {
        let w = Wire(maxBody: 10)
        w.send("POST /v3/kv/put HTTP/1.1\r\nContent-Length: 11\r\n\r\n")
        #expect(w.handler.requests.isEmpty)
        #expect(w.handler.events == ["refused bodyTooLarge"])
        #expect(
            w.text.hasPrefix("HTTP/1.1 413 Payload Too Large\r\n") && w.text.contains("Connection: close") && w.closed)
    }

    @Test func aChunkedBodyOverTheLimitIsRefusedToo() {
        let w = Wire(maxBody: 10)
        w.send("POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n8\r\n12345678\r\n0\r\n\r\n")
        #expect(w.handler.requests.isEmpty && w.text.hasPrefix("HTTP/1.1 413") && w.closed)
    }

    @Test func garbageIsAnswered400AndClosed() {
        let w = Wire()
        w.send("\u{1}\u{2}NOT HTTP\r\n\r\n")
        #expect(w.handler.events == ["refused malformed"])
        #expect(w.text.hasPrefix("HTTP/1.1 400 Bad Request\r\n") && w.text.hasSuffix("bad") && w.closed)
    }

    @Test func aRequestThatStallsTimesOutOnlyWhileUnfinished() {
        let w = Wire()
        w.send("GET /done HTTP/1.1\r\n\r\n")
        w.connection.timeOut()
        #expect(!w.closed, "no request in progress: nothing to time out")
        w.send("POST /half HTTP/1.1\r\nContent-Length: 100\r\n\r\nabc")
        #expect(w.connection.midRequest)
        w.connection.timeOut()
        #expect(w.handler.events == ["refused readTimeout"] && w.closed)
        #expect(w.text.contains("HTTP/1.1 408 Request Timeout"))
    }

    @Test func expectContinueIsAnsweredBeforeTheBody() {
        let w = Wire()
        w.send("POST /e HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
        #expect(w.text == "HTTP/1.1 100 Continue\r\n\r\n")
        w.send("ok")
        #expect(w.handler.requests.first?.body == Array("ok".utf8))
    }
}
