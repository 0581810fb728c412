/// Plain HTTP requests and answers, the same over HTTP/1.1 (http-parser) and over h2c streams
/// (nghttp2): both transports turn bytes into an `HTTPRequest` and hand it to an `HTTPHandler`
/// with an `HTTPResponder` of their own, so the gateway and the plain endpoints are written once.

/// A request whose head and body have arrived whole.
public struct HTTPRequest: Sendable {
    public var method: String
    /// The request target: path and query (`/v3/kv/range`, `/health?exclude=NOSPACE`).
    public var target: String
    /// Names as sent (HTTP/2 sends them in lowercase; HTTP/1.1 in any case).
    public var headers: [(name: String, value: String)]
    public var body: [UInt8]
    /// For a request whose handler takes its body as it arrives (`HTTPHandler.streamsBody`): the
    /// body, chunk by chunk (`body` is then empty).
    public var bodyStream: HTTPBodyStream?

    public init(
        method: String, target: String, headers: [(name: String, value: String)], body: [UInt8],
        bodyStream: HTTPBodyStream? = nil
    ) {
        self.method = method
        self.target = target
        self.headers = headers
        self.body = body
        self.bodyStream = bodyStream
    }

    /// The path without the query string.
    public var path: String { String(target.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false)[0]) }

    /// The query string (after `?`), empty if there is none.
    public var query: String {
        guard let q = target.firstIndex(of: "?") else { return "" }
        return String(target[target.index(after: q)...])
    }

    /// The first value of a header, by name in any case.
    public func header(_ name: String) -> String? {
        let name = name.lowercased()
        return headers.first { $0.name.lowercased() == name }?.value
    }
}

/// A whole answer.
public struct HTTPResponse: Sendable {
    public var status: Int
    public var headers: [(name: String, value: String)]
    public var body: [UInt8]

    public init(status: Int, contentType: String = "application/json", body: [UInt8]) {
        self.status = status
        self.headers = [("Content-Type", contentType)]
        self.body = body
    }

    /// The reason phrase HTTP/1.1 writes after the status.
    public static func reason(_ status: Int) -> String {
        switch status {
        case 200: "OK"
        case 204: "No Content"
        case 400: "Bad Request"
        case 401: "Unauthorized"
        case 403: "Forbidden"
        case 404: "Not Found"
        case 405: "Method Not Allowed"
        case 408: "Request Timeout"
        case 409: "Conflict"
        case 413: "Payload Too Large"
        case 415: "Unsupported Media Type"
        case 429: "Too Many Requests"
        case 500: "Internal Server Error"
        case 501: "Not Implemented"
        case 503: "Service Unavailable"
        case 504: "Gateway Timeout"
        default: "Status"
        }
    }
}

/// Hears what happens to a streamed answer (one per responder; set by `startStream`).
public protocol HTTPStreamObserver: AnyObject {
    /// Everything sent so far has left (once after each `notifyWhenDrained`).
    func responseDrained()
    /// The client went away (or the connection closed) before `finish`.
    func responseClosed()
}

/// How a request is answered: once whole (`respond`), or as a stream (`startStream`, `send`…,
/// `finish`). Calls after the answer is done, or after the client left, do nothing.
public protocol HTTPResponder: AnyObject {
    func respond(_ response: HTTPResponse)
    /// Starts a streamed answer (chunked on HTTP/1.1, DATA frames on HTTP/2); `observer` hears
    /// drains and the client leaving. False if the answer could not start (already answered, or
    /// the client is gone): then the observer will hear nothing.
    @discardableResult
    func startStream(
        status: Int, contentType: String, headers: [(name: String, value: String)], observer: (any HTTPStreamObserver)?
    ) -> Bool
    func send(_ chunk: [UInt8])
    func finish()
    /// Bytes sent that the client has not taken yet.
    var queuedBytes: Int { get }
    /// Asks for one `responseDrained` once everything sent so far has left (at once if it has).
    func notifyWhenDrained()
    /// Runs `body` once the answer is over: with `true` once it was sent whole, with `false` if
    /// the client left first (a waiting Lock then gives up its place, and the gateway's call slot
    /// frees either way). At once if it is already over.
    func whenDone(_ body: @escaping (_ completed: Bool) -> Void)
}

/// The `whenDone` bodies of one answer, run once.
public struct DoneCallbacks {
    private var bodies: [(Bool) -> Void] = []
    private var result: Bool?
    public init() {}
    public mutating func add(_ body: @escaping (Bool) -> Void) {
        if let result { body(result) } else { bodies.append(body) }
    }
    public mutating func run(completed: Bool) {
        guard result == nil else { return }
        result = completed
        let b = bodies
        bodies = []
        for body in b { body(completed) }
    }
}

extension HTTPResponder {
    /// Starts a streamed answer with no headers beyond the content type.
    @discardableResult
    public func startStream(status: Int, contentType: String, observer: (any HTTPStreamObserver)?) -> Bool {
        startStream(status: status, contentType: contentType, headers: [], observer: observer)
    }
}

/// Why a transport refused a request before it reached the handler.
public enum HTTPRefusal: Sendable, Equatable {
    /// The body is over the transport's limit (413).
    case bodyTooLarge
    /// The request did not arrive in full in time (408; HTTP/1.1 only).
    case readTimeout
    /// The bytes are not HTTP (400).
    case malformed
}

/// Serves plain HTTP requests, on the loop.
public protocol HTTPHandler: AnyObject {
    func handle(_ request: HTTPRequest, _ responder: any HTTPResponder)
    /// The answer to a request refused by the transport (the handler words it, and counts it).
    func response(for refusal: HTTPRefusal) -> HTTPResponse
    /// Whether a request with this method and path is handed over as soon as its head arrives,
    /// its body following through `HTTPRequest.bodyStream` (a watch that takes more requests).
    func streamsBody(method: String, path: String) -> Bool
}

extension HTTPHandler {
    public func streamsBody(method: String, path: String) -> Bool { false }
}

/// A request body arriving in chunks, on the loop. Chunks that come before the handler listens
/// wait here; so does the end.
public final class HTTPBodyStream: @unchecked Sendable {
    private var pending: [[UInt8]] = []
    private var ended = false
    private var onChunk: (([UInt8]) -> Void)?
    private var onEnd: (() -> Void)?

    public init() {}

    /// Listens: `chunk` for each piece of the body in order, then `end` once it is complete.
    public func listen(chunk: @escaping ([UInt8]) -> Void, end: @escaping () -> Void) {
        onChunk = chunk
        onEnd = end
        let waiting = pending
        pending = []
        for c in waiting { chunk(c) }
        if ended { end() }
    }

    /// Stops listening (the answer ended); later chunks are dropped.
    public func stopListening() {
        onChunk = { _ in }
        onEnd = {}
        pending = []
    }

    /// The transport's side: a piece of the body.
    public func deliver(_ bytes: [UInt8]) {
        if let onChunk { onChunk(bytes) } else { pending.append(bytes) }
    }

    /// The transport's side: the body is complete.
    public func finish() {
        guard !ended else { return }
        ended = true
        onEnd?()
    }
}

/// A query string's parameters, percent-decoded to bytes (`+` is a space); repeated names kept in
/// order. A malformed escape makes the query malformed.
public struct HTTPQuery: Sendable {
    public private(set) var pairs: [(name: String, value: [UInt8])] = []
    /// A `%` escape that is not two hex digits, or a name that is not UTF-8.
    public private(set) var malformed = false

    public init(_ query: String) {
        for part in query.split(separator: "&") where !part.isEmpty {
            let kv = part.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            guard let name = Self.decode(kv[0]), let value = kv.count > 1 ? Self.decode(kv[1]) : [],
                let n = String(validating: name, as: UTF8.self)
            else {
                malformed = true
                continue
            }
            pairs.append((n, value))
        }
    }

    static func decode(_ s: Substring) -> [UInt8]? {
        var out: [UInt8] = []
        let b = Array(s.utf8)
        var i = 0
        func hex(_ c: UInt8) -> UInt8? {
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): c - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): c - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): c - UInt8(ascii: "A") + 10
            default: nil
            }
        }
        while i < b.count {
            switch b[i] {
            case UInt8(ascii: "%"):
                guard i + 2 < b.count, let h = hex(b[i + 1]), let l = hex(b[i + 2]) else { return nil }
                out.append(h << 4 | l)
                i += 3
            case UInt8(ascii: "+"):
                out.append(UInt8(ascii: " "))
                i += 1
            default:
                out.append(b[i])
                i += 1
            }
        }
        return out
    }

    /// Every value of `name`, as text (lossy for bytes that are not UTF-8).
    public func all(_ name: String) -> [String] {
        pairs.filter { $0.name == name }.map { String(decoding: $0.value, as: UTF8.self) }
    }
    /// The first value of `name`, as bytes.
    public func bytes(_ name: String) -> [UInt8]? { pairs.first { $0.name == name }?.value }
    /// The first value of `name`, as text.
    public func first(_ name: String) -> String? { bytes(name).map { String(decoding: $0, as: UTF8.self) } }
    public func has(_ name: String) -> Bool { pairs.contains { $0.name == name } }
}
