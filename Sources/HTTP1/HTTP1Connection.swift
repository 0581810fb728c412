import CHTTPParser
import HTTPCore

extension HTTPResponse {
    func serialize(keepAlive: Bool) -> [UInt8] {
        var head = "HTTP/1.1 \(status) \(Self.reason(status))\r\n"
        for h in headers { head += "\(h.name): \(h.value)\r\n" }
        head += "Content-Length: \(body.count)\r\n"
        if !keepAlive { head += "Connection: close\r\n" }
        head += "\r\n"
        return Array(head.utf8) + body
    }
}

/// The answer to one request on an HTTP/1.1 connection. Requests on a connection are answered in
/// order: the next one is handled once this one is done.
public final class HTTP1Responder: HTTPResponder {
    weak var connection: HTTP1Connection?
    let keepAlive: Bool
    public private(set) var isDone = false
    private var streaming = false
    /// Kept until the answer is done or the client left (it usually holds this responder too).
    private var observer: (any HTTPStreamObserver)?
    private var drainWanted = false
    private var done = DoneCallbacks()

    init(connection: HTTP1Connection, keepAlive: Bool) {
        self.connection = connection
        self.keepAlive = keepAlive
    }

    public func respond(_ r: HTTPResponse) {
        guard !isDone, !streaming, let c = connection else { return }
        isDone = true
        c.send(r.serialize(keepAlive: keepAlive), close: !keepAlive)
        c.responseDone()
        done.run(completed: true)
    }

    @discardableResult
    public func startStream(
        status: Int, contentType: String, headers: [(name: String, value: String)], observer: (any HTTPStreamObserver)?
    ) -> Bool {
        guard !isDone, !streaming, let c = connection, !c.closed else { return false }
        streaming = true
        self.observer = observer
        var head = "HTTP/1.1 \(status) \(HTTPResponse.reason(status))\r\n"
        for h in headers { head += "\(h.name): \(h.value)\r\n" }
        head += "Content-Type: \(contentType)\r\nTransfer-Encoding: chunked\r\n\r\n"
        c.send(Array(head.utf8), close: false)
        return true
    }

    public func send(_ bytes: [UInt8]) {
        guard streaming, !isDone, !bytes.isEmpty, let c = connection else { return }
        c.send(Array((String(bytes.count, radix: 16) + "\r\n").utf8) + bytes + Array("\r\n".utf8), close: false)
    }

    public func finish() {
        guard streaming, !isDone, let c = connection else { return }
        isDone = true
        observer = nil
        c.send(Array("0\r\n\r\n".utf8), close: !keepAlive)
        c.responseDone()
        done.run(completed: true)
    }

    public func whenDone(_ body: @escaping (Bool) -> Void) { done.add(body) }

    public var queuedBytes: Int { connection?.transport?.queuedBytes ?? 0 }

    public func notifyWhenDrained() {
        if queuedBytes == 0 { observer?.responseDrained() } else { drainWanted = true }
    }

    /// The socket's write queue drained.
    func drained() {
        guard drainWanted else { return }
        drainWanted = false
        observer?.responseDrained()
    }

    func connectionClosed() {
        let o = observer
        observer = nil
        let wasOpen = !isDone
        isDone = true
        if wasOpen { o?.responseClosed() }
        done.run(completed: false)
    }
}

/// What an HTTP/1.1 connection needs from the owner of its socket.
public protocol HTTP1Transport: AnyObject {
    /// Writes bytes, then closes the connection if `close`.
    func write(_ bytes: [UInt8], close: Bool)
    /// Bytes written that the socket has not taken yet.
    var queuedBytes: Int { get }
    /// Runs `work` on a later loop turn.
    func nextTurn(_ work: @escaping () -> Void)
}

/// HTTP/1.1 over http-parser: bytes in, requests to the handler, response bytes out.
/// Keep-alive is honoured; bodies over `maxBodyBytes` get 413 and the connection closes.
public final class HTTP1Connection {
    private var parser = UnsafeMutablePointer<http_parser>.allocate(capacity: 1)
    private var settings = http_parser_settings()
    private weak var handler: (any HTTPHandler)?
    private(set) weak var transport: (any HTTP1Transport)?
    private let maxBodyBytes: Int
    /// Complete requests not yet handled (pipelining), and the one being answered.
    private var queue: [(HTTPRequest, Bool)] = []
    private var current: HTTP1Responder?

    private var url: [UInt8] = []
    private var headers: [(name: String, value: String)] = []
    private var field: [UInt8] = []
    private var value: [UInt8] = []
    private var inValue = false
    private var body: [UInt8] = []
    /// The body of the request being received, when its handler takes it as it arrives.
    private var bodyStream: HTTPBodyStream?
    private var tooLarge = false
    private(set) var closed = false

    public init(handler: (any HTTPHandler)?, transport: any HTTP1Transport, maxBodyBytes: Int = 2 << 20) {
        self.handler = handler
        self.transport = transport
        self.maxBodyBytes = maxBodyBytes
        http_parser_init(parser, HTTP_REQUEST)
        parser.pointee.data = Unmanaged.passUnretained(self).toOpaque()
        settings.on_message_begin = { p in
            let me = HTTP1Connection.from(p)
            me.reset()
            me.midRequest = true
            return 0
        }
        settings.on_url = { p, at, n in
            HTTP1Connection.from(p).url.append(contentsOf: HTTP1Connection.buf(at, n))
            return 0
        }
        settings.on_header_field = { p, at, n in
            let me = HTTP1Connection.from(p)
            if me.inValue { me.endHeader() }
            me.field.append(contentsOf: HTTP1Connection.buf(at, n))
            return 0
        }
        settings.on_header_value = { p, at, n in
            let me = HTTP1Connection.from(p)
            me.inValue = true
            me.value.append(contentsOf: HTTP1Connection.buf(at, n))
            return 0
        }
        settings.on_headers_complete = { p in
            let me = HTTP1Connection.from(p)
            if me.inValue { me.endHeader() }
            return me.headersComplete(contentLength: p!.pointee.content_length)
        }
        settings.on_body = { p, at, n in
            let me = HTTP1Connection.from(p)
            if let stream = me.bodyStream {
                stream.deliver(Array(HTTP1Connection.buf(at, n)))
                return 0
            }
            if me.body.count + n > me.maxBodyBytes {
                me.tooLarge = true
                return 1
            }
            me.body.append(contentsOf: HTTP1Connection.buf(at, n))
            return 0
        }
        settings.on_message_complete = { p in
            HTTP1Connection.from(p).complete()
            return 0
        }
    }

    deinit { parser.deallocate() }

    private static func from(_ p: UnsafeMutablePointer<http_parser>?) -> HTTP1Connection {
        Unmanaged<HTTP1Connection>.fromOpaque(p!.pointee.data).takeUnretainedValue()
    }

    private static func buf(_ at: UnsafePointer<CChar>?, _ n: Int) -> UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(start: at, count: n)
    }

    private func reset() {
        url = []
        headers = []
        field = []
        value = []
        inValue = false
        body = []
        bodyStream = nil
    }

    private func endHeader() {
        headers.append((String(decoding: field, as: UTF8.self), String(decoding: value, as: UTF8.self)))
        field = []
        value = []
        inValue = false
    }

    /// Refuses a declared body over the limit before it is sent, and answers `Expect: 100-continue`.
    private func headersComplete(contentLength: UInt64) -> Int32 {
        if contentLength != UInt64.max && contentLength > UInt64(maxBodyBytes) {
            tooLarge = true
            http_parser_pause(parser, 1)
            return 0
        }
        if headers.contains(where: { $0.name.lowercased() == "expect" && $0.value.lowercased() == "100-continue" }) {
            transport?.write(Array("HTTP/1.1 100 Continue\r\n\r\n".utf8), close: false)
        }
        // A handler that takes the body as it arrives gets the request now; the body follows.
        let method = String(cString: http_method_str(http_method(rawValue: parser.pointee.method)))
        let target = String(decoding: url, as: UTF8.self)
        let path = String(target.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false)[0])
        if let handler, handler.streamsBody(method: method, path: path) {
            let stream = HTTPBodyStream()
            bodyStream = stream
            midRequest = false  // a long-lived body is not a slow request
            queue.append(
                (
                    HTTPRequest(method: method, target: target, headers: headers, body: [], bodyStream: stream),
                    http_should_keep_alive(parser) != 0
                ))
        }
        return 0
    }

    /// Some of a request has arrived, not all of it.
    public private(set) var midRequest = false

    /// The request being received took too long: 408 and close.
    public func timeOut() {
        guard midRequest, !closed else { return }
        refuse(.readTimeout)
    }

    /// Answers a refusal in the handler's words and closes.
    private func refuse(_ r: HTTPRefusal) {
        let response = handler?.response(for: r) ?? HTTPResponse(status: r == .bodyTooLarge ? 413 : 400, body: [])
        send(response.serialize(keepAlive: false), close: true)
    }

    private func complete() {
        midRequest = false
        if let stream = bodyStream {
            bodyStream = nil
            stream.finish()
            return
        }
        let method = String(cString: http_method_str(http_method(rawValue: parser.pointee.method)))
        let req = HTTPRequest(
            method: method, target: String(decoding: url, as: UTF8.self), headers: headers, body: body)
        queue.append((req, http_should_keep_alive(parser) != 0))
    }

    /// Handles the next queued request if none is being answered.
    private func pump() {
        while current == nil, !closed, !queue.isEmpty {
            let (req, keepAlive) = queue.removeFirst()
            let r = HTTP1Responder(connection: self, keepAlive: keepAlive)
            current = r
            if let handler {
                handler.handle(req, r)
            } else {
                r.respond(HTTPResponse(status: 404, body: []))
            }
        }
    }

    func send(_ bytes: [UInt8], close: Bool) {
        guard !closed else { return }
        transport?.write(bytes, close: close)
        if close { closed = true }
    }

    /// Pipelined requests wait while this many response bytes sit unsent: a client that sends
    /// many heavy requests and reads nothing gets one answer's worth of memory, not all of them.
    public static let pipelineHighWater = 256 * 1024
    private var waitingForDrain = false

    func responseDone() {
        current = nil
        if !queue.isEmpty && (transport?.queuedBytes ?? 0) > Self.pipelineHighWater {
            waitingForDrain = true
            return
        }
        guard !queue.isEmpty else { return }
        // Pipelined requests are answered one per loop turn, so a client that queues many heavy
        // requests and leaves is noticed after one.
        transport?.nextTurn { [weak self] in self?.pump() }
    }

    /// The socket's write queue drained: answer the next pipelined request, if one waits.
    public func writable() {
        current?.drained()
        guard waitingForDrain else { return }
        waitingForDrain = false
        pump()
    }

    /// The peer went away: a response in progress hears it.
    public func connectionClosed() {
        closed = true
        queue.removeAll()
        let r = current
        current = nil
        r?.connectionClosed()
    }

    /// Feeds bytes from the socket.
    public func receive(_ bytes: UnsafeRawBufferPointer) {
        guard !closed, let base = bytes.baseAddress else { return }
        let n = http_parser_execute(parser, &settings, base.assumingMemoryBound(to: CChar.self), bytes.count)
        if !tooLarge { pump() }
        if closed { return }
        if tooLarge {
            refuse(.bodyTooLarge)
        } else if n != bytes.count || parser.pointee.http_errno != 0 {
            refuse(.malformed)
        }
    }
}
