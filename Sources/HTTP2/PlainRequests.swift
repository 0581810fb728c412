import HTTPCore

/// Serves the streams of a server session that carry plain HTTP (the JSON gateway over h2c): a
/// request's head and body are collected, then handed to an `HTTPHandler` with a responder that
/// answers on the stream. The session's owner forwards these streams' events here (for gRPC,
/// `GRPCConnection` does, for every stream that is not a gRPC call).
public final class HTTP2PlainRequests: HTTP2SessionDelegate {
    private let session: HTTP2Session
    private weak var handler: (any HTTPHandler)?
    private let maxBodyBytes: Int
    private let needsFlush: () -> Void
    private var arriving: [Int32: (headers: [HeaderField], body: [UInt8])] = [:]
    /// Requests handed over at their head, whose bodies follow as they arrive.
    private var streaming: [Int32: HTTPBodyStream] = [:]
    private var answering: [Int32: HTTP2Responder] = [:]

    /// - Parameters:
    ///   - maxBodyBytes: longer bodies are refused (the handler words the 413).
    ///   - needsFlush: output is waiting on the session (the owner writes `takeOutput()` soon).
    public init(
        session: HTTP2Session, handler: any HTTPHandler, maxBodyBytes: Int, needsFlush: @escaping () -> Void
    ) {
        self.session = session
        self.handler = handler
        self.maxBodyBytes = maxBodyBytes
        self.needsFlush = needsFlush
    }

    public func streamHeaders(_ stream: Int32, _ headers: [HeaderField], _ block: HeaderBlock) {
        guard block == .request else { return }
        let (method, target, _) = Self.request(headers)
        let path = String(target.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false)[0])
        if let handler, handler.streamsBody(method: method, path: path) {
            let body = HTTPBodyStream()
            streaming[stream] = body
            dispatch(stream, headers, body: [], bodyStream: body)
            return
        }
        arriving[stream] = (headers, [])
    }

    /// Method, target and the other header fields of a request head.
    private static func request(_ headers: [HeaderField]) -> (String, String, [(name: String, value: String)]) {
        var method = "GET", target = "/"
        var fields: [(name: String, value: String)] = []
        for h in headers {
            switch h.name {
            case ":method": method = h.value
            case ":path": target = h.value
            default: if !h.name.hasPrefix(":") { fields.append((h.name, h.value)) }
            }
        }
        return (method, target, fields)
    }

    private func dispatch(_ stream: Int32, _ headers: [HeaderField], body: [UInt8], bodyStream: HTTPBodyStream?) {
        let (method, target, fields) = Self.request(headers)
        let r = responder(stream)
        guard let handler else { return r.respond(HTTPResponse(status: 404, body: [])) }
        handler.handle(
            HTTPRequest(method: method, target: target, headers: fields, body: body, bodyStream: bodyStream), r)
    }

    public func streamData(_ stream: Int32, _ data: UnsafeRawBufferPointer) {
        if let body = streaming[stream] { return body.deliver(Array(data)) }
        guard arriving[stream] != nil else { return }
        if arriving[stream]!.body.count + data.count > maxBodyBytes {
            arriving[stream] = nil
            let r = responder(stream)
            r.respond(handler?.response(for: .bodyTooLarge) ?? HTTPResponse(status: 413, body: []))
            return
        }
        arriving[stream]!.body.append(contentsOf: data)
    }

    public func streamEnded(_ stream: Int32) {
        if let body = streaming.removeValue(forKey: stream) { return body.finish() }
        guard let (headers, body) = arriving.removeValue(forKey: stream) else { return }
        dispatch(stream, headers, body: body, bodyStream: nil)
    }

    private func responder(_ stream: Int32) -> HTTP2Responder {
        let r = HTTP2Responder(session: session, stream: stream, needsFlush: needsFlush)
        answering[stream] = r
        return r
    }

    public func streamClosed(_ stream: Int32) {
        arriving[stream] = nil
        streaming[stream] = nil
        answering.removeValue(forKey: stream)?.closed()
    }

    public func streamDrained(_ stream: Int32) { answering[stream]?.drained() }

    /// The connection went away: every answer still open hears it.
    public func connectionClosed() {
        arriving.removeAll()
        let open = answering.values
        answering.removeAll()
        for r in open { r.closed() }
    }
}

/// An answer written on one HTTP/2 stream: headers, then DATA, then END_STREAM.
public final class HTTP2Responder: HTTPResponder {
    private let session: HTTP2Session
    private let stream: Int32
    private let needsFlush: () -> Void
    private var queue: HTTP2Session.StreamQueue?
    private var done = false
    /// Kept until the answer is done or the client left.
    private var observer: (any HTTPStreamObserver)?
    private var doneCallbacks = DoneCallbacks()

    init(session: HTTP2Session, stream: Int32, needsFlush: @escaping () -> Void) {
        self.session = session
        self.stream = stream
        self.needsFlush = needsFlush
    }

    private static func head(_ status: Int, _ headers: [(name: String, value: String)]) -> [HeaderField] {
        [(":status", String(status))] + headers.map { (name: $0.name.lowercased(), value: $0.value) }
    }

    public func respond(_ r: HTTPResponse) {
        guard !done, queue == nil else { return }
        done = true
        if r.body.isEmpty {
            session.respond(stream, headers: Self.head(r.status, r.headers), endStream: true)
        } else {
            let q = session.respond(stream, headers: Self.head(r.status, r.headers), endStream: false)
            if let q { session.send(r.body, to: q) }
            session.finish(stream, trailers: [])
        }
        needsFlush()
        doneCallbacks.run(completed: true)
    }

    @discardableResult
    public func startStream(
        status: Int, contentType: String, headers: [(name: String, value: String)], observer: (any HTTPStreamObserver)?
    ) -> Bool {
        guard !done, queue == nil else { return false }
        self.observer = observer
        queue = session.respond(
            stream, headers: Self.head(status, [("content-type", contentType)] + headers), endStream: false)
        needsFlush()
        return true
    }

    public func send(_ chunk: [UInt8]) {
        guard !done, let q = queue else { return }
        q.send(chunk)
    }

    public func finish() {
        guard !done, queue != nil else { return }
        done = true
        observer = nil
        session.finish(stream, trailers: [])
        needsFlush()
        doneCallbacks.run(completed: true)
    }

    public func whenDone(_ body: @escaping (Bool) -> Void) { doneCallbacks.add(body) }

    public var queuedBytes: Int { queue?.bytes ?? 0 }

    public func notifyWhenDrained() { session.notifyWhenDrained(stream) }

    func drained() { observer?.responseDrained() }

    func closed() {
        let o = observer
        observer = nil
        let wasOpen = !done
        done = true
        if wasOpen { o?.responseClosed() }
        doneCallbacks.run(completed: false)
    }
}
