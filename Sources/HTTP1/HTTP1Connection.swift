import CHTTPParser

/// A parsed HTTP/1.1 request.
public struct HTTP1Request: Sendable {
    public var method: String
    public var url: String
    public var headers: [(name: String, value: String)]
    public var body: [UInt8]

    /// The path without the query string.
    public var path: String { String(url.split(separator: "?", maxSplits: 1).first ?? "") }

    public func header(_ name: String) -> String? {
        headers.first { $0.name.lowercased() == name }?.value
    }
}

/// A response to write back.
public struct HTTP1Response: Sendable {
    public var status: Int
    public var headers: [(name: String, value: String)]
    public var body: [UInt8]

    public init(status: Int, contentType: String = "application/json", body: [UInt8]) {
        self.status = status
        self.headers = [("Content-Type", contentType)]
        self.body = body
    }

    /// etcd's gateway error body: `{"error":…,"code":…,"message":…}`.
    public static func error(status: Int, grpcCode: Int, message: String) -> HTTP1Response {
        let m = jsonEscape(message)
        return HTTP1Response(status: status, body: Array(#"{"error":"\#(m)","code":\#(grpcCode),"message":"\#(m)"}"#.utf8))
    }

    static let reasons: [Int: String] = [200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                                         408: "Request Timeout", 413: "Payload Too Large", 500: "Internal Server Error",
                                         501: "Not Implemented", 503: "Service Unavailable"]

    func serialize(keepAlive: Bool) -> [UInt8] {
        var head = "HTTP/1.1 \(status) \(Self.reasons[status] ?? "Status")\r\n"
        for h in headers { head += "\(h.name): \(h.value)\r\n" }
        head += "Content-Length: \(body.count)\r\n"
        if !keepAlive { head += "Connection: close\r\n" }
        head += "\r\n"
        return Array(head.utf8) + body
    }
}

/// Escapes a string for a JSON string literal.
public func jsonEscape(_ s: String) -> String {
    var out = ""
    for c in s.unicodeScalars {
        switch c {
        case "\"": out += "\\\""
        case "\\": out += "\\\\"
        case "\n": out += "\\n"
        case "\r": out += "\\r"
        case "\t": out += "\\t"
        default:
            if c.value < 0x20 { out += "\\u" + hex4(c.value) } else { out.unicodeScalars.append(c) }
        }
    }
    return out
}

private func hex4(_ v: UInt32) -> String {
    let s = String(v, radix: 16)
    return String(repeating: "0", count: max(0, 4 - s.count)) + s
}

/// Serves requests (on the loop) and gives back a response.
public protocol HTTP1Handler: AnyObject {
    func handle(_ request: HTTP1Request) -> HTTP1Response
}

/// HTTP/1.1 over http-parser: bytes in, requests to the handler, response bytes out.
/// Keep-alive is honoured; bodies over `maxBodyBytes` get 413 and the connection closes.
public final class HTTP1Connection {
    private var parser = UnsafeMutablePointer<http_parser>.allocate(capacity: 1)
    private var settings = http_parser_settings()
    private weak var handler: (any HTTP1Handler)?
    private let write: ([UInt8], Bool) -> Void
    private let maxBodyBytes: Int

    private var url: [UInt8] = []
    private var headers: [(name: String, value: String)] = []
    private var field: [UInt8] = []
    private var value: [UInt8] = []
    private var inValue = false
    private var body: [UInt8] = []
    private var tooLarge = false
    private var closed = false

    public init(handler: (any HTTP1Handler)?, maxBodyBytes: Int = 2 << 20, write: @escaping ([UInt8], Bool) -> Void) {
        self.handler = handler
        self.write = write
        self.maxBodyBytes = maxBodyBytes
        http_parser_init(parser, HTTP_REQUEST)
        parser.pointee.data = Unmanaged.passUnretained(self).toOpaque()
        settings.on_message_begin = { p in HTTP1Connection.from(p).reset(); return 0 }
        settings.on_url = { p, at, n in HTTP1Connection.from(p).url.append(contentsOf: HTTP1Connection.buf(at, n)); return 0 }
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
            return 0
        }
        settings.on_body = { p, at, n in
            let me = HTTP1Connection.from(p)
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
        url = []; headers = []; field = []; value = []; inValue = false; body = []
    }

    private func endHeader() {
        headers.append((String(decoding: field, as: UTF8.self), String(decoding: value, as: UTF8.self)))
        field = []; value = []; inValue = false
    }

    private func complete() {
        let method = String(cString: http_method_str(http_method(rawValue: parser.pointee.method)))
        let req = HTTP1Request(method: method, url: String(decoding: url, as: UTF8.self), headers: headers, body: body)
        let resp = handler?.handle(req)
            ?? HTTP1Response.error(status: 404, grpcCode: 5, message: "Not Found")
        let keepAlive = http_should_keep_alive(parser) != 0
        write(resp.serialize(keepAlive: keepAlive), !keepAlive)
        if !keepAlive { closed = true }
    }

    /// Feeds bytes from the socket.
    public func receive(_ bytes: UnsafeRawBufferPointer) {
        guard !closed, let base = bytes.baseAddress else { return }
        let n = http_parser_execute(parser, &settings, base.assumingMemoryBound(to: CChar.self), bytes.count)
        if closed { return }
        if tooLarge {
            closed = true
            write(HTTP1Response.error(status: 413, grpcCode: 3, message: "etcdserver: request is too large")
                .serialize(keepAlive: false), true)
        } else if n != bytes.count || parser.pointee.http_errno != 0 {
            closed = true
            write(HTTP1Response.error(status: 400, grpcCode: 3, message: "malformed HTTP request")
                .serialize(keepAlive: false), true)
        }
    }
}
